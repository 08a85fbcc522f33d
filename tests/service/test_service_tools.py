"""Function calling through MichiLLMService in real Pipecat pipelines.

The call's text channel is scripted (the model's edge); the parser, Pipecat's function-call
flow, the context aggregators and the injection of results are the real ones. The last test
runs against a real loopback worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
from pipecat.frames.frames import (
    ErrorFrame,
    FunctionCallCancelFrame,
    FunctionCallInProgressFrame,
    FunctionCallResultFrame,
    FunctionCallsStartedFrame,
    InterruptionFrame,
    LLMRunFrame,
    LLMTextFrame,
    LLMUpdateSettingsFrame,
    TTSAudioRawFrame,
    TTSTextFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.services.llm_service import FunctionCallParams
from pipecat.tests.utils import SleepFrame
from service_fakes import SILENT, ScriptedBackend, ScriptedCall, SpyBackend, SpyCall, Step, model_frames

from pipecat_michi.contract import StepResult
from pipecat_michi.engine.call import LocalEngine
from pipecat_michi.engine.config import EngineConfig
from pipecat_michi.service import MichiLLMService, MichiServiceParams, MichiSettings
from pipecat_michi.service.tools import render_tools_prompt, tool_specs
from pipecat_michi.worker.client import RemoteWorker
from pipecat_michi.worker.config import WorkerConfig
from pipecat_michi.worker.harness import running_worker
from tests.service.conftest import ENGINE_CONFIG
from tests.support import Until, caller_audio, kinds, run_pipeline as run

pytestmark = pytest.mark.timeout(60)
TOKEN = "tools-remote-service-token"

WEATHER = FunctionSchema(
    name="get_weather",
    description="Current weather in a city.",
    properties={"city": {"type": "string"}},
    required=["city"],
)
TOOLS = ToolsSchema(standard_tools=[WEATHER])
TOOLS_PROMPT = render_tools_prompt(tool_specs(TOOLS))
# A call written over four steps, split inside the tags and the JSON.
CALL_STEPS = [
    Step(True, "One moment. <tool"),
    Step(True, '_call>{"name": "get_'),
    Step(True, 'weather", "arguments": {"city": "Oslo"}}</tool'),
    Step(True, "_call>"),
]
RESULT_TURN = '<tool_response>\n{"temp_c": 21}\n</tool_response>'


def spoken(frames: list) -> str:
    return "".join(f.text for f in kinds(frames, TTSTextFrame))


def shown(frames: list) -> str:
    return "".join(f.text for f in kinds(frames, LLMTextFrame))


class Weather:
    """A ``register_function`` handler that records its calls; ``release`` gates its answer."""

    def __init__(self, gated: bool = False) -> None:
        self.calls: list[dict] = []
        self.release = asyncio.Event()
        if not gated:
            self.release.set()
        self.cancelled = False

    async def __call__(self, params: FunctionCallParams) -> None:
        self.calls.append(dict(params.arguments))
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        await params.result_callback({"temp_c": 21})


async def test_a_call_in_the_text_channel_runs_the_handler_and_its_result_comes_back_as_a_tool_turn() -> None:
    script = [*CALL_STEPS, SILENT, SILENT, Step(True, "It is 21 degrees.")]
    call = ScriptedCall(script)
    context = LLMContext([{"role": "system", "content": "Be brief."}], tools=TOOLS)
    pair = LLMContextAggregatorPair(context)
    service = MichiLLMService(ScriptedBackend(call), system_instruction="Be brief.")
    weather = Weather()
    service.register_function("get_weather", weather)
    frames = [LLMRunFrame(), SleepFrame(0.1), *model_frames(5), SleepFrame(0.3), *model_frames(2), SleepFrame(0.2)]
    down, up = await run(Pipeline([pair.user(), service, pair.assistant()]), frames)

    assert weather.calls == [{"city": "Oslo"}]  # once, with the parsed arguments
    # Pipecat's own frames, in order, upstream of the aggregator that consumes them.
    flow = kinds(up, FunctionCallsStartedFrame, FunctionCallInProgressFrame, FunctionCallResultFrame)
    assert [type(f) for f in flow] == [FunctionCallsStartedFrame, FunctionCallInProgressFrame, FunctionCallResultFrame]
    assert flow[0].function_calls[0].function_name == "get_weather"
    # The call's text is never spoken nor recorded as speech; the text around it is.
    assert [(m["role"], m.get("content")) for m in context.messages if m["role"] == "assistant"] == [
        ("assistant", None),  # the call, recorded as it starts
        ("assistant", "One moment."),  # the turn the call ended, recorded as it ends
        ("assistant", "It is 21 degrees."),
    ]
    # The tools were read with the system prompt (pinned); the result as a tool turn; the
    # assistant message recording the call is the model's own text and is not read again.
    assert [(i.role, i.text, i.pinned) for i in call.injected] == [
        ("system", TOOLS_PROMPT, True),
        ("tool", RESULT_TURN, False),
    ]
    tool_id = flow[0].function_calls[0].tool_call_id
    assert {"role": "tool", "content": '{"temp_c": 21}', "tool_call_id": tool_id} in context.messages


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"</tool_call>', "not valid JSON"),
        ('<tool_call>{"name": "book_flight", "arguments": {}}</tool_call>', "unknown function 'book_flight'"),
        ('<tool_call>{"name": "get_weather", "arguments": {"town": "Oslo"}}</tool_call>', "missing required"),
    ],
)
async def test_a_bad_call_is_answered_to_the_model_with_an_error_and_the_turn_goes_on(text: str, error: str) -> None:
    call = ScriptedCall([Step(True, "Hm. "), Step(True, text), Step(True, "Sorry.")])
    service = MichiLLMService(ScriptedBackend(call), settings=MichiSettings(tools=TOOLS))
    weather = Weather()
    service.register_function("get_weather", weather)
    down, up = await run(service, [*model_frames(3), SleepFrame(0.3)])

    assert weather.calls == []
    assert not kinds(up + down, FunctionCallsStartedFrame)
    assert spoken(down) == shown(down) == "Hm. Sorry."  # nothing of the call spoken or shown
    [answer] = [i for i in call.injected if i.role == "tool"]
    assert error in json.loads(answer.text.split("\n")[1])["error"]


async def test_tools_at_construction_are_pinned_and_a_new_tool_set_is_injected_mid_call() -> None:
    call = ScriptedCall()
    backend = ScriptedBackend(call)
    service = MichiLLMService(backend, system_instruction="Be brief.", settings=MichiSettings(tools=TOOLS))
    booking = FunctionSchema(name="book", description="Book.", properties={}, required=[])
    new_tools = ToolsSchema(standard_tools=[WEATHER, booking])
    frames = [*model_frames(2), SleepFrame(0.1), LLMUpdateSettingsFrame(delta=MichiSettings(tools=new_tools))]
    await run(service, [*frames, *model_frames(1), SleepFrame(0.1)])

    assert backend.prompts == [f"Be brief.\n\n{TOOLS_PROMPT}"]
    assert [(i.role, i.text) for i in call.injected] == [("system", render_tools_prompt(tool_specs(new_tools)))]


@pytest.mark.parametrize("behavior", ["hold", "filler"])
async def test_while_a_call_runs_the_bot_holds_or_keeps_the_floor(behavior: str) -> None:
    call = ScriptedCall([*CALL_STEPS, Step(True, "Let me check. "), Step(True, "Still checking. ")])
    settings = MichiSettings(tools=TOOLS, tool_call_behavior=behavior)
    service = MichiLLMService(ScriptedBackend(call), settings=settings)
    weather = Weather(gated=True)
    service.register_function("get_weather", weather)
    down, _ = await run(service, [*model_frames(6), SleepFrame(0.3)])

    assert weather.calls == [{"city": "Oslo"}]
    held = behavior == "hold"
    assert spoken(down) == ("One moment. " if held else "One moment. Let me check. Still checking. ")
    # Held from the step that closed the call on.
    assert len(kinds(down, TTSAudioRawFrame)) == (3 if held else 6)


async def test_an_interruption_cancels_the_running_call_and_ends_the_hold() -> None:
    call = ScriptedCall([*CALL_STEPS, SILENT, Step(True, "Okay.")])
    service = MichiLLMService(ScriptedBackend(call), settings=MichiSettings(tools=TOOLS))
    weather = Weather(gated=True)
    service.register_function("get_weather", weather)
    frames = [*model_frames(4), SleepFrame(0.3), InterruptionFrame(), SleepFrame(0.2), *model_frames(2)]
    down, _ = await run(service, [*frames, SleepFrame(0.3)])

    assert weather.calls == [{"city": "Oslo"}] and weather.cancelled
    assert kinds(down, FunctionCallCancelFrame)
    assert not kinds(down, FunctionCallResultFrame)
    assert spoken(down).endswith("Okay.")  # no longer held: the call is over


@dataclasses.dataclass
class ScriptedTextCall(SpyCall):
    """A real call whose text channels are scripted: the bot says ``texts``, the caller nothing
    (the random model's transcript of noise would hold the tool result back: the aggregator owes
    the context push while the user speaks)."""

    texts: list[str] = dataclasses.field(default_factory=list)

    async def receive(self, timeout: float | None = None) -> StepResult:
        result = await self.inner.receive(timeout)
        text = self.texts.pop(0) if self.texts else ""
        result = dataclasses.replace(result, bot_text=text, transcript="")
        self.steps.append(result)
        return result


async def test_remote_worker_reads_the_tools_and_the_result_as_a_tool_turn() -> None:
    texts = ["", '<tool_call>{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}</tool_call>']
    async with running_worker(WorkerConfig(token=TOKEN, engine=ENGINE_CONFIG)) as worker:
        remote = RemoteWorker(worker.url, TOKEN)
        backend = SpyBackend(remote)
        calls: list[ScriptedTextCall] = []

        async def open_call(*args, **kwargs) -> ScriptedTextCall:  # noqa: ANN002, ANN003
            call = ScriptedTextCall(await remote.open_call(*args, **kwargs), texts=list(texts))
            calls.append(call)
            return call

        backend.open_call = open_call  # type: ignore[method-assign]
        context = LLMContext([], tools=TOOLS)
        pair = LLMContextAggregatorPair(context)
        # The tiny engine's small KV window takes the compact tool list.
        service = MichiLLMService(backend, params=MichiServiceParams(tool_prompt_format="compact"))
        weather = Weather()
        service.register_function("get_weather", weather)
        frames = [LLMRunFrame(), SleepFrame(0.2), *caller_audio(40), SleepFrame(1.5)]
        down, _ = await run(Pipeline([pair.user(), service, pair.assistant()]), frames)
        await remote.close()

    assert weather.calls == [{"city": "Oslo"}]
    injected = [(i.role, i.text) for i in calls[0].injected]
    assert injected == [("system", render_tools_prompt(tool_specs(TOOLS), "compact")), ("tool", RESULT_TURN)]
    assert all(i.result.token_count > 0 for i in calls[0].injected)  # the worker read them
    assert "tool_call" not in spoken(down)


async def test_tools_too_long_for_the_small_embedded_model_are_refused_once_not_a_reconnect_loop() -> None:
    # The embedded default's KV window (256) takes at most 128 tokens of prompt; these tools
    # (bytes, for the tiny tokenizer) do not fit. The call must open anyway and say so once.
    many = ToolsSchema(
        standard_tools=[
            FunctionSchema(
                name=f"lookup_{i}",
                description=f"Look up record number {i} of the restaurant's booking ledger.",
                properties={"record": {"type": "string"}},
                required=["record"],
            )
            for i in range(6)
        ]
    )
    engine = LocalEngine(EngineConfig(preset="tiny", device="cpu", slot_capacity=1, kv_capacity=256))
    spy = SpyBackend(engine)
    service = MichiLLMService(spy, settings=MichiSettings(tools=many))
    try:
        down, up = await run(
            service,
            [
                *model_frames(4),
                Until(lambda: bool(spy.calls) and len(spy.calls[0].steps) >= 4, "the caller's frames stepped"),
            ],
        )
    finally:
        await engine.close()

    assert len(spy.calls) == 1  # opened once, without the prompt: no reconnect loop
    assert len(spy.calls[0].steps) >= 4  # and the caller's frames are stepped
    (refusal,) = kinds(up, ErrorFrame)
    assert not refusal.fatal and "refused a system message" in refusal.error
