"""A real worker going away under a live call: when it comes back within the client's retry
budget the call carries on; when it does not, the pipeline gets a permanent ErrorFrame and ends."""

import asyncio
import contextlib
import socket

import pytest
from pipecat.frames.frames import ErrorFrame, Frame, InputAudioRawFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from pipecat_michi.service import MichiLLMService
from pipecat_michi.worker.client import RemoteWorker
from pipecat_michi.worker.retry import RetryPolicy
from pipecat_michi.worker.config import WorkerConfig
from pipecat_michi.worker.harness import RunningWorker, running_worker
from service_fakes import SpyBackend

from tests.service.conftest import ENGINE_CONFIG
from tests.support import Until, caller_audio, kinds, run_pipeline

pytestmark = pytest.mark.timeout(60)
TOKEN = "remote-service-token"
CONFIG = WorkerConfig(token=TOKEN, engine=ENGINE_CONFIG)


class KillWorkerAfter(FrameProcessor):
    """Passes frames on; after ``count`` audio frames it shuts the worker down, once."""

    def __init__(self, count: int, worker: RunningWorker) -> None:
        super().__init__()
        self._left = count
        self._worker = worker
        self.killed = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            self._left -= 1
            if self._left == 0:
                self._worker.server.should_exit = True  # the worker goes away: calls end with 1001
                self.killed.set()
        await self.push_frame(frame, direction)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_killing_the_worker_for_good_gives_a_permanent_error_frame_not_a_hang() -> None:
    retry = RetryPolicy(first_delay_s=0.05, max_delay_s=0.1, budget_s=0.5)
    async with running_worker(CONFIG) as worker:
        backend = RemoteWorker(worker.url, TOKEN, connect_timeout_s=1, retry=retry)
        service = MichiLLMService(backend)
        killer = KillWorkerAfter(12, worker)
        frames = [
            *caller_audio(20),
            Until(lambda: not service.is_usable, "the service gave up"),
            *caller_audio(20, seed=1),
        ]
        down, up = await run_pipeline(Pipeline([killer, service]), frames)
        await backend.close()
    assert killer.killed.is_set()
    (error,) = kinds(up, ErrorFrame)
    assert "MichiAI backend unavailable" in error.error and "no worker took the call" in error.error
    assert service.call is None


async def test_a_worker_restarted_within_the_retry_budget_takes_the_call_back() -> None:
    port = _free_port()
    backend = RemoteWorker(f"ws://127.0.0.1:{port}/v1/call", TOKEN, connect_timeout_s=1)  # the default budget
    spy = SpyBackend(backend)
    service = MichiLLMService(spy)
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(running_worker(CONFIG, port=port))
        killer = KillWorkerAfter(12, first)

        async def restart() -> None:
            await killer.killed.wait()
            await asyncio.sleep(1.0)  # down for a while: the client's first attempts fail
            await stack.enter_async_context(running_worker(CONFIG, port=port))

        restarting = asyncio.create_task(restart())
        frames = [
            *caller_audio(20),
            Until(lambda: len(spy.calls) == 2 and service.call is not None, "a call on the restarted worker", 20),
            *caller_audio(20, seed=1),
            Until(lambda: len(spy.calls[1].steps) > 0, "steps from the new call"),
        ]
        _, up = await run_pipeline(Pipeline([killer, service]), frames)
        await restarting
        await backend.close()
    assert not kinds(up, ErrorFrame) and service.is_usable
