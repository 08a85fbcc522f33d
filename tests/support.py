"""Test support: real uvicorn servers on loopback ports the OS picks, bounded waits, and Pipecat
pipelines run with synchronisation points instead of sleeps."""

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np
from pipecat.frames.frames import EndFrame, Frame, InputAudioRawFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.tests.utils import QueuedFrameProcessor, SleepFrame
from pipecat.workers.runner import WorkerRunner

from pipecat_michi.serving import serve_on_loopback


# Real uvicorn servers on loopback ports the OS picks.
serve = serve_on_loopback


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]],
    timeout_s: float = 10.0,
    what: str = "condition",
    poll_s: float = 0.01,
) -> None:
    """Wait until ``condition()`` holds (awaited when it returns an awaitable, e.g. a question
    to Ray), checking every ``poll_s``; fail after ``timeout_s``."""

    async def holds() -> bool:
        result = condition()
        return await result if inspect.isawaitable(result) else result

    try:
        async with asyncio.timeout(timeout_s):
            while not await holds():
                await asyncio.sleep(poll_s)
    except TimeoutError:
        raise AssertionError(f"{what} did not hold within {timeout_s} s") from None


# --- Pipecat pipelines under test --------------------------------------------------------------


@dataclass(frozen=True)
class Until:
    """Among the frames ``run_pipeline`` sends: wait until ``condition()`` holds before sending
    the next (failing after ``timeout_s``), in place of a ``SleepFrame`` that hopes."""

    condition: Callable[[], bool | Awaitable[bool]]
    what: str = "condition"
    timeout_s: float = 10.0


async def run_pipeline(
    processor: FrameProcessor,
    frames: Sequence[Frame | Until],
    *,
    out_rate: int = 24000,
    metrics: bool = False,
    timeout_s: float = 30.0,
) -> tuple[list[Frame], list[Frame]]:
    """Pipecat's ``run_test`` (frames down and up, an ``EndFrame`` at the end) that also honours
    ``Until`` among the frames. Audio frames are system frames, which no queue in the pipeline
    holds back, so a test synchronises here, in the sender."""
    received_up: asyncio.Queue[Frame] = asyncio.Queue()
    received_down: asyncio.Queue[Frame] = asyncio.Queue()
    source = QueuedFrameProcessor(queue=received_up, queue_direction=FrameDirection.UPSTREAM, ignore_start=True)
    sink = QueuedFrameProcessor(queue=received_down, queue_direction=FrameDirection.DOWNSTREAM, ignore_start=True)
    worker = PipelineWorker(
        Pipeline([source, processor, sink]),
        cancel_on_idle_timeout=False,
        enable_rtvi=False,
        params=PipelineParams(audio_out_sample_rate=out_rate, enable_metrics=metrics),
    )
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def on_pipeline_started(worker: PipelineWorker, frame: Frame) -> None:
        started.set()

    async def send() -> None:
        await asyncio.wait_for(started.wait(), timeout=10)  # frames before StartFrame are dropped
        try:
            for item in frames:
                if isinstance(item, Until):
                    await eventually(item.condition, item.timeout_s, item.what)
                elif isinstance(item, SleepFrame):
                    await asyncio.sleep(item.sleep)
                else:
                    await worker.queue_frame(item)
        finally:
            await worker.queue_frame(EndFrame())  # the pipeline ends even when a wait failed

    runner = WorkerRunner()
    await runner.add_workers(worker)
    async with asyncio.timeout(timeout_s):
        await asyncio.gather(runner.run(), send())

    def drained(queue: asyncio.Queue[Frame]) -> list[Frame]:
        return [queue.get_nowait() for _ in range(queue.qsize())]

    down = [f for f in drained(received_down) if not isinstance(f, EndFrame)]
    return down, drained(received_up)


def kinds(frames: list[Frame], *types: type) -> list[Frame]:
    """The frames of the given types, in order."""
    return [f for f in frames if isinstance(f, types)]


def index_of(frames: list[Frame], kind: type, start: int = 0) -> int:
    """The index of the first ``kind`` frame at or after ``start``."""
    return next(i for i in range(start, len(frames)) if isinstance(frames[i], kind))


def caller_audio(chunks: int, rate: int = 16000, chunk_ms: int = 20, seed: int = 0) -> list[Frame]:
    """Noise in transport-sized chunks (20 ms at 16 kHz, as WebRTC delivers it)."""
    rng = np.random.default_rng(seed)
    samples = rate * chunk_ms // 1000
    return [
        InputAudioRawFrame(
            audio=(rng.standard_normal(samples) * 3000).astype(np.int16).tobytes(), sample_rate=rate, num_channels=1
        )
        for _ in range(chunks)
    ]
