"""MichiAI as one Pipecat processor: audio in, audio + text out, in place of STT -> LLM -> TTS.

Pipeline shape (as for Pipecat's other speech-to-speech services)::

    transport.input(), context.user(), MichiLLMService(...), transport.output(), context.assistant()

The model listens and speaks at the same time, one 80 ms step per frame of caller audio. Each
step's ``StepResult`` becomes frames:

- bot audio: ``TTSAudioRawFrame`` only while the model speaks, between ``TTSStartedFrame`` and
  ``TTSStoppedFrame``, wrapped in ``LLMFullResponseStartFrame``/``LLMFullResponseEndFrame``: one
  bot turn per run of speaking frames;
- bot text: ``LLMTextFrame`` (``append_to_context=False``, for RTVI) + ``TTSTextFrame`` (the one
  the assistant aggregator records);
- the user's words, transcribed by the model's listening head: ``InterimTranscriptionFrame``
  upstream as they come, a final ``TranscriptionFrame`` upstream when the user's turn ends (the
  bot starts speaking, or the transcript stays quiet for ``user_turn_gap_frames``), bracketed by
  ``ProposedUserStarted/StoppedSpeakingFrame`` that the recommended
  ``ExternalUserTurnStrategies(enable_interruptions=False)`` resolve into turn frames.

Over 400 lines: about a third is this frames contract and the class docstring; the code is a
flat dispatch (frames in, turn events out) over ``CallSupervisor`` and ``TurnTracker``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from loguru import logger
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    FunctionCallCancelFrame,
    FunctionCallFromLLM,
    FunctionCallResultFrame,
    InputAudioRawFrame,
    InterimTranscriptionFrame,
    InterruptionFrame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMServiceMetadataFrame,
    LLMTextFrame,
    LLMUpdateSettingsFrame,
    ProposedUserStartedSpeakingFrame,
    ProposedUserStoppedSpeakingFrame,
    StartFrame,
    TextType,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    UserAudioRawFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.metrics.metrics import LLMTokenUsage
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection, FrameProcessorSetup
from pipecat.services.llm_service import LLMService
from pipecat.services.settings import LLMSettings
from pipecat.turns.user_turn_strategies import ExternalUserTurnStrategies
from pipecat.utils.time import time_now_iso8601

from pipecat_michi.contract import DuplexBackend, DuplexCall, InjectResult, StepResult
from pipecat_michi.engine.settings import SessionSettingsUpdate
from pipecat_michi.service.audio import OutputResampler
from pipecat_michi.service.context import Injection
from pipecat_michi.service.settings import SESSION_FIELDS, MichiServiceParams, MichiSettings
from pipecat_michi.service.supervisor import CallSupervisor
from pipecat_michi.service.tools import (
    RawToolCall,
    ToolCallError,
    ToolCallParser,
    ToolSpec,
    parse_tool_call,
    render_tool_error,
    render_tools_prompt,
    tool_specs,
)
from pipecat_michi.service.turns import (
    BotAudio,
    BotText,
    BotTurnEnded,
    BotTurnStarted,
    TurnEvent,
    TurnTracker,
    UserTranscript,
    UserTurnEnded,
    UserTurnStarted,
)

#: Key of ``Frame.metadata`` holding the call's frame index on every frame a step produced.
FRAME_INDEX_METADATA_KEY = "michi_frame_index"

#: Sees each piece of bot text before it becomes frames and returns what to forward ("" drops
#: it), e.g. to redact text. Tool calls are taken out before this, by the service itself.
BotTextFilter = Callable[[BotText], Awaitable[str]]

# LLMSettings fields LLMService itself reacts to.
_BASE_FIELDS = {"filter_incomplete_user_turns", "user_turn_completion_config", "use_provider_thinking_default"}
# MichiSettings fields the service reads when it needs them (tools are re-rendered on change).
_TOOL_FIELDS = {"tools", "tool_call_behavior"}

#: Told to the model when the tool set becomes empty mid-call (it read the old list).
NO_TOOLS_PROMPT = "# Tools\n\nNo tools are available now: do not call any."


class MichiLLMService(LLMService):
    """MichiAI full-duplex speech LLM as a Pipecat speech-to-speech service.

    Replaces STT -> LLM -> TTS with one processor between the user and assistant context
    aggregators (``LLMContextAggregatorPair``). The call opens on ``StartFrame`` with the
    constructor's system instruction pinned; the first ``LLMContextFrame`` prefills the
    context's system messages (pinned while no audio has been sent) and history, and later
    ones inject only what is new to the call (see ``pipecat_michi.service.context``): messages
    the app appended, tool results, a RAG passage; never the transcripts and bot text the
    aggregators recorded from this service's own frames. The diff is against what the call has
    read, not against the previous frame, so a context frame an interruption drops from the
    queue is caught up by the next one.

    Turns and interruptions: the model decides itself when to speak and when to yield. When
    the user speaks over the bot and the model yields the floor, the service calls
    ``broadcast_interruption()`` so the output transport flushes the audio it still holds.
    An ``InterruptionFrame`` from elsewhere (an app, RTVI, a local VAD strategy) stops bot
    audio and text at once; nothing more of that speaking run is forwarded, and the next run
    starts a new turn.

    What the model hears of itself: the engine feeds each frame it generated back into the
    model as its own previous audio and text, whether or not the caller heard it. Audio a
    transport flushes on interruption (its playback buffer, typically a few hundred ms) was
    generated, so the model "remembers" saying it, while the caller did not hear it, and the
    assistant aggregator records the text forwarded up to the interruption, which can run ahead
    of the playback the same way. The call's KV cache is not rewound: there is no engine API
    for it, and the gap is bounded by the transport's buffer.

    Backend loss: when receiving or sending fails (a worker connection drops, the engine
    closes the call) or no step arrives for ``step_timeout_s`` while frames are outstanding,
    the service opens a new call, re-sends the system prompt and replays the context. The
    backend retries that open within its own budget (``RemoteWorker``'s ``RetryPolicy`` covers a
    worker restart); when it still fails the service pushes a permanent ``ErrorFrame`` (it
    becomes unusable, the pipeline's ``ProcessorUnusablePolicy`` applies: the agents end the
    call) and drops audio from then on. A call the worker closed for idleness is reopened only
    when caller audio comes again. Every other wait is bounded.

    Metrics: TTFB from the end of user speech (the step of the last transcript text, or a
    ``UserStoppedSpeakingFrame`` when the model transcribed nothing) to the bot's first audio;
    processing time per step (frame sent -> its step handled); prompt-token usage of injections.

    Structure: ``CallSupervisor`` (``supervisor.py``) owns the call (open, send, inject,
    reconnect); ``TurnTracker`` (``turns.py``) turns step results into turn events; this class
    makes frames of those events. Each step's bot text loses its tool calls (``tools.py``) before
    the tracker sees it, then passes through ``bot_text_filter`` (when given) before it becomes
    frames.

    Function calling (``docs/function_calling.md``): the context's tools (else the settings'
    ``tools``) are written into the call's prompt in the backbone's tool format, again whenever
    they change. Tool calls the model writes in its text channel are taken out of the bot text
    (never spoken or recorded as speech) and run through ``LLMService.run_function_calls``, so
    ``register_function`` handlers and Pipecat's function-call frames work as for any LLM; a
    call that is malformed, of an unknown function or with bad arguments is answered to the
    model with an error result. Results reach the call as ``tool`` turns through the context.
    While a call runs, ``tool_call_behavior`` ``hold`` (default) holds bot audio and text back.

    Event handlers: ``on_call_opened(service, call)`` after each (re)opened call.
    """

    Settings = MichiSettings
    Params = MichiServiceParams
    _settings: MichiSettings

    def __init__(
        self,
        backend: DuplexBackend | None = None,
        settings: MichiSettings | None = None,
        system_instruction: str | None = None,
        voice_prompt: np.ndarray | None = None,
        *,
        sample_rate: int | None = None,
        user_id: str = "",
        params: MichiServiceParams | None = None,
        bot_text_filter: BotTextFilter | None = None,
        **kwargs: Any,
    ) -> None:
        """Create the service.

        Args:
            backend: Where calls run: ``RemoteWorker(url, token)`` or ``LocalEngine(...)``.
                ``None`` embeds ``LocalEngine()`` (the demo checkpoint, CPU), owned and closed by
                this service; a backend passed in is shared and left open.
            settings: Settings delta over the defaults (those of ``SessionSettings``).
            system_instruction: System prompt, pinned in the call's context.
            voice_prompt: Zero-shot voice: a few seconds of 24 kHz mono audio (int16 or float).
            sample_rate: Output audio rate; default: the pipeline's ``audio_out_sample_rate``.
            user_id: ``user_id`` of transcription frames when the input audio names no user.
            params: Turn-taking and robustness tunables.
            bot_text_filter: Rewrites (or drops, returning "") each piece of bot text before it
                becomes frames and enters the context's record of what the bot said.
            **kwargs: Passed to ``LLMService``.
        """
        store = MichiSettings.initial(system_instruction)
        if settings is not None:
            store.apply_update(settings)
        super().__init__(settings=store, **kwargs)
        self._owns_backend = backend is None
        if backend is None:
            # Imported here: the engine needs torch (the [engine] extra); a RemoteWorker does not.
            from pipecat_michi.engine.call import LocalEngine

            backend = LocalEngine()
        self._backend: DuplexBackend = backend
        self._init_sample_rate = sample_rate
        self._out_rate = sample_rate  # or the pipeline's, known at setup (before any call opens)
        self._user_id = user_id
        self._params = params or MichiServiceParams()
        self._bot_text_filter = bot_text_filter

        self._supervisor = CallSupervisor(
            self._backend,
            self._params,
            voice_prompt=voice_prompt,
            session_settings=self._session_settings,
            system_prompt=self._system_prompt,
            on_step=self._handle_step,
            on_call_opened=self._handle_call_opened,
            on_call_lost=self._close_turns,
            on_injected=self._handle_injected,
            on_refused=self._handle_refused,
            on_gave_up=self._handle_gave_up,
            name=str(self),
        )
        self._context: LLMContext | None = None
        self._tool_parser = ToolCallParser()
        self._tool_call_open_frames = 0  # steps the current call text has stayed open
        self._tools_prompt_sent: str | None = None  # the tools prompt the live call has read
        self._tool_calls_in_flight: set[str] = set()  # tool_call_ids without a result yet
        self._tool_error_tasks: set[asyncio.Task] = set()
        self._receive_task: asyncio.Task | None = None
        self._output_lock = asyncio.Lock()  # one step's frames vs. an interruption
        self._out: OutputResampler | None = None
        self._turns = self._new_turn_tracker()

        self._register_event_handler("on_call_opened")

    def _new_turn_tracker(self) -> TurnTracker:
        return TurnTracker(
            user_turn_gap_frames=self._params.user_turn_gap_frames,
            barge_in_window_frames=self._params.barge_in_window_frames,
            text_lead_frames=self._params.text_lead_frames,
        )

    # --- service description -------------------------------------------------------------

    def can_generate_metrics(self) -> bool:
        return True

    def service_metadata_frame(self) -> LLMServiceMetadataFrame:
        """Recommend external turn strategies, driven by this service's proposed turns.

        As for ``OpenAILiveLLMService``: the model takes and yields turns itself, so the user
        aggregator resolves the ``Proposed*`` frames this service broadcasts without
        interrupting (this service interrupts when the model yields to the user). Not flagged
        ``is_realtime_service``: the service ends user turns itself and pushes their final
        transcript then, so each user turn is written to the context as it ends.
        """
        return LLMServiceMetadataFrame(
            service_name=self.name,
            user_turn_strategies=ExternalUserTurnStrategies(enable_interruptions=False),
        )

    @property
    def call(self) -> DuplexCall | None:
        """The live call, ``None`` between calls (before start, while reconnecting, after end)."""
        return self._supervisor.call

    # --- lifecycle -----------------------------------------------------------------------

    async def setup(self, setup: FrameProcessorSetup) -> None:
        await super().setup(setup)
        self._out_rate = self._init_sample_rate or setup.audio_out_sample_rate

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await self._supervisor.start()
        self._receive_task = self.create_task(self._supervisor.run(), "michi-receive")

    async def stop(self, frame: EndFrame) -> None:
        await super().stop(frame)
        await self._supervisor.drain()  # let the steps of the audio already sent come out first
        await self._shutdown(graceful=True)

    async def cancel(self, frame: CancelFrame) -> None:
        await super().cancel(frame)
        await self._shutdown(graceful=False)

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._shutdown(graceful=False)
        if self._owns_backend:
            await self._backend.close()

    async def _shutdown(self, *, graceful: bool) -> None:
        """Stop receiving, close open turns (gracefully) and the call. Idempotent."""
        self._supervisor.stop_receiving()
        if self._receive_task is not None:
            await self.cancel_task(self._receive_task, timeout=self._params.close_timeout_s)
            self._receive_task = None
        for task in list(self._tool_error_tasks):
            await self.cancel_task(task, timeout=self._params.close_timeout_s)
        if graceful:
            await self._close_turns()
        await self._supervisor.close()

    # --- settings ------------------------------------------------------------------------

    def _system_prompt(self) -> str | None:
        """The pinned prompt of a new call: the system instruction, then the tools."""
        instruction = self._settings.system_instruction
        parts = [instruction if isinstance(instruction, str) else None, self._tools_prompt()]
        return "\n\n".join(part for part in parts if part) or None

    def _tools(self) -> list[ToolSpec]:
        """The tools the model may call: the context's, else the settings'."""
        specs = tool_specs(self._context.tools) if self._context is not None else []
        return specs or tool_specs(self._settings.tools)

    def _tools_prompt(self) -> str | None:
        tools = self._tools()
        return render_tools_prompt(tools, self._params.tool_prompt_format) if tools else None

    async def _sync_tools(self) -> None:
        """Tell the live call about a changed tool set (a new call reads it in its prompt)."""
        prompt = self._tools_prompt()
        if prompt == self._tools_prompt_sent or self._supervisor.call is None:
            return
        logger.debug(f"{self}: the tool set changed; injecting it into the call")
        await self._supervisor.inject(Injection("system", prompt or NO_TOOLS_PROMPT))
        self._tools_prompt_sent = prompt

    def _session_settings(self) -> SessionSettingsUpdate:
        return self._settings.session_update()

    async def _update_settings(self, delta: LLMSettings) -> dict[str, Any]:
        """Apply a settings delta; sampling fields reach the live call at once."""
        changed = await super()._update_settings(delta)
        session_fields = [name for name in SESSION_FIELDS if name in changed]
        if session_fields:
            await self._update_call_settings(session_fields, changed)
        if "system_instruction" in changed and isinstance(self._settings.system_instruction, str):
            await self._supervisor.inject(Injection("system", self._settings.system_instruction))
        if "tools" in changed:
            await self._sync_tools()
        self._warn_unhandled_updated_settings(
            changed.keys() - set(SESSION_FIELDS) - _BASE_FIELDS - _TOOL_FIELDS - {"system_instruction"}
        )
        return changed

    async def _update_call_settings(self, names: list[str], previous: dict[str, Any]) -> None:
        try:
            update = self._settings.session_update(names)
        except ValueError as e:
            wanted = {name: getattr(self._settings, name) for name in names}
            for name in names:
                setattr(self._settings, name, previous[name])
            await self.push_error(error_msg=f"Invalid MichiAI settings {wanted}: {e}", exception=e)
            return
        await self._supervisor.update_settings(update)

    # --- frames in -----------------------------------------------------------------------

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)

        if isinstance(frame, InputAudioRawFrame):
            await self._handle_input_audio(frame)
        elif isinstance(frame, LLMContextFrame):
            self._context = frame.context
            await self._sync_tools()
            await self._supervisor.set_context(frame.context)
            return  # consumed, as by any LLM service
        elif isinstance(frame, LLMUpdateSettingsFrame):
            return  # applied (or passed on, when addressed to another service) by LLMService
        elif isinstance(frame, InterruptionFrame):
            await self._handle_interruption()
        elif isinstance(frame, UserStoppedSpeakingFrame):
            self._turns.user_stopped_speaking(time.time())

        await self.push_frame(frame, direction)

    async def _handle_input_audio(self, frame: InputAudioRawFrame) -> None:
        if isinstance(frame, UserAudioRawFrame) and frame.user_id:
            self._user_id = frame.user_id
        await self._supervisor.send_audio(frame.audio, frame.sample_rate, frame.num_channels)

    async def _handle_interruption(self) -> None:
        async with self._output_lock:
            if self._turns.interrupt():
                logger.debug(f"{self}: interrupted; muting the rest of this speaking run")
            if self._out is not None:
                await self._out.reset()

    # --- the call's callbacks ------------------------------------------------------------

    async def push_frame(self, frame: Frame, direction: FrameDirection = FrameDirection.DOWNSTREAM) -> None:
        # LLMService pushes a call's result (or its cancellation) from its runner: the call is
        # no longer in flight, so the bot stops holding.
        if isinstance(frame, FunctionCallCancelFrame) or (
            isinstance(frame, FunctionCallResultFrame) and (frame.properties is None or frame.properties.is_final)
        ):
            self._tool_calls_in_flight.discard(frame.tool_call_id)
        await super().push_frame(frame, direction)

    async def _handle_call_opened(self, call: DuplexCall) -> None:
        self._tools_prompt_sent = self._tools_prompt()  # part of the new call's pinned prompt
        self._tool_parser = ToolCallParser()  # a call half-written in the old call is gone
        self._tool_call_open_frames = 0
        out_rate = self._out_rate or call.sample_rate_hz
        self._out = OutputResampler(call.sample_rate_hz, out_rate, self._params.resampler_quality)
        await self._call_event_handler("on_call_opened", call)

    async def _handle_injected(self, result: InjectResult) -> None:
        await self.start_llm_usage_metrics(
            LLMTokenUsage(prompt_tokens=result.token_count, completion_tokens=0, total_tokens=result.token_count)
        )

    async def _handle_refused(self, injection: Injection, error: Exception) -> None:
        await self.push_error(error_msg=f"MichiAI refused a {injection.role} message: {error}", exception=error)

    async def _handle_gave_up(self, message: str, failure: Exception) -> None:
        # Permanent: the processor becomes unusable and the pipeline's ProcessorUnusablePolicy
        # applies (the agents end the call); Pipecat deprecated ErrorFrame.fatal for this.
        await self.push_error(error_msg=message, exception=failure, force_treat_as_permanent=True)

    async def _close_turns(self) -> None:
        """Close the open bot and user turns, keeping turn and response frames balanced."""
        async with self._output_lock:
            for event in self._turns.close():
                await self._handle_turn_event(event)

    # --- step results -> frames ----------------------------------------------------------

    async def _handle_step(self, result: StepResult, sent_time: float | None) -> None:
        async with self._output_lock:
            if sent_time is not None:
                await self.start_processing_metrics(start_time=sent_time)
                await self.stop_processing_metrics()
            result = await self._take_tool_calls(result)
            for event in self._turns.step(result, sent_time or time.time()):
                await self._handle_turn_event(event)

    # --- tool calls out of the text channel ----------------------------------------------

    async def _take_tool_calls(self, result: StepResult) -> StepResult:
        """Run the tool calls in this step's bot text; the result with only the text to speak."""
        spoken, raw_calls = self._tool_parser.feed(result.bot_text)
        if self._tool_parser.in_call:
            self._tool_call_open_frames += 1
            if self._tool_call_open_frames > self._params.max_tool_call_frames:
                raw_calls += self._tool_parser.end_turn()[1]
                self._tool_call_open_frames = 0
        else:
            self._tool_call_open_frames = 0
        for raw in raw_calls:
            await self._run_tool_calls(raw)
        return result if spoken == result.bot_text else dataclasses.replace(result, bot_text=spoken)

    async def _run_tool_calls(self, raw: RawToolCall) -> None:
        calls: list[FunctionCallFromLLM] = []
        for outcome in parse_tool_call(raw, self._tools()):
            if isinstance(outcome, ToolCallError):
                logger.warning(f"{self}: refused a tool call of the model: {outcome.message}")
                self._inject_later(Injection("tool", render_tool_error(outcome)))
                continue
            tool_call_id = f"michi_{uuid.uuid4().hex[:16]}"
            self._supervisor.record_own_tool_call(tool_call_id)
            calls.append(
                FunctionCallFromLLM(
                    function_name=outcome.name,
                    tool_call_id=tool_call_id,
                    arguments=outcome.arguments,
                    context=self._context,
                )
            )
        if calls:
            logger.debug(f"{self}: the model called {[(c.function_name, c.arguments) for c in calls]}")
            self._tool_calls_in_flight.update(c.tool_call_id for c in calls)
            await self.run_function_calls(calls)

    def _inject_later(self, injection: Injection) -> None:
        """Inject off the receive loop, which must not wait on the call it is reading."""
        task = self.create_task(self._supervisor.inject(injection), "michi-tool-error")
        self._tool_error_tasks.add(task)
        task.add_done_callback(self._tool_error_tasks.discard)

    def _holding(self) -> bool:
        return bool(self._tool_calls_in_flight) and self._settings.tool_call_behavior == "hold"

    # --- turn events -> frames -----------------------------------------------------------

    async def _handle_turn_event(self, event: TurnEvent) -> None:
        """One turn event -> frames. Holds ``_output_lock``."""
        if isinstance(event, (BotAudio, BotText)) and self._holding():
            return  # a tool call runs and the bot holds the floor in silence
        if isinstance(event, BotAudio):
            await self._handle_bot_audio(event)
        elif isinstance(event, BotText):
            await self._handle_bot_text(event)
        elif isinstance(event, UserTurnStarted):
            await self.broadcast_frame(ProposedUserStartedSpeakingFrame)
        elif isinstance(event, UserTranscript):
            frame = InterimTranscriptionFrame(event.text, self._user_id, time_now_iso8601())
            await self.push_frame(frame, FrameDirection.UPSTREAM)
        elif isinstance(event, UserTurnEnded):
            await self._handle_user_turn_ended(event)
        elif isinstance(event, BotTurnStarted):
            await self._handle_bot_turn_started(event)
        elif isinstance(event, BotTurnEnded):
            await self._handle_bot_turn_ended(event)

    async def _handle_bot_audio(self, event: BotAudio) -> None:
        if self._out is None:
            return
        audio = await self._out.convert(event.audio)
        if audio:
            frame = TTSAudioRawFrame(audio=audio, sample_rate=self._out.out_rate_hz, num_channels=1)
            frame.metadata[FRAME_INDEX_METADATA_KEY] = event.frame_index
            await self.push_frame(frame)

    async def _handle_bot_text(self, event: BotText) -> None:
        # A model's byte tokens can decode to control bytes or U+FFFD (random or small models do):
        # never text that a user, a TTS-text consumer or the context should see.
        event = BotText("".join(ch for ch in event.text if ch.isprintable() and ch != "\ufffd"), event.frame_index)
        text = event.text if self._bot_text_filter is None else await self._bot_text_filter(event)
        if not text:
            return
        self._supervisor.record_own("assistant", text)
        # RTVI reads LLMTextFrame; the assistant aggregator records the TTSTextFrame, so the
        # LLMTextFrame must not be appended to the context as well.
        llm_text = LLMTextFrame(text)
        llm_text.append_to_context = False
        tts_text = TTSTextFrame(text, text_type=TextType.TOKEN)
        tts_text.includes_inter_frame_spaces = True  # model text carries its own spaces
        for frame in (llm_text, tts_text):
            frame.metadata[FRAME_INDEX_METADATA_KEY] = event.frame_index
            await self.push_frame(frame)

    async def _handle_bot_turn_started(self, event: BotTurnStarted) -> None:
        await self.push_frame(LLMFullResponseStartFrame())
        await self.push_frame(TTSStartedFrame())
        if event.speech_end_time is not None:
            await self.start_ttfb_metrics(start_time=event.speech_end_time)
            await self.stop_ttfb_metrics()

    async def _handle_bot_turn_ended(self, event: BotTurnEnded) -> None:
        if self._out is not None:
            await self._out.reset()
        if event.muted:
            return  # the InterruptionFrame already ended this turn downstream
        if event.interrupted_by_user:
            # The model yielded to the user: flush what the transport still holds. Downstream,
            # the InterruptionFrame ends the turn (the assistant aggregator records it).
            logger.debug(f"{self}: the model yielded to the user; interrupting")
            await self.broadcast_interruption()
            return
        await self.push_frame(TTSStoppedFrame())
        await self.push_frame(LLMFullResponseEndFrame())

    async def _handle_user_turn_ended(self, event: UserTurnEnded) -> None:
        if event.text:
            self._supervisor.record_own("user", event.text)  # before the aggregator can echo it back
            frame = TranscriptionFrame(event.text, self._user_id, time_now_iso8601(), finalized=True)
            await self.push_frame(frame, FrameDirection.UPSTREAM)
        await self.broadcast_frame(ProposedUserStoppedSpeakingFrame)
