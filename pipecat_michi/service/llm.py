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
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from loguru import logger
from pipecat.audio.resamplers.base_audio_resampler import SoxrQuality
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
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
from pipecat.utils.types import NOT_GIVEN, NotGiven, is_given
from pydantic import BaseModel, ConfigDict, Field

from pipecat_michi.engine.call import DuplexBackend, DuplexCall, LocalEngine
from pipecat_michi.engine.engine import InjectResult, SessionClosedError, StepResult
from pipecat_michi.engine.settings import SessionSettings, SessionSettingsUpdate
from pipecat_michi.service.audio import DEFAULT_QUALITY, InputFramer, OutputResampler
from pipecat_michi.service.context import ContextSync, Injection

#: Key of ``Frame.metadata`` holding the call's frame index on every frame a step produced.
FRAME_INDEX_METADATA_KEY = "michi_frame_index"

# SessionSettings fields, settable through MichiSettings, with the type the engine wants.
_SESSION_FIELDS: dict[str, type] = {
    "temperature": float,
    "top_k": int,
    "flow_steps": int,
    "speak_threshold": float,
    "seed": int,
}
# LLMSettings fields LLMService itself reacts to.
_BASE_FIELDS = {"filter_incomplete_user_turns", "user_turn_completion_config", "use_provider_thinking_default"}


class BackendStalledError(RuntimeError):
    """The backend took frames but returned no step for ``step_timeout_s``."""


def _backend_lost(error: BaseException) -> bool:
    """Whether an injection failed because the call is gone, rather than refused.

    Both backends end a call with ``SessionClosedError`` (the remote's
    ``WorkerConnectionError`` is one); a dropped connection or a request left unanswered
    (``OSError``, ``TimeoutError``) means the same. Anything else is a refusal of that message.
    """
    return isinstance(error, (SessionClosedError, OSError, TimeoutError))


@dataclass
class MichiSettings(LLMSettings):
    """Runtime-updatable settings of ``MichiLLMService``.

    ``temperature``, ``top_k`` and ``seed`` (from ``LLMSettings``) and ``flow_steps``,
    ``speak_threshold`` map onto the call's ``SessionSettings`` and change live with an
    ``LLMUpdateSettingsFrame(delta=MichiSettings(...))``. A new ``system_instruction`` is
    injected into the running call as a system turn. The other ``LLMSettings`` fields
    (``max_tokens``, ``top_p``, penalties) do not apply to a duplex model and are ``None``.

    Parameters:
        flow_steps: Euler steps of the flow-matching speaking head per frame.
        speak_threshold: Speak probability above which the model takes the turn.
    """

    flow_steps: int | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    speak_threshold: float | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)


