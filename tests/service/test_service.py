"""MichiLLMService in real Pipecat pipelines: frames out, context in step, turns, failures.

Tests taking ``backend`` run against every backend kind of ``conftest.py`` (the embedded tiny
engine with random weights); edge cases (interruptions, a dying worker) use a scripted call.
"""

from __future__ import annotations

import asyncio

import pytest
from pipecat.frames.frames import (
    CancelFrame,
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    InterimTranscriptionFrame,
    InterruptionFrame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMMessagesAppendFrame,
    LLMRunFrame,
    LLMServiceMetadataFrame,
    LLMTextFrame,
    LLMUpdateSettingsFrame,
    MetricsFrame,
    ProposedUserStartedSpeakingFrame,
    ProposedUserStoppedSpeakingFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.tests.utils import SleepFrame, run_test
from service_fakes import FRAME, SILENT, ScriptedBackend, ScriptedCall, SpyBackend, Step, model_frames

from pipecat_michi.engine.call import DuplexBackend, LocalEngine
from pipecat_michi.engine.engine import DuplexEngine
from pipecat_michi.engine.settings import SessionSettingsUpdate
from pipecat_michi.model.tokenizer import format_context
from pipecat_michi.service import FRAME_INDEX_METADATA_KEY, MichiLLMService, MichiServiceParams, MichiSettings
from pipecat_michi.service.turns import BotText
from pipecat_michi.worker.client import WorkerIdleError
from pipecat_michi.worker.protocol import CloseCode
from tests.service.conftest import ENGINE_CONFIG
from tests.support import Until, caller_audio, index_of, kinds, run_pipeline

pytestmark = pytest.mark.timeout(60)

# The random tiny model with this seed and threshold listens for one frame, then speaks on.
SPEAKS = MichiSettings(seed=1, speak_threshold=0.45)
# Wait for every step at EndFrame even when a loaded machine makes steps slow.
PATIENT = MichiServiceParams(drain_timeout_s=20)


# --- the embedded engine -------------------------------------------------------------------


@pytest.mark.parametrize("out_rate", [24000, 16000])
async def test_caller_audio_in_gives_bot_audio_text_and_upstream_transcripts(
    backend: DuplexBackend, out_rate: int
) -> None:
    service = MichiLLMService(backend, settings=SPEAKS, user_id="caller-1", params=PATIENT)
    sent = caller_audio(40)  # 0.8 s at 16 kHz: 10 model frames
    down, up = await run_pipeline(service, [*sent, SleepFrame(0.3)], out_rate=out_rate)

    # The caller's audio goes on downstream (recorders, the output transport's mixer).
    assert len(kinds(down, InputAudioRawFrame)) == len(sent)
    assert isinstance(down[0], LLMServiceMetadataFrame)
    out = [f for f in down if not isinstance(f, (InputAudioRawFrame, LLMServiceMetadataFrame))]
    audio = kinds(out, TTSAudioRawFrame)
    assert len(audio) >= 6
    assert all(f.sample_rate == out_rate and f.num_channels == 1 for f in audio)
    samples = [len(f.audio) // 2 for f in audio]
    if out_rate == 24000:
        assert samples == [FRAME] * len(audio)
    else:  # 80 ms at 16 kHz each, less the stream resampler's start-up delay
        assert len(audio) * 1280 - 1280 <= sum(samples) <= len(audio) * 1280
    indices = [f.metadata[FRAME_INDEX_METADATA_KEY] for f in audio]
    assert indices == sorted(set(indices))

    # One bot turn, balanced: response start, TTS start, audio and text, TTS stop, response end.
    proposals = (ProposedUserStartedSpeakingFrame, ProposedUserStoppedSpeakingFrame)
    order = [type(f) for f in out if not isinstance(f, proposals)]
    assert order[:2] == [LLMFullResponseStartFrame, TTSStartedFrame]
    assert order[-2:] == [TTSStoppedFrame, LLMFullResponseEndFrame]
    assert set(order[2:-2]) <= {TTSAudioRawFrame, LLMTextFrame, TTSTextFrame, MetricsFrame}

    llm_text, tts_text = kinds(out, LLMTextFrame), kinds(out, TTSTextFrame)
    assert llm_text and [f.text for f in llm_text] == [f.text for f in tts_text]
    assert not any(f.append_to_context for f in llm_text)  # recorded once, from the TTSTextFrame
    assert all(f.append_to_context and f.includes_inter_frame_spaces for f in tts_text)

    interim, final = kinds(up, InterimTranscriptionFrame), kinds(up, TranscriptionFrame)
    assert interim and final
    assert all(f.user_id == "caller-1" and f.timestamp for f in interim + final)
    ended = index_of(up, TranscriptionFrame)  # when the bot took the floor
    assert up[ended].text == kinds(up[:ended], InterimTranscriptionFrame)[-1].text
    assert kinds(up, ProposedUserStartedSpeakingFrame) and kinds(up, ProposedUserStoppedSpeakingFrame)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
async def test_the_embedded_engine_in_half_precision_speaks(dtype: str) -> None:
    engine = DuplexEngine(ENGINE_CONFIG.model_copy(update={"dtype": dtype}))
    backend = LocalEngine(engine=engine)
    await engine.start()
    try:
        service = MichiLLMService(backend, settings=SPEAKS, params=PATIENT)
        down, up = await run_pipeline(service, [*caller_audio(40), SleepFrame(0.3)])
    finally:
        await backend.close()
    assert len(kinds(down, TTSAudioRawFrame)) >= 6 and kinds(down, TTSTextFrame)
    assert kinds(up, InterimTranscriptionFrame)


async def test_context_aggregators_record_both_sides_and_nothing_is_read_twice(backend: DuplexBackend) -> None:
    context = LLMContext(
        [
            {"role": "system", "content": "You are Michi."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
        ]
    )
    pair = LLMContextAggregatorPair(context)
    spy = SpyBackend(backend)
    service = MichiLLMService(spy, settings=SPEAKS, params=PATIENT)
    pipeline = Pipeline([pair.user(), service, pair.assistant()])

    await run_pipeline(pipeline, [LLMRunFrame(), SleepFrame(0.2), *caller_audio(40), SleepFrame(0.4)])

    # Audio fed in a burst makes turns follow each other within milliseconds, faster than the
    # user aggregator settles them, so only what was recorded is checked here; the order of a
    # paced conversation is checked with a scripted call below.
    added = context.messages[3:]
    assert {m["role"] for m in added} == {"user", "assistant"}
    assert all(m["content"].strip() for m in added)
    # The first context was prefilled (system pinned); the transcripts and bot text the
    # aggregators then recorded came back in later contexts and were recognised as ours.
    (call,) = spy.calls
    assert [(i.role, i.text, i.pinned) for i in call.injected] == [
        ("system", "You are Michi.", True),
        ("user", "Hi", False),
        ("assistant", "Hello!", False),
    ]


async def test_a_message_appended_mid_call_is_injected_without_reset(backend: DuplexBackend) -> None:
    context = LLMContext([{"role": "system", "content": "Be brief."}])
    pair = LLMContextAggregatorPair(context)
    spy = SpyBackend(backend)
    service = MichiLLMService(spy, settings=SPEAKS, params=PATIENT)
    text = "Store hours: 9 to 5."
    frames = [
        LLMRunFrame(),
        SleepFrame(0.2),
        *caller_audio(20),
        SleepFrame(0.3),
        LLMMessagesAppendFrame([{"role": "user", "content": text}], run_llm=True),
        SleepFrame(0.3),
        *caller_audio(20, seed=1),
        SleepFrame(0.3),
    ]
    await run_pipeline(Pipeline([pair.user(), service, pair.assistant()]), frames)

    (call,) = spy.calls
    assert call.resets == 0
    (injected,) = [i for i in call.injected if i.text == text]
    assert (injected.role, injected.pinned) == ("user", False)
    grown_from = injected.result.kv_length - injected.result.token_count
    assert injected.result.token_count > 0 and grown_from > 0  # appended to a live context
    if isinstance(backend, LocalEngine):  # only the in-process engine reports KV length per step
        kv = sorted({step.kv_length for step in call.steps})
        # The step before the injection ends where it starts, the next one right after its tokens.
        assert grown_from in kv and injected.result.kv_length + 1 in kv
        assert not [k for k in kv if grown_from < k <= injected.result.kv_length]
        tokenizer = backend.engine.tokenizer
        assert injected.result.token_count == len(tokenizer.encode(format_context(tokenizer, "user", text)))


async def test_settings_update_reaches_the_call_and_a_bad_one_is_refused(backend: DuplexBackend) -> None:
    spy = SpyBackend(backend)
    service = MichiLLMService(spy, settings=MichiSettings(seed=1), params=PATIENT)
    frames = [
        *caller_audio(8),
        SleepFrame(0.2),
        LLMUpdateSettingsFrame(delta=MichiSettings(speak_threshold=0.9, temperature=0.0)),
        SleepFrame(0.2),
        LLMUpdateSettingsFrame(delta=MichiSettings(speak_threshold=1.5)),
        SleepFrame(0.1),
    ]
    _, up = await run_pipeline(service, frames)

    (call,) = spy.calls
    assert call.updates == [SessionSettingsUpdate(speak_threshold=0.9, temperature=0.0)]
    if isinstance(backend, LocalEngine):
        assert call.session.settings.speak_threshold == 0.9 and call.session.settings.temperature == 0.0
    assert service.settings.speak_threshold == 0.9  # the invalid value was rolled back
    (error,) = kinds(up, ErrorFrame)
    assert "Invalid MichiAI settings" in error.error and service.is_usable


# --- scripted calls: the edges --------------------------------------------------------------


async def test_interruption_stops_bot_output_at_once_until_the_next_turn() -> None:
    call = ScriptedCall([Step(True, "a")] * 3 + [Step(True, "b")] * 2 + [SILENT] + [Step(True, "c")] * 2)
    service = MichiLLMService(ScriptedBackend(call))
    frames = [
        *model_frames(3),
        Until(lambda: call.delivered == 3, "the first three steps"),
        InterruptionFrame(),
        SleepFrame(0.1),  # the interruption is a system frame: nothing observable to wait on
        *model_frames(5),
        Until(lambda: call.delivered == 8, "every step"),
    ]
    down, _ = await run_pipeline(service, frames)

    cut = index_of(down, InterruptionFrame)
    assert len(kinds(down[:cut], TTSAudioRawFrame)) == 3
    resumed = index_of(down, TTSStartedFrame, cut)
    # Nothing of the interrupted run after the InterruptionFrame, not even its end frames.
    assert not kinds(down[cut:resumed], TTSAudioRawFrame, TTSTextFrame, TTSStoppedFrame, LLMFullResponseEndFrame)
    assert isinstance(down[resumed - 1], LLMFullResponseStartFrame)
    assert [f.text for f in kinds(down[resumed:], TTSTextFrame)] == ["c", "c"]
    assert len(kinds(down[resumed:], TTSAudioRawFrame)) == 2


async def test_a_bot_text_filter_rewrites_or_drops_text_before_it_becomes_frames() -> None:
    seen: list[BotText] = []

    async def hide_calls(event: BotText) -> str:
        seen.append(event)
        return "" if event.text.startswith("<call>") else event.text.upper()

    call = ScriptedCall([Step(True, "hi "), Step(True, "<call>x</call>"), Step(True, "there")])
    service = MichiLLMService(ScriptedBackend(call), bot_text_filter=hide_calls)
    down, _ = await run_pipeline(service, [*model_frames(3), Until(lambda: call.delivered == 3, "three steps")])

    assert [(e.text, e.frame_index) for e in seen] == [("hi ", 0), ("<call>x</call>", 1), ("there", 2)]
    assert [f.text for f in kinds(down, TTSTextFrame)] == ["HI ", "THERE"]
    assert [f.text for f in kinds(down, LLMTextFrame)] == ["HI ", "THERE"]


async def test_bot_text_is_always_printable() -> None:
    call = ScriptedCall([Step(True, "\ufffdM\x1cN,"), Step(True, "\x07\ufffd"), Step(True, " ok")])
    service = MichiLLMService(ScriptedBackend(call))
    down, _ = await run_pipeline(service, [*model_frames(3), Until(lambda: call.delivered == 3, "three steps")])

    assert [f.text for f in kinds(down, TTSTextFrame)] == ["MN,", " ok"]


async def test_model_yielding_to_the_user_broadcasts_an_interruption_and_ttfb_is_measured() -> None:
    script = [
        Step(transcript="hello"),  # the user speaks
        Step(True, "hi "),  # the bot answers: the user's turn ends
        Step(True, "there"),
        SILENT,  # the bot ends its turn on its own
        Step(True, "so "),  # a second turn...
        Step(True, transcript="wait"),  # ...the user talks over it...
        Step(False, transcript=" no"),  # ...and the model yields
        SILENT,
    ]
    call = ScriptedCall(script)
    service = MichiLLMService(ScriptedBackend(call))
    frames = [*model_frames(len(script)), Until(lambda: call.delivered == len(script), "every step")]
    down, up = await run_pipeline(service, frames, metrics=True)

    out = [f for f in down if not isinstance(f, (InputAudioRawFrame, MetricsFrame))]
    first_end = index_of(out, LLMFullResponseEndFrame)
    assert isinstance(out[first_end - 1], TTSStoppedFrame)  # ended normally, no interruption
    assert not kinds(out[:first_end], InterruptionFrame)
    second = index_of(out, LLMFullResponseStartFrame, first_end)
    barge_in = index_of(out, InterruptionFrame, second)
    assert not kinds(out[second:barge_in], TTSStoppedFrame, LLMFullResponseEndFrame)
    assert not kinds(out[barge_in:], LLMFullResponseStartFrame, TTSAudioRawFrame)
    assert kinds(up, InterruptionFrame)  # broadcast: the input side and user aggregator see it

    assert [f.text for f in kinds(up, TranscriptionFrame)] == ["hello", "wait no"]
    ttfb = [d for f in kinds(down, MetricsFrame) for d in f.data if isinstance(d, TTFBMetricsData) and d.model]
    assert len(ttfb) == 1 and 0 <= ttfb[0].value < 5  # user's last words -> first bot audio


async def test_lost_backend_reconnects_and_replays_the_context() -> None:
    first, second = ScriptedCall([Step(True, "a")] * 9, die_after=2), ScriptedCall()
    backend = ScriptedBackend(first, second)
    service = MichiLLMService(backend, system_instruction="Be brief.")
    context = LLMContext([{"role": "system", "content": "Use the menu."}, {"role": "user", "content": "Tea?"}])
    frames = [
        LLMContextFrame(context),
        Until(lambda: len(first.injected) == 2, "the context injected"),
        *model_frames(4),
        Until(lambda: len(second.injected) == 2, "the second call opened and replayed"),
        *model_frames(2),
        Until(lambda: second.delivered == 2, "both frames answered"),
    ]
    down, up = await run_pipeline(service, frames)

    assert backend.prompts == ["Be brief.", "Be brief."] and first.closed
    for call in (first, second):
        assert [(i.role, i.text, i.pinned) for i in call.injected] == [
            ("system", "Use the menu.", True),
            ("user", "Tea?", False),
        ]
    assert len(second.sent) == 2 and not kinds(up, ErrorFrame)
    # The turn cut by the failure was closed, keeping the response frames balanced.
    assert len(kinds(down, LLMFullResponseStartFrame)) == len(kinds(down, LLMFullResponseEndFrame)) == 1


async def test_a_call_closed_for_idleness_is_reopened_only_when_the_caller_speaks_again() -> None:
    idle = WorkerIdleError(CloseCode.IDLE_TIMEOUT, "no message for 30 s")
    first, second = ScriptedCall(die_after=2, die_with=idle), ScriptedCall()
    backend = ScriptedBackend(first, second)
    service = MichiLLMService(backend)
    frames = [
        *model_frames(2),
        Until(lambda: first.closed, "the idle close"),
        SleepFrame(0.3),  # time a reconnect would take: none happens while the caller is silent
        Until(lambda: backend.open_attempts == 1, "no new call without caller audio", timeout_s=0.1),
        *model_frames(1),  # the caller speaks: a new call opens (this frame is lost)
        Until(lambda: service.call is second, "the new call"),
        *model_frames(2),
        Until(lambda: second.delivered == 2, "the new call answers"),
    ]
    _, up = await run_pipeline(service, frames)

    assert backend.open_attempts == 2 and len(second.sent) == 2
    assert not kinds(up, ErrorFrame) and service.is_usable


async def test_a_backend_that_stays_down_gives_an_error_frame_and_the_pipeline_still_ends() -> None:
    first = ScriptedCall([Step(True, "a")] * 9, die_after=2)
    backend = ScriptedBackend(first)
    service = MichiLLMService(backend)
    frames = [*model_frames(4), Until(lambda: not service.is_usable, "the service gave up"), *model_frames(2)]
    down, up = await run_pipeline(service, frames)

    (error,) = kinds(up, ErrorFrame)
    assert "MichiAI backend unavailable" in error.error and "opening a call failed" in error.error
    assert backend.open_attempts == 2  # one new call asked for: retrying is the backend's job
    assert not service.is_usable and service.call is None
    assert kinds(down, TTSStoppedFrame) and kinds(down, LLMFullResponseEndFrame)


async def test_scripted_conversation_through_the_aggregators_injects_only_the_apps_messages() -> None:
    script = [
        Step(transcript="hello"),
        Step(True, "hi "),
        Step(True, "there"),
        SILENT,
        Step(transcript="more"),
        *[SILENT] * 8,  # quiet long enough to end the user's turn
    ]
    call = ScriptedCall(script)
    context = LLMContext([{"role": "system", "content": "Be brief."}])
    pair = LLMContextAggregatorPair(context)
    service = MichiLLMService(ScriptedBackend(call), system_instruction="Be brief.")
    frames = [
        LLMRunFrame(),
        *model_frames(len(script)),
        Until(lambda: len(context.messages) == 4, "both sides' turns recorded"),
        LLMMessagesAppendFrame([{"role": "developer", "content": "Offer tea."}], run_llm=True),
        Until(lambda: len(call.injected) == 1, "the app's message injected"),
    ]
    _, up = await run_pipeline(Pipeline([pair.user(), service, pair.assistant()]), frames)

    assert [(m["role"], m["content"]) for m in context.messages] == [
        ("system", "Be brief."),
        ("user", "hello"),
        ("assistant", "hi there"),
        ("user", "more"),
        ("developer", "Offer tea."),
    ]
    # The system prompt was already in the call (opened with it); the turns were its own.
    assert [(i.role, i.text) for i in call.injected] == [("developer", "Offer tea.")]


async def test_cancel_closes_the_call_without_waiting() -> None:
    call = ScriptedCall([Step(True, "a")] * 4)
    service = MichiLLMService(ScriptedBackend(call))
    await asyncio.wait_for(
        run_test(
            service,
            frames_to_send=[*model_frames(2), SleepFrame(0.1), CancelFrame()],
            send_end_frame=False,
            start_timeout=10,
        ),
        timeout=10,
    )
    assert call.closed and service.call is None


async def test_a_refused_message_is_reported_and_the_call_goes_on() -> None:
    call = ScriptedCall(refuse={"x" * 50})
    backend = ScriptedBackend(call)
    service = MichiLLMService(backend)
    context = LLMContext([{"role": "user", "content": "x" * 50}])
    later = LLMContext([*context.messages, {"role": "user", "content": "short"}])
    frames = [LLMContextFrame(context), SleepFrame(0.1), LLMContextFrame(later), *model_frames(2), SleepFrame(0.1)]
    _, up = await run_pipeline(service, frames)

    (error,) = kinds(up, ErrorFrame)
    assert "refused a user message" in error.error and service.is_usable
    assert [(i.role, i.text) for i in call.injected] == [("user", "short")]
    assert len(backend.opened) == 1 and len(call.sent) == 2
