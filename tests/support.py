"""Test support: real uvicorn servers on loopback ports the OS picks, bounded waits, Pipecat
pipelines run with synchronisation points instead of sleeps, and a tiny worker with raw
WebSocket calls to it."""

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI
from pipecat.frames.frames import EndFrame, Frame, InputAudioRawFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.tests.utils import QueuedFrameProcessor, SleepFrame
from pipecat.workers.runner import WorkerRunner
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from agents.twilio.config import TwilioAgentConfig
from agents.webrtc.app import WebRTCAgentConfig, create_app as create_webrtc_app
from pipecat_michi.engine.call import LocalEngine
from pipecat_michi.engine.config import EngineConfig
from pipecat_michi.pcm import float_to_pcm16
from pipecat_michi.engine.settings import SessionSettingsUpdate
from pipecat_michi.serving import serve_on_loopback
from pipecat_michi.worker.protocol import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    AudioFrame,
    EndedMessage,
    EndMessage,
    ErrorMessage,
    HelloMessage,
    ReadyMessage,
    StepMessage,
    WorkerMessage,
    decode_worker_message,
    encode_message,
)
from pipecat_michi.worker.config import WorkerConfig
from pipecat_michi.worker.harness import RunningWorker, running_worker


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


# --- a tiny worker and raw WebSocket calls to it: no client class, so the bad cases are the
# bytes a test chooses ------------------------------------------------------------------------

WORKER_TOKEN = "test-token-0123456789"
FRAME = 1920  # samples of one 80 ms frame at 24 kHz


def noise_frames(seed: int, frames: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((frames, FRAME)) * 3000).astype(np.int16)


def worker_config(**overrides: object) -> WorkerConfig:
    engine = {"preset": "tiny", "device": "cpu", "slot_capacity": 2, "fill_after_ms": 5000.0}
    engine.update(overrides.pop("engine", {}))  # type: ignore[arg-type]
    return WorkerConfig(token=WORKER_TOKEN, engine=EngineConfig(**engine), **overrides)


@asynccontextmanager
async def tiny_worker(**overrides: object) -> AsyncIterator[RunningWorker]:
    async with running_worker(worker_config(**overrides)) as worker:
        yield worker


def connect_raw(worker: RunningWorker, token: str | None = WORKER_TOKEN):
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return connect(worker.url, additional_headers=headers, max_size=MAX_MESSAGE_BYTES, compression=None)


def hello_bytes(**fields: object) -> bytes:
    return encode_message(HelloMessage(protocol_version=PROTOCOL_VERSION, **fields))  # type: ignore[arg-type]


async def recv_message(ws: ClientConnection) -> WorkerMessage:
    async with asyncio.timeout(10):
        return decode_worker_message(await ws.recv(), FRAME)  # type: ignore[arg-type]


async def raw_ready(ws: ClientConnection) -> ReadyMessage:
    await ws.send(hello_bytes(session=SessionSettingsUpdate(seed=1)))
    ready = await recv_message(ws)
    assert isinstance(ready, ReadyMessage), ready
    return ready


async def last_words(ws: ClientConnection) -> tuple[list[WorkerMessage], int]:
    """Every control message the worker sends until it closes (STEPs skipped), and the close code."""
    messages: list[WorkerMessage] = []
    try:
        while True:
            message = await recv_message(ws)
            if not isinstance(message, StepMessage):
                messages.append(message)
    except ConnectionClosed as closed:
        assert closed.rcvd is not None, "the worker dropped the connection without a close frame"
        return messages, closed.rcvd.code


async def expect_fatal(ws: ClientConnection, code: int) -> None:
    messages, close_code = await last_words(ws)
    assert close_code == code
    assert len(messages) == 1 and isinstance(messages[0], ErrorMessage), messages
    assert (messages[0].code, messages[0].fatal) == (code, True)
    # The close reason is the error's message, shortened to fit a close frame.
    reason = ws.close_reason or ""
    assert len(reason.encode()) <= 123 and messages[0].message.startswith(reason.removesuffix("..."))


async def serves_a_call(worker: RunningWorker) -> None:
    """The worker still works: a new call gets ready and a STEP, and its slot comes back."""
    async with connect_raw(worker) as ws:
        await raw_ready(ws)
        await ws.send(encode_message(AudioFrame(frame_index=0, pcm=noise_frames(0, 1)[0])))
        step = await recv_message(ws)
        assert isinstance(step, StepMessage) and step.frame_index == 0
        await ws.send(encode_message(EndMessage()))
        messages, code = await last_words(ws)
        assert code == 1000 and messages == [EndedMessage(reason="client_end", frames=1)]
    await eventually(lambda: worker.engine.sessions_in_use == 0, timeout_s=1.0, what="slot freed")


# --- the agents on the tiny random model -----------------------------------------------------


def twilio_agent_config(max_call_s: float | None = None, **overrides) -> TwilioAgentConfig:
    """The Twilio agent on the tiny random model (two slots)."""
    engine = {"preset": "tiny", "device": "cpu", "slot_capacity": 2}
    return TwilioAgentConfig(backend={"engine": engine, "max_call_s": max_call_s}, **overrides)


def speech_8k(seconds: float) -> np.ndarray:
    """A voiced-sounding 8 kHz signal (a warbling 220 Hz tone with a little noise), as int16."""
    rng = np.random.default_rng(0)
    t = np.arange(int(8000 * seconds)) / 8000
    voice = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return float_to_pcm16(voice + 0.01 * rng.standard_normal(len(t)))


def webrtc_agent(**overrides: object) -> tuple[FastAPI, LocalEngine]:
    """The agent on the tiny random model, and the engine it runs on (to watch its slots)."""
    engine = {"preset": "tiny", "device": "cpu", "slot_capacity": 2}
    config = WebRTCAgentConfig(backend={"engine": engine, "max_call_s": None}, **overrides)
    backend = LocalEngine(EngineConfig(device="cpu", slot_capacity=2))
    return create_webrtc_app(config, backend=backend), backend
