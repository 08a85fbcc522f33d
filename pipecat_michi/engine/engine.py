"""The duplex engine: many calls, one lockstep loop, one batched model step per frame.

Each call owns a slot. A call's clock starts with its first audio frame; from then on every
tick consumes exactly one frame index per call: the frame if it arrived, silence (flagged) if
not. A tick fires as soon as every ticking call has its next frame, and at the latest
``fill_after_ms`` after the previous tick, so one stalled call never holds the others; a call
that runs a frame behind the rest catches up in a tick of its own. Frames
that arrive after their index was filled are dropped, keeping every call's latency bounded.

All tensor work runs on one model thread (``SlotBatch``); the asyncio side only moves frames
and results. Injections (system prompt, RAG passages, tool results) are prefilled on that same
thread in chunks, queued between ticks, so a long document delays the batch by one chunk at most.

Over 400 lines: the tick loop, the per-call clocks and the injection queue share one lock-free
schedule on the event loop; the tensor side already lives in ``batch.py``.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import numpy as np
import torch
from loguru import logger

from pipecat_michi.contract import (  # re-exported: the contract's old home
    EngineError,
    EngineFullError,
    FrameOrderError,
    InjectResult,
    SessionClosedError,
    SessionIdleError,
    StepResult,
)
from pipecat_michi.engine.batch import BatchStepOutput, SlotBatch
from pipecat_michi.engine.calibration import StepCalibration, calibrate_step, report_calibration
from pipecat_michi.engine.config import EngineConfig, load_model
from pipecat_michi.model.runtime import prepare_model_thread
from pipecat_michi.engine.settings import SessionSettings, SessionSettingsUpdate
from pipecat_michi.engine.transcript import make_call_transcript
from pipecat_michi.model.michi import MichiModel, Sampling, StepNoise
from pipecat_michi.pcm import pcm16_to_float
from pipecat_michi.model.tokenizer import StreamingDetokenizer, Tokenizer, format_context

T = TypeVar("T")


@dataclass
class EngineStats:
    """Counters for metrics; the engine only ever adds to them."""

    ticks: int = 0
    catch_up_ticks: int = 0
    late_ticks: int = 0
    filled_frames: int = 0
    dropped_input_frames: int = 0
    # Frames still queued when their call closed: heard by nobody (a call that fell behind).
    unheard_frames_at_close: int = 0
    dropped_outputs: int = 0
    rejected_sessions: int = 0
    step_ms: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=4096))


_CLOSED = object()


class EngineSession:
    """One call's handle: push frames, read results, inject text. Made by ``DuplexEngine``."""

    def __init__(self, engine: DuplexEngine, slot: int, settings: SessionSettings) -> None:
        self.session_id = uuid.uuid4().hex
        self.slot = slot
        self._engine = engine
        self.settings = settings
        self.generator = torch.Generator().manual_seed(
            settings.seed if settings.seed is not None else int.from_bytes(uuid.uuid4().bytes[:7], "little")
        )
        self._inputs: collections.deque[tuple[int, np.ndarray]] = collections.deque()
        self._outputs: asyncio.Queue = asyncio.Queue(maxsize=engine.config.max_pending_outputs + 1)
        self.next_frame_index: int | None = None  # the clock: None until the first frame
        self._last_pushed_index = -1
        self.frames_stepped = 0
        self.closed = False
        self._bot_text = StreamingDetokenizer(engine.tokenizer)
        # Touched on the model thread only (right after a step, and by a reset).
        self._transcript = make_call_transcript(engine.config.transcript_decoder, engine.model.config, engine.tokenizer)
        self.log = logger.bind(session=self.session_id[:8], slot=slot)

    # --- input -------------------------------------------------------------------------------

    def push_audio(self, pcm: np.ndarray, frame_index: int | None = None) -> None:
        """Queue one frame (``frame_samples`` of int16, or float32 in [-1, 1], 24 kHz mono).

        ``frame_index`` must increase; ``None`` takes the next one. Frames too far ahead of the
        clock, or behind it, are dropped (counted), never allowed to grow latency.
        """
        if self.closed:
            raise SessionClosedError(f"session {self.session_id} is closed")
        frame_samples = self._engine.frame_samples
        if pcm.shape != (frame_samples,):
            raise ValueError(f"an audio frame must be {frame_samples} samples, got shape {pcm.shape}")
        if frame_index is None:
            frame_index = self._last_pushed_index + 1
        if frame_index <= self._last_pushed_index:
            raise FrameOrderError(f"frame index {frame_index} after {self._last_pushed_index}: indices must increase")
        self._last_pushed_index = frame_index
        if pcm.dtype == np.int16:
            samples = pcm16_to_float(pcm)
        else:
            samples = np.clip(pcm.astype(np.float32, copy=False), -1.0, 1.0)
        if self.next_frame_index is None:
            self.next_frame_index = frame_index
        stats = self._engine.stats
        if frame_index < self.next_frame_index:
            stats.dropped_input_frames += 1  # its tick already went by, filled with silence
            return
        if frame_index - self.next_frame_index >= self._engine.config.max_queued_frames:
            stats.dropped_input_frames += 1
            return
        self._inputs.append((frame_index, samples))
        self._engine._wake()

    def has_next_frame(self) -> bool:
        return bool(self._inputs) and self._inputs[0][0] == self.next_frame_index

    def frames_queued(self) -> int:
        """Consecutive frames queued from the clock's next index on."""
        count = 0
        for index, _ in self._inputs:
            if index != self.next_frame_index + count:
                break
            count += 1
        return count

    def take_frame(self) -> tuple[int, np.ndarray | None]:
        """The clock's next (index, samples); ``None`` samples when the frame is missing."""
        index = self.next_frame_index
        assert index is not None
        self.next_frame_index = index + 1
        if self._inputs and self._inputs[0][0] == index:
            return index, self._inputs.popleft()[1]
        return index, None

    # --- output ------------------------------------------------------------------------------

    def _deliver(self, result: StepResult) -> None:
        if self._outputs.qsize() >= self._engine.config.max_pending_outputs:
            self._outputs.get_nowait()  # a stalled reader loses its oldest output
            self._engine.stats.dropped_outputs += 1
        self._outputs.put_nowait(result)

    def _transcribe(self, out: BatchStepOutput) -> str:
        """This row's transcript text of a step (on the model thread, right after the step)."""
        row = self.slot
        logprobs = None if out.transcript_logprobs is None else out.transcript_logprobs[row]
        return self._transcript.push(out.transcript_tokens[row], logprobs, out.speaking[row])

    def _reset_model_side(self) -> None:
        self._engine._batch.reset(self.slot)
        self._transcript.reset()

    def _make_result(self, index: int, filled: bool, late: bool, out: BatchStepOutput, transcript: str) -> StepResult:
        row = self.slot
        speaking = out.speaking[row]
        return StepResult(
            frame_index=index,
            filled=filled,
            late=late,
            speaking=speaking,
            speak_prob=out.speak_prob[row],
            bot_text=self._bot_text.push(out.text_tokens[row]),
            transcript=transcript,
            audio=out.audio_pcm16[row].copy() if speaking else None,
            kv_length=out.kv_lengths[row],
        )

    async def receive(self, timeout: float | None = None) -> StepResult:
        """The next result; raises ``SessionClosedError`` once the call is over."""
        if self.closed and self._outputs.empty():
            raise SessionClosedError(f"session {self.session_id} is closed")
        item = await asyncio.wait_for(self._outputs.get(), timeout)
        if item is _CLOSED:
            self._outputs.put_nowait(_CLOSED)  # keep later receivers from blocking
            raise SessionClosedError(f"session {self.session_id} is closed")
        return item

    def pending_outputs(self) -> int:
        return self._outputs.qsize()

    # --- control -----------------------------------------------------------------------------

    async def inject_text(self, text: str, role: str = "system", pinned: bool = False) -> InjectResult:
        """Prefill ``text`` (formatted as a ``role`` turn) into this call's context."""
        if self.closed:
            raise SessionClosedError(f"session {self.session_id} is closed")
        tokens = self._engine.tokenizer.encode(format_context(self._engine.tokenizer, role, text))
        return await self._engine._prefill_tokens(self, tokens, pinned)

    async def prefill_voice(self, pcm: np.ndarray) -> int:
        """Zero-shot voice: prefill a reference clip (int16 or float32, 24 kHz). Returns frames."""
        samples = pcm16_to_float(pcm) if pcm.dtype == np.int16 else pcm.astype(np.float32)
        engine = self._engine
        embeds = await engine._run(engine._batch.encode_voice, self.slot, samples)
        # In chunks, each its own job on the model thread, like text injection: the other calls'
        # ticks run between them, so a 30 s prompt delays them by one chunk, not the whole clip.
        chunk = max(1, engine.config.prefill_chunk_frames)
        for start in range(0, embeds.shape[1], chunk):
            if self.closed:
                raise SessionClosedError(f"session {self.session_id} closed during the voice prompt")
            await engine._run(engine._batch.prefill_voice_embeds, self.slot, embeds[:, start : start + chunk])
        return embeds.shape[1]

    def update_settings(self, update: SessionSettingsUpdate) -> None:
        self.settings = self.settings.updated(update)
        if "seed" in update.model_fields_set and update.seed is not None:
            self.generator.manual_seed(update.seed)

    async def reset(self) -> None:
        """Start the call afresh in the same slot: empty context, clock restarts on next frame."""
        self._inputs.clear()
        self.next_frame_index = None
        self._last_pushed_index = -1
        self._bot_text.reset()
        await self._engine._run(self._reset_model_side)

    async def close(self) -> None:
        """End the call and free its slot (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self._engine.stats.unheard_frames_at_close += len(self._inputs)
        self._inputs.clear()
        if self._outputs.full():
            self._outputs.get_nowait()
        self._outputs.put_nowait(_CLOSED)
        await self._engine._release(self)


class DuplexEngine:
    """Owns the model, the slots and the tick loop. Use as ``async with DuplexEngine(...)``."""

    def __init__(
        self,
        config: EngineConfig | None = None,
        model: MichiModel | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self._model, self.tokenizer = model, tokenizer
        self.stats = EngineStats()
        self._sessions: dict[int, EngineSession] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._tick_task: asyncio.Task | None = None
        # Concurrent start() calls (two callers dialling in while the model loads) share one load.
        self._start_lock = asyncio.Lock()
        self._wake_event = asyncio.Event()
        self._batch: SlotBatch
        # Set by start() unless config.calibration_steps is 0: whether this machine keeps up.
        self.calibration: StepCalibration | None = None
        self.tick_observers: list[Callable[[float, int, bool], None]] = []

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model (and compile the step when configured) and start ticking; a no-op once
        started. Callers racing here wait for the one load."""
        async with self._start_lock:
            if self._tick_task is None:
                await self._start_unlocked()

    async def _start_unlocked(self) -> None:
        # One thread: steps and prefills are serialised, and the model never races itself.
        if self._executor is None:  # a start cut off by its timeout left its thread: reuse it
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="michi-model", initializer=prepare_model_thread
            )
        if self._model is None or self.tokenizer is None:
            self._model, self.tokenizer = await self._run(load_model, self.config)
        # A bad decoder choice fails here, and the lexicon is read once, off the event loop.
        await self._run(make_call_transcript, self.config.transcript_decoder, self._model.config, self.tokenizer)
        kv_capacity = self.config.kv_capacity or self._model.config.kv_capacity
        if self.config.compile and not self._model.step_is_compiled:
            self._model.compile_step(mode="reduce-overhead" if self._model.device.type == "cuda" else None)
        self._batch = await self._run(
            SlotBatch, self._model, self.config.slot_capacity, kv_capacity, self.config.evict_fraction,
            self.config.compile,
        )
        if self.config.compile:
            started = time.perf_counter()
            await self._run(self._batch.warm_up)
            logger.info(f"Compiled the step for batch sizes {self._batch.batch_sizes} "
                        f"in {time.perf_counter() - started:.1f} s")
        if self.config.calibration_steps:
            self.calibration = await self._run(
                calibrate_step, self._batch, self.config.calibration_steps, self.frame_ms
            )
            report_calibration(self.calibration, compiled=self.config.compile, device=self._model.device.type)
        self._tick_task = asyncio.create_task(self._tick_loop(), name="michi-engine-ticks")
        logger.info(f"Duplex engine ready: {self.config.slot_capacity} slots, KV window {kv_capacity}")

    async def stop(self) -> None:
        for session in list(self._sessions.values()):
            await session.close()
        if self._tick_task is not None:
            self._tick_task.cancel()
            await asyncio.gather(self._tick_task, return_exceptions=True)
            self._tick_task = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def __aenter__(self) -> DuplexEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def model(self) -> MichiModel:
        if self._model is None:
            raise EngineError("the engine is not started")
        return self._model

    @property
    def frame_samples(self) -> int:
        return self.model.config.frame_samples

    @property
    def sample_rate_hz(self) -> int:
        return self.model.config.sample_rate_hz

    @property
    def frame_ms(self) -> float:
        return self.model.config.codec.frame_ms

    @property
    def session_defaults(self) -> SessionSettings:
        """A call's settings where its opener sets none: the checkpoint's calibrated speak threshold
        and onset frames."""
        config = self.model.config
        return SessionSettings(speak_threshold=config.speak_threshold, speak_onset_frames=config.speak_onset_frames)

    @property
    def capacity(self) -> int:
        return self.config.slot_capacity

    @property
    def sessions_in_use(self) -> int:
        return len(self._sessions)

    def kv_length(self, session: EngineSession) -> int:
        return self._batch.kv_length(session.slot)

    # --- sessions ----------------------------------------------------------------------------

    async def open_session(
        self,
        settings: SessionSettingsUpdate | None = None,
        system_prompt: str | None = None,
        voice_prompt: np.ndarray | None = None,
    ) -> EngineSession:
        """Take a free slot (raises ``EngineFullError`` at once when none is left), then
        prefill the voice prompt and the system prompt, both pinned. ``settings`` override
        ``session_defaults``."""
        if self._tick_task is None:
            raise EngineError("the engine is not started")
        free = next((s for s in range(self.capacity) if s not in self._sessions), None)
        if free is None:
            self.stats.rejected_sessions += 1
            raise EngineFullError(f"all {self.capacity} slots are in use")
        session = EngineSession(self, free, self.session_defaults.updated(settings or SessionSettingsUpdate()))
        self._sessions[free] = session  # claimed before any await: no double allocation
        try:
            await self._run(self._batch.reset, free)
            if voice_prompt is not None:
                await session.prefill_voice(voice_prompt)
            if system_prompt:
                await session.inject_text(system_prompt, role="system", pinned=True)
        except BaseException:
            await session.close()
            raise
        session.log.info(f"call opened ({self.sessions_in_use}/{self.capacity} slots in use)")
        return session

    async def _release(self, session: EngineSession) -> None:
        if self._sessions.get(session.slot) is session:
            del self._sessions[session.slot]
            session.log.info(f"call closed after {session.frames_stepped} frames")
            if self._executor is not None:
                # Zero the slot's KV length so its free row can never overflow a batched write.
                await self._run(self._batch.reset, session.slot)

    async def _prefill_tokens(self, session: EngineSession, tokens: list[int], pinned: bool) -> InjectResult:
        # Checked whole, before the first chunk: a refused injection leaves no part behind.
        self._batch.check_injection(session.slot, len(tokens), pinned)
        kv_length = self._batch.kv_length(session.slot)
        chunk = self.config.prefill_chunk_tokens
        for start in range(0, len(tokens), chunk):
            if session.closed:
                raise SessionClosedError(f"session {session.session_id} closed during injection")
            kv_length = await self._run(self._batch.prefill_text, session.slot, tokens[start : start + chunk], pinned)
        return InjectResult(token_count=len(tokens), kv_length=kv_length)

    # --- the loop ----------------------------------------------------------------------------

    def _wake(self) -> None:
        self._wake_event.set()

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def _ticking(self) -> list[EngineSession]:
        return [s for s in self._sessions.values() if s.next_frame_index is not None and not s.closed]

    async def _next_tick(self, last_full_tick: float) -> tuple[list[EngineSession], bool]:
        """Wait for the next tick; return the calls it steps and whether it is a full tick.

        Full tick: every ticking call has its next frame, or the fill deadline passed (calls
        still without one get silence). Catch-up tick: some call already holds the frame
        *after* its next one, i.e. it runs a whole frame behind the others (its clock started
        just after a tick, or its packets bunched up); those calls step alone so they realign,
        instead of carrying 80 ms of extra latency for the rest of the call.
        """
        deadline = last_full_tick + self.config.fill_after_ms / 1000.0
        while True:
            ticking = self._ticking()
            if ticking and all(s.has_next_frame() for s in ticking):
                return ticking, True
            now = time.monotonic()
            if ticking and now >= deadline:
                return ticking, True
            lagging = [s for s in ticking if s.frames_queued() >= 2]
            if lagging:
                return [s for s in ticking if s.has_next_frame()], False
            self._wake_event.clear()
            timeout = max(0.0, deadline - now) if ticking else None
            try:
                await asyncio.wait_for(self._wake_event.wait(), timeout)
            except TimeoutError:
                pass

    async def _tick_loop(self) -> None:
        last_full_tick = time.monotonic()
        while True:
            stepping, full = await self._next_tick(last_full_tick)
            if full:
                last_full_tick = time.monotonic()
            else:
                self.stats.catch_up_ticks += 1
            try:
                await self._tick(stepping)
            except Exception:
                # A broken step must not take every call down silently: end them, keep serving.
                logger.exception("model step failed; closing the calls of this tick")
                for session in stepping:
                    await session.close()

    async def _tick(self, ticking: list[EngineSession]) -> None:
        rows = self._batch.rows_for(max(s.slot for s in ticking) + 1)
        audio = np.zeros((rows, self.frame_samples), dtype=np.float32)
        active = [False] * rows
        taken: list[tuple[EngineSession, int, bool]] = []
        for session in ticking:
            index, samples = session.take_frame()
            filled = samples is None
            if not filled:
                audio[session.slot] = samples
            active[session.slot] = True
            taken.append((session, index, filled))
        sampling, noise = self._sampling_inputs(rows, ticking)
        started = time.perf_counter()
        out, transcripts = await self._run(self._step_and_transcribe, audio, active, sampling, noise, ticking)
        step_ms = (time.perf_counter() - started) * 1000.0
        late = step_ms > self.frame_ms
        stats = self.stats
        stats.ticks += 1
        stats.late_ticks += late
        stats.step_ms.append(step_ms)
        for observer in self.tick_observers:
            observer(step_ms, len(ticking), late)
        for session, index, filled in taken:
            if session.closed or self._sessions.get(session.slot) is not session:
                continue  # closed while the step ran: its row's output is nobody's
            stats.filled_frames += filled
            session.frames_stepped += 1
            session._deliver(session._make_result(index, filled, late, out, transcripts[session.slot]))

    def _step_and_transcribe(
        self, audio: np.ndarray, active: list[bool], sampling: Sampling, noise: StepNoise,
        ticking: list[EngineSession],
    ) -> tuple[BatchStepOutput, dict[int, str]]:
        """The model thread's job of a tick: the step, then each call's transcript decoding."""
        out = self._batch.step(audio, active, sampling, noise)
        return out, {session.slot: session._transcribe(out) for session in ticking}

    def _max_top_k(self, ticking: list[EngineSession]) -> int | None:
        """The host-side top-k bound of a tick (see ``Sampling.max_top_k``). None for a compiled
        step: its value would be baked into the graph, one recompile per distinct top_k."""
        if self.config.compile or not all(s.settings.top_k for s in ticking):
            return None
        return max(s.settings.top_k for s in ticking)

    def _sampling_inputs(self, rows: int, ticking: list[EngineSession]) -> tuple[Sampling, StepNoise]:
        temperature = torch.zeros(rows)
        top_k = torch.zeros(rows, dtype=torch.long)
        threshold = torch.full((rows,), 0.5)
        latent_noise = torch.zeros(rows, self.model.config.codec.latent_dim)
        uniform = torch.zeros(rows)
        flow_steps = torch.ones(rows, dtype=torch.long)
        onset_frames = torch.ones(rows, dtype=torch.long)
        for session in ticking:
            settings, slot = session.settings, session.slot
            temperature[slot], top_k[slot], threshold[slot], flow_steps[slot], onset_frames[slot] = (
                settings.temperature, settings.top_k, settings.speak_threshold, settings.flow_steps,
                settings.speak_onset_frames,
            )
            # Each call draws from its own generator: its output never depends on its neighbours.
            drawn = StepNoise.draw([session.generator], latent_noise.shape[1])
            # Scaled after the draw: the generator's sequence does not depend on the setting.
            latent_noise[slot] = drawn.latent_noise[0] * settings.flow_temperature
            uniform[slot] = drawn.text_uniform[0]
        device = self.model.device
        sampling = Sampling(
            temperature.to(device), top_k.to(device), threshold.to(device), flow_steps.to(device),
            max_flow_steps=max(s.settings.flow_steps for s in ticking),
            max_top_k=self._max_top_k(ticking),
            speak_onset_frames=onset_frames.to(device),
        )
        return sampling, StepNoise(latent_noise.to(device), uniform.to(device))