class MichiServiceParams(BaseModel):
    """Tunables of ``MichiLLMService`` (timings in frames are of the call's 80 ms frames).

    Parameters:
        user_turn_gap_frames: Frames without new transcript text that end the user's turn.
        barge_in_window_frames: The model yielding the floor counts as a barge-in when the user
            was heard within this many frames of it.
        text_lead_frames: Bot text produced while silent is kept for this many frames and
            spoken with the next turn (inner-monologue text may lead its audio); older is dropped.
        step_timeout_s: No step this long while frames are outstanding means the backend is lost.
        open_timeout_s: Limit on opening a call (model load on the first local call included).
        inject_timeout_s: Limit on one context injection.
        drain_timeout_s: On ``EndFrame``, how long to wait for the steps of frames already sent.
        close_timeout_s: Limit on closing a call.
        reconnect_attempts: New calls tried after the backend is lost, before giving up.
        reconnect_backoff_s: Wait before the first attempt; doubled for each next one.
        max_held_frames: Caller frames held back while a pinned prompt is prefilled.
        resampler_quality: soxr quality of the input and output resamplers; see
            ``pipecat_michi.service.audio.DEFAULT_QUALITY`` for the latency each costs.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    user_turn_gap_frames: int = Field(default=7, ge=1)
    barge_in_window_frames: int = Field(default=3, ge=1)
    text_lead_frames: int = Field(default=4, ge=0)
    step_timeout_s: float = Field(default=5.0, gt=0)
    open_timeout_s: float = Field(default=60.0, gt=0)
    inject_timeout_s: float = Field(default=10.0, gt=0)
    drain_timeout_s: float = Field(default=2.0, ge=0)
    close_timeout_s: float = Field(default=5.0, gt=0)
    reconnect_attempts: int = Field(default=3, ge=0)
    reconnect_backoff_s: float = Field(default=0.5, ge=0)
    max_held_frames: int = Field(default=25, ge=1)
    resampler_quality: SoxrQuality = DEFAULT_QUALITY


@dataclass
class _UserTurn:
    open: bool = False
    text: str = ""
    quiet_frames: int = 0  # steps since the last transcript text


@dataclass
class _BotTurn:
    open: bool = False  # inside a run of speaking frames
    muted: bool = False  # an InterruptionFrame cut this run: forward nothing more of it


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
    the service opens a new call with back-off, re-sends the system prompt and replays the
    context; after ``reconnect_attempts`` failures it pushes an ``ErrorFrame`` (the service
    becomes unusable, the pipeline's ``ProcessorUnusablePolicy`` applies) and drops audio
    from then on. No wait is unbounded.

    Metrics: TTFB from the end of user speech (the step of the last transcript text, or a
    ``UserStoppedSpeakingFrame`` when the model transcribed nothing) to the bot's first audio;
    processing time per step (frame sent -> its step handled); prompt-token usage of injections.

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
        **kwargs: Any,
    ) -> None:
        """Create the service.

        Args:
            backend: Where calls run: ``RemoteWorker(url, token)`` or ``LocalEngine(...)``.
                ``None`` embeds ``LocalEngine()`` (tiny preset, CPU), owned and closed by
                this service; a backend passed in is shared and left open.
            settings: Settings delta over the defaults (those of ``SessionSettings``).
            system_instruction: System prompt, pinned in the call's context.
            voice_prompt: Zero-shot voice: a few seconds of 24 kHz mono audio (int16 or float).
            sample_rate: Output audio rate; default: the pipeline's ``audio_out_sample_rate``.
            user_id: ``user_id`` of transcription frames when the input audio names no user.
            params: Turn-taking and robustness tunables.
            **kwargs: Passed to ``LLMService``.
        """
        defaults = SessionSettings()
        store = MichiSettings(
            model="michi",
            system_instruction=system_instruction,
            temperature=defaults.temperature,
            max_tokens=None,
            top_p=None,
            top_k=defaults.top_k,
            frequency_penalty=None,
            presence_penalty=None,
            seed=defaults.seed,
            filter_incomplete_user_turns=False,
            user_turn_completion_config=None,
            use_provider_thinking_default=False,
            flow_steps=defaults.flow_steps,
            speak_threshold=defaults.speak_threshold,
        )
        if settings is not None:
            store.apply_update(settings)
        super().__init__(settings=store, **kwargs)
        self._owns_backend = backend is None
        self._backend: DuplexBackend = backend if backend is not None else LocalEngine()
        self._voice_prompt = voice_prompt
        self._init_sample_rate = sample_rate
        self._out_rate = sample_rate or 24000
        self._user_id = user_id
        self._params = params or MichiServiceParams()

        self._call: DuplexCall | None = None
        self._call_ready = False  # opened and its context replayed
        self._call_lock = asyncio.Lock()  # opening, replaying and injecting: one at a time
        self._output_lock = asyncio.Lock()  # one step's frames vs. an interruption
        self._send_lock = asyncio.Lock()  # frame indices are given in send order
        self._receive_task: asyncio.Task | None = None
        self._closing = False
        self._failure: BaseException | None = None

        self._context: LLMContext | None = None
        self._sync = ContextSync()
        self._unpinned_sent = False
        self._hold_audio = False
        self._held: collections.deque[np.ndarray] = collections.deque(maxlen=self._params.max_held_frames)

        self._framer: InputFramer | None = None
        self._out: OutputResampler | None = None
        self._next_index = 0
        self._last_result_index = -1
        self._sent_at: dict[int, float] = {}
        self._caught_up = asyncio.Event()
        self._caught_up.set()

        self._user = _UserTurn()
        self._bot = _BotTurn()
        self._lead_text: collections.deque[str] = collections.deque(maxlen=self._params.text_lead_frames or None)
        self._speech_end_time: float | None = None  # wall time of the last step with user text
        self._vad_speech_end_time: float | None = None  # from UserStoppedSpeakingFrame

        self._register_event_handler("on_call_opened")

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
        return self._call

    # --- lifecycle -----------------------------------------------------------------------

    async def setup(self, setup: FrameProcessorSetup) -> None:
        await super().setup(setup)
        self._out_rate = self._init_sample_rate or setup.audio_out_sample_rate

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        self._closing = False
        try:
            await self._open_call()
        except Exception as e:  # the receive task retries with back-off
            logger.warning(f"{self}: could not open a MichiAI call: {e!r}")
            self._failure = e
        self._receive_task = self.create_task(self._receive_loop(), "michi-receive")

    async def stop(self, frame: EndFrame) -> None:
        await super().stop(frame)
        if self._call is not None and self._call_ready:
            try:  # let the steps of the audio already sent come out first
                await asyncio.wait_for(self._caught_up.wait(), self._params.drain_timeout_s)
            except TimeoutError:
                logger.debug(f"{self}: ending without the last steps (drain timed out)")
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
        self._closing = True
        if self._receive_task is not None:
            await self.cancel_task(self._receive_task, timeout=self._params.close_timeout_s)
            self._receive_task = None
        if graceful:
            async with self._output_lock:
                await self._close_turns()
        call, self._call, self._call_ready = self._call, None, False
        if call is not None:
            await self._close_quietly(call)

    async def _close_quietly(self, call: DuplexCall) -> None:
        try:
            await asyncio.wait_for(call.close(), self._params.close_timeout_s)
        except Exception as e:
            logger.debug(f"{self}: closing call {call.session_id[:8]}: {e!r}")

    # --- settings ------------------------------------------------------------------------

    def _session_settings(self) -> SessionSettings:
        values = {}
        for name, kind in _SESSION_FIELDS.items():
            value = getattr(self._settings, name)
            if is_given(value) and value is not None:
                values[name] = kind(value)
        return SessionSettings(**values)

    async def _update_settings(self, delta: LLMSettings) -> dict[str, Any]:
        """Apply a settings delta; sampling fields reach the live call at once."""
        changed = await super()._update_settings(delta)
        session_fields = [name for name in _SESSION_FIELDS if name in changed]
        if session_fields:
            await self._update_call_settings(session_fields, changed)
        if "system_instruction" in changed and isinstance(self._settings.system_instruction, str):
            await self._inject_now(Injection("system", self._settings.system_instruction))
        self._warn_unhandled_updated_settings(
            changed.keys() - _SESSION_FIELDS.keys() - _BASE_FIELDS - {"system_instruction"}
        )
        return changed

    async def _update_call_settings(self, names: list[str], previous: dict[str, Any]) -> None:
        values: dict[str, Any] = {}
        try:
            for name in names:
                value = getattr(self._settings, name)
                if value is None and name != "seed":
                    continue  # None: keep the call's value (only a null seed means "draw one")
                values[name] = None if value is None else _SESSION_FIELDS[name](value)
            update = SessionSettingsUpdate(**values)
        except (TypeError, ValueError) as e:
            for name in names:
                setattr(self._settings, name, previous[name])
            await self.push_error(error_msg=f"Invalid MichiAI settings {values or names}: {e}", exception=e)
            return
        call = self._call
        if call is None:
            return  # applied when the call (re)opens
        try:
            await asyncio.wait_for(call.update_settings(update), self._params.inject_timeout_s)
        except Exception as e:
            logger.warning(f"{self}: settings update did not reach the call ({e!r}); it applies on reconnect")

    # --- frames in -----------------------------------------------------------------------

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)

        if isinstance(frame, InputAudioRawFrame):
            await self._handle_input_audio(frame)
        elif isinstance(frame, LLMContextFrame):
            await self._handle_context(frame.context)
            return  # consumed, as by any LLM service
        elif isinstance(frame, LLMUpdateSettingsFrame):
            return  # applied (or passed on, when addressed to another service) by LLMService
        elif isinstance(frame, InterruptionFrame):
            await self._handle_interruption()
        elif isinstance(frame, UserStoppedSpeakingFrame):
            self._handle_user_stopped_speaking()

        await self.push_frame(frame, direction)

    async def _handle_input_audio(self, frame: InputAudioRawFrame) -> None:
        if isinstance(frame, UserAudioRawFrame) and frame.user_id:
            self._user_id = frame.user_id
        call, framer = self._call, self._framer
        if call is None or not self._call_ready or framer is None:
            return  # no call (starting, reconnecting, given up): the caller's audio is lost
        for pcm in await framer.push(frame.audio, frame.sample_rate, frame.num_channels):
            await self._send_frame(call, pcm)

    async def _handle_context(self, context: LLMContext) -> None:
        self._context = context
        async with self._call_lock:
            call = self._call
            if call is None or not self._call_ready:
                return  # replayed when the call (re)opens
            try:
                await self._sync_context(call)
            except Exception as e:
                logger.warning(f"{self}: context injection failed: {e!r}")
                await self._drop_call(call, e)

    async def _handle_interruption(self) -> None:
        async with self._output_lock:
            if self._bot.open and not self._bot.muted:
                logger.debug(f"{self}: interrupted; muting the rest of this speaking run")
                self._bot.muted = True
            if self._out is not None:
                await self._out.reset()

    def _handle_user_stopped_speaking(self) -> None:
        if not self._bot.open:
            self._vad_speech_end_time = time.time()

    # --- the call ------------------------------------------------------------------------

    def _system_prompt(self) -> str | None:
        instruction = self._settings.system_instruction
        return instruction if isinstance(instruction, str) and instruction else None

    async def _open_call(self) -> None:
        """Open a call, then replay the context known so far. Raises when either fails."""
        async with self._call_lock:
            prompt = self._system_prompt()
            call = await asyncio.wait_for(
                self._backend.open_call(self._session_settings(), prompt, self._voice_prompt),
                self._params.open_timeout_s,
            )
            self._call, self._call_ready = call, False
            quality = self._params.resampler_quality
            self._framer = InputFramer(call.sample_rate_hz, call.frame_samples, quality)
            self._out = OutputResampler(call.sample_rate_hz, self._out_rate, quality)
            self._next_index, self._last_result_index = 0, -1
            self._sent_at.clear()
            self._caught_up.set()
            self._unpinned_sent = False
            self._sync.reset()
            if prompt:
                self._sync.record_own("system", prompt)
            try:
                if self._context is not None:
                    await self._sync_context(call)
            except BaseException:
                self._call = None
                await self._close_quietly(call)
                raise
            self._call_ready = True
        logger.info(f"{self}: MichiAI call {call.session_id[:8]} open")
        await self._call_event_handler("on_call_opened", call)

    async def _sync_context(self, call: DuplexCall) -> None:
        """Inject what of ``self._context`` the call has not read. Holds ``_call_lock``."""
        assert self._context is not None
        for fingerprint, message in self._sync.new_messages(self._context.messages):
            injection = self._sync.take(message)
            if injection is not None:
                await self._inject(call, injection)
            self._sync.commit(fingerprint)

    async def _inject_now(self, injection: Injection) -> None:
        async with self._call_lock:
            call = self._call
            if call is None or not self._call_ready:
                return
            try:
                await self._inject(call, injection)
            except Exception as e:
                await self._drop_call(call, e)

    async def _inject(self, call: DuplexCall, injection: Injection) -> None:
        """Prefill one message. Leading system text is pinned (kept through KV eviction) while
        no audio has entered the call; caller frames arriving meanwhile wait, in order.

        A message the backend refuses (too long for the KV window: ``ValueError`` locally, a
        ``WorkerError`` remotely) is reported and skipped, after one unpinned retry for pinned
        text; a lost backend (``_backend_lost``) propagates.
        """
        async with self._send_lock:
            pinned = injection.role == "system" and self._next_index == 0 and not self._unpinned_sent
            self._hold_audio = pinned
        try:
            try:
                result = await self._inject_once(call, injection, pinned)
            except Exception as e:
                if _backend_lost(e) or not pinned:
                    raise
                logger.warning(f"{self}: system text cannot be pinned ({e}); injecting it unpinned")
                pinned = False
                result = await self._inject_once(call, injection, pinned)
        except Exception as e:
            if _backend_lost(e):
                raise
            await self.push_error(error_msg=f"MichiAI refused a {injection.role} message: {e}", exception=e)
            return
        finally:
            if self._hold_audio:
                await self._release_audio(call)
        self._unpinned_sent |= not pinned
        logger.debug(f"{self}: injected {result.token_count} tokens as {injection.role} (pinned={pinned})")
        await self.start_llm_usage_metrics(
            LLMTokenUsage(prompt_tokens=result.token_count, completion_tokens=0, total_tokens=result.token_count)
        )

    async def _inject_once(self, call: DuplexCall, injection: Injection, pinned: bool) -> InjectResult:
        return await asyncio.wait_for(
            call.inject_text(injection.text, injection.role, pinned), self._params.inject_timeout_s
        )

    async def _send_frame(self, call: DuplexCall, pcm: np.ndarray) -> None:
        async with self._send_lock:
            if self._hold_audio:
                self._held.append(pcm)
                return
            await self._send_now(call, pcm)

    async def _release_audio(self, call: DuplexCall) -> None:
        async with self._send_lock:
            self._hold_audio = False
            while self._held:
                await self._send_now(call, self._held.popleft())

    async def _send_now(self, call: DuplexCall, pcm: np.ndarray) -> None:
        """Send one frame. Holds ``_send_lock``."""
        if self._call is not call:
            return
        index = self._next_index
        self._next_index += 1
        self._sent_at[index] = time.time()
        self._caught_up.clear()
        try:
            await call.send_audio(pcm, index)
        except Exception as e:
            logger.warning(f"{self}: sending audio failed: {e!r}")
            await self._drop_call(call, e)

    async def _drop_call(self, call: DuplexCall, failure: BaseException) -> None:
        """Let go of a failed call: close its open turns, close it; the receive task reconnects."""
        if self._call is not call:
            return
        self._call, self._call_ready, self._failure = None, False, failure
        async with self._output_lock:
            await self._close_turns()
        await self._close_quietly(call)

    async def _reconnect(self) -> bool:
        """Open a new call with back-off; on giving up push an ``ErrorFrame`` and return False."""
        failure = self._failure
        logger.warning(f"{self}: MichiAI backend lost ({failure!r}); reconnecting")
        for attempt in range(self._params.reconnect_attempts):
            await asyncio.sleep(self._params.reconnect_backoff_s * 2**attempt)
            try:
                await self._open_call()
                logger.info(f"{self}: reconnected on attempt {attempt + 1}")
                return True
            except Exception as e:
                failure = e
                logger.warning(f"{self}: reconnect attempt {attempt + 1} failed: {e!r}")
        await self.push_error(
            error_msg=(
                f"MichiAI backend unavailable: the call was lost ({self._failure!r}) and "
                f"{self._params.reconnect_attempts} reconnect attempts failed (last: {failure!r})"
            ),
            exception=failure if isinstance(failure, Exception) else None,
            force_treat_as_permanent=True,
        )
        return False

    async def _receive_loop(self) -> None:
        """Owned by the service: step results -> frames, and reconnection when the call fails."""
        while not self._closing:
            call = self._call
            if call is None:
                if not await self._reconnect():
                    return
                continue
            try:
                result = await call.receive(timeout=self._params.step_timeout_s)
            except TimeoutError:
                if self._call is call and self._last_result_index < self._next_index - 1:
                    await self._drop_call(call, BackendStalledError(f"no step for {self._params.step_timeout_s} s"))
                continue
            except Exception as e:
                if self._closing:
                    return
                await self._drop_call(call, e)
                continue
            if self._call is call:
                await self._handle_step(result)

    # --- step results -> frames ----------------------------------------------------------

    async def _handle_step(self, result: StepResult) -> None:
        async with self._output_lock:
            sent = self._sent_at.pop(result.frame_index, None)
            if sent is not None:
                await self.start_processing_metrics(start_time=sent)
                await self.stop_processing_metrics()
            if len(self._sent_at) > 64:  # frames the engine dropped as late never get a step
                for index in [i for i in self._sent_at if i < result.frame_index]:
                    del self._sent_at[index]
            await self._handle_transcript(result, sent or time.time())
            await self._handle_bot_speech(result)
        self._last_result_index = max(self._last_result_index, result.frame_index)
        if self._last_result_index >= self._next_index - 1:
            self._caught_up.set()

    async def _handle_transcript(self, result: StepResult, sent_time: float) -> None:
        user, text = self._user, result.transcript
        if text and (user.open or text.strip()):
            if not user.open:
                user.open, user.text = True, ""
                await self.broadcast_frame(ProposedUserStartedSpeakingFrame)
            user.text += text
            user.quiet_frames = 0
            self._speech_end_time = sent_time
            await self.push_frame(
                InterimTranscriptionFrame(user.text.strip(), self._user_id, time_now_iso8601()),
                FrameDirection.UPSTREAM,
            )
        elif user.open:
            user.quiet_frames += 1
            if user.quiet_frames >= self._params.user_turn_gap_frames:
                await self._end_user_turn()

    async def _handle_bot_speech(self, result: StepResult) -> None:
        if not result.speaking:
            if self._bot.open:
                yielded_to_user = self._user.open and self._user.quiet_frames < self._params.barge_in_window_frames
                await self._end_bot_turn(interrupted_by_user=yielded_to_user)
            if result.bot_text and self._lead_text.maxlen:
                self._lead_text.append(result.bot_text)
            return
        if not self._bot.open:
            await self._start_bot_turn()
        if self._bot.muted or self._out is None or result.audio is None:
            return
        audio = await self._out.convert(result.audio)
        if audio:
            frame = TTSAudioRawFrame(audio=audio, sample_rate=self._out.out_rate_hz, num_channels=1)
            frame.metadata[FRAME_INDEX_METADATA_KEY] = result.frame_index
            await self.push_frame(frame)
        text = "".join(self._lead_text) + result.bot_text
        self._lead_text.clear()
        if text:
            await self._push_bot_text(text, result.frame_index)

    async def _push_bot_text(self, text: str, frame_index: int) -> None:
        self._sync.record_own("assistant", text)
        # RTVI reads LLMTextFrame; the assistant aggregator records the TTSTextFrame, so the
        # LLMTextFrame must not be appended to the context as well.
        llm_text = LLMTextFrame(text)
        llm_text.append_to_context = False
        tts_text = TTSTextFrame(text, text_type=TextType.TOKEN)
        tts_text.includes_inter_frame_spaces = True  # model text carries its own spaces
        for frame in (llm_text, tts_text):
            frame.metadata[FRAME_INDEX_METADATA_KEY] = frame_index
            await self.push_frame(frame)

    async def _start_bot_turn(self) -> None:
        if self._user.open:
            await self._end_user_turn()  # the bot taking the floor ends the user's turn
        self._bot = _BotTurn(open=True)
        speech_end = self._speech_end_time or self._vad_speech_end_time
        self._speech_end_time = self._vad_speech_end_time = None
        await self.push_frame(LLMFullResponseStartFrame())
        await self.push_frame(TTSStartedFrame())
        if speech_end is not None:
            await self.start_ttfb_metrics(start_time=speech_end)
            await self.stop_ttfb_metrics()

    async def _end_bot_turn(self, *, interrupted_by_user: bool) -> None:
        muted = self._bot.muted
        self._bot = _BotTurn()
        if self._out is not None:
            await self._out.reset()
        if muted:
            return  # the InterruptionFrame already ended this turn downstream
        if interrupted_by_user:
            # The model yielded to the user: flush what the transport still holds. Downstream,
            # the InterruptionFrame ends the turn (the assistant aggregator records it).
            logger.debug(f"{self}: the model yielded to the user; interrupting")
            await self.broadcast_interruption()
            return
        await self.push_frame(TTSStoppedFrame())
        await self.push_frame(LLMFullResponseEndFrame())
        # User words heard during the turn the model kept were a backchannel, not a turn end.
        self._speech_end_time = None

    async def _end_user_turn(self) -> None:
        text = self._user.text.strip()
        self._user = _UserTurn()
        if text:
            self._sync.record_own("user", text)  # before the aggregator can echo it back
            frame = TranscriptionFrame(text, self._user_id, time_now_iso8601(), finalized=True)
            await self.push_frame(frame, FrameDirection.UPSTREAM)
        await self.broadcast_frame(ProposedUserStoppedSpeakingFrame)

    async def _close_turns(self) -> None:
        """Close the open bot and user turns, keeping turn and response frames balanced.

        The bot's first: a bot turn starting ends any open user turn, so when both are open
        the user's began during the bot's.
        """
        if self._bot.open:
            await self._end_bot_turn(interrupted_by_user=False)
        if self._user.open:
            await self._end_user_turn()
