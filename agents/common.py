"""What every agent shares: the backend choice and the pipeline around MichiLLMService."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile
import soxr
from loguru import logger
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    EndWorkerFrame,
    Frame,
    InputAudioRawFrame,
    LLMRunFrame,
    StartFrame,
)
from pipecat.observers.base_observer import BaseObserver
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker, ProcessorUnusablePolicy
from pipecat.workers.runner import WorkerRunner
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.transports.base_transport import BaseTransport
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from agents.report import CallRecorder
from pipecat_michi.engine.call import DuplexBackend, LocalEngine
from pipecat_michi.engine.config import EngineConfig
from pipecat_michi.pcm import float_to_pcm16
from pipecat_michi.service import MichiLLMService
from pipecat_michi.worker.client import RemoteWorker
from pipecat_michi.worker.protocol import MAX_VOICE_PROMPT_S, SAMPLE_RATE_HZ

# Makes the observers of each new call (reports, recordings); agents take one optionally.
ObserverFactory = Callable[[], list[BaseObserver]]


class BackendSettings(BaseModel):
    """Where MichiAI runs: a GPU worker (``worker_url`` + ``worker_token``) or, by default, an
    engine inside this process."""

    model_config = ConfigDict(extra="forbid")

    worker_url: str | None = None
    worker_token: SecretStr | None = None
    # The demo checkpoint unless MICHI_BACKEND__ENGINE__* (or --checkpoint) names another.
    engine: EngineConfig = EngineConfig(checkpoint="demo")
    system_prompt: str = "You are a friendly, concise voice assistant."
    voice_prompt_path: Path | None = Field(default=None, description="WAV clip of the voice to clone")
    # A call longer than this is ended by the bot (None: no limit).
    max_call_s: float | None = Field(default=1800.0, gt=0)
    # Each call's report (stereo WAV, who-spoke-when PNG) goes here (None: no recording).
    record_dir: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> BackendSettings:
        if self.worker_url and not self.worker_url.startswith(("ws://", "wss://")):
            raise ValueError(f"worker_url must be ws:// or wss://, got {self.worker_url!r}")
        if self.worker_url and self.worker_token is None:
            raise ValueError("worker_url needs worker_token (the worker's bearer token)")
        if self.voice_prompt_path is not None and not self.voice_prompt_path.is_file():
            raise ValueError(f"voice_prompt_path {self.voice_prompt_path} is not a file")
        return self

    def make_backend(self) -> DuplexBackend:
        if self.worker_url:
            assert self.worker_token is not None
            return RemoteWorker(self.worker_url, self.worker_token.get_secret_value())
        return LocalEngine(self.engine)

    def load_voice_prompt(self) -> np.ndarray | None:
        """The voice clip as 24 kHz mono int16, at most 30 s."""
        if self.voice_prompt_path is None:
            return None
        audio, rate = soundfile.read(self.voice_prompt_path, dtype="float32", always_2d=True)
        mono = audio.mean(axis=1)
        if rate != SAMPLE_RATE_HZ:
            mono = soxr.resample(mono, rate, SAMPLE_RATE_HZ)
        mono = mono[: MAX_VOICE_PROMPT_S * SAMPLE_RATE_HZ]
        return float_to_pcm16(mono)


def michi_pipeline(
    transport: BaseTransport, settings: BackendSettings, backend: DuplexBackend, *extra_processors
) -> tuple[Pipeline, MichiLLMService, LLMContext]:
    """transport in -> user aggregator -> MichiAI -> transport out -> assistant aggregator.

    This is where STT -> LLM -> TTS used to be: one processor, the aggregators unchanged.
    """
    context = LLMContext([{"role": "system", "content": settings.system_prompt}])
    aggregators = LLMContextAggregatorPair(context)
    michi = MichiLLMService(backend=backend, voice_prompt=settings.load_voice_prompt())
    taps: tuple[list[FrameProcessor], list[FrameProcessor]] = ([], [])
    if settings.record_dir is not None:
        recorder = CallRecorder(settings.record_dir, f"call-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
        taps = ([recorder.caller_tap()], [recorder.bot_tap()])
    pipeline = Pipeline(
        [
            transport.input(),
            *extra_processors,
            aggregators.user(),
            *taps[0],
            michi,
            *taps[1],
            transport.output(),
            aggregators.assistant(),
        ]
    )
    return pipeline, michi, context


async def run_call_pipeline(
    transport: BaseTransport,
    pipeline: Pipeline,
    params: PipelineParams,
    max_call_s: float | None,
    log=logger,  # noqa: ANN001 - a bound loguru logger
    observers: list[BaseObserver] | None = None,
) -> bool:
    """Run one call's pipeline until the caller leaves, ``max_call_s`` passes or the model
    becomes unusable; ``True`` when the caller left, ``False`` when the bot ended the call (the
    agent then hangs up its side: Twilio's REST API, the peer connection).

    When MichiLLMService gives up on its backend it reports itself unusable
    (``push_error(force_treat_as_permanent=True)``); the pipeline then ends instead of keeping a
    silent call open (Pipecat's default policy would continue).
    """
    worker = PipelineWorker(
        pipeline, params=params, observers=observers, processor_unusable_policy=ProcessorUnusablePolicy.END
    )
    caller_left = False

    @transport.event_handler("on_client_connected")
    async def _on_connected(transport, client) -> None:  # noqa: ANN001 - pipecat's signature
        log.info("caller connected")
        await worker.queue_frames([LLMRunFrame()])

    @transport.event_handler("on_client_disconnected")
    async def _on_disconnected(transport, client) -> None:  # noqa: ANN001
        nonlocal caller_left
        caller_left = True
        log.info("caller left")
        await worker.cancel()

    async def end_at_time_limit() -> None:
        assert max_call_s is not None
        await asyncio.sleep(max_call_s)  # a timer, not a synchronisation
        log.info(f"call reached its {max_call_s:.0f} s limit; ending it")
        await worker.queue_frame(EndFrame())

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    limit = asyncio.create_task(end_at_time_limit()) if max_call_s else None
    try:
        await runner.run()
    finally:
        if limit is not None:
            limit.cancel()
            await asyncio.gather(limit, return_exceptions=True)
        log.info("call ended")
    return caller_left


class CallerSilenceWatchdog(FrameProcessor):
    """Ends the call when no caller audio arrives for ``timeout_s``.

    A phone line sends audio all the time (silence included), so a stream that stops sending
    is dead or fake; without this it would hold a model slot until ``max_call_s``.
    """

    def __init__(self, timeout_s: float) -> None:
        super().__init__()
        self._timeout_s = timeout_s
        self._heard = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            self._heard.set()
        elif isinstance(frame, StartFrame) and self._task is None:
            self._task = self.create_task(self._watch(), "caller-silence-watchdog")
        elif isinstance(frame, (EndFrame, CancelFrame)):
            await self._stop()
        await self.push_frame(frame, direction)

    async def _watch(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._heard.wait(), self._timeout_s)
            except TimeoutError:
                logger.warning(f"no caller audio for {self._timeout_s:g} s; ending the call")
                await self.push_frame(EndWorkerFrame(), FrameDirection.UPSTREAM)
                return
            self._heard.clear()

    async def _stop(self) -> None:
        if self._task is not None:
            await self.cancel_task(self._task)
            self._task = None

    async def cleanup(self) -> None:
        await self._stop()
        await super().cleanup()
