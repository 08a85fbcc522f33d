"""A real worker dying under a live call: the pipeline gets an ErrorFrame and still ends."""

import asyncio

import pytest
from pipecat.frames.frames import ErrorFrame, Frame, InputAudioRawFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.tests.utils import SleepFrame

from pipecat_michi.service import MichiLLMService
from pipecat_michi.service import MichiServiceParams
from pipecat_michi.worker.client import RemoteWorker
from pipecat_michi.worker.server import WorkerConfig, running_worker
from tests.service.conftest import ENGINE_CONFIG
from tests.service.test_service import caller_audio, kinds, run

pytestmark = pytest.mark.timeout(60)
TOKEN = "remote-service-token"


class KillWorkerAfter(FrameProcessor):
    """Passes frames on; after ``count`` audio frames it shuts the worker down, once."""

    def __init__(self, count: int, kill) -> None:  # noqa: ANN001 - an async callable
        super().__init__()
        self._left = count
        self._kill = kill

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            self._left -= 1
            if self._left == 0:
                await self._kill()
        await self.push_frame(frame, direction)


async def test_killing_the_worker_mid_call_gives_an_error_frame_not_a_hang() -> None:
    stopped = asyncio.Event()
    async with running_worker(WorkerConfig(token=TOKEN, engine=ENGINE_CONFIG)) as worker:
        backend = RemoteWorker(worker.url, TOKEN, attempts=2, backoff_s=0.01, connect_timeout_s=1)
        service = MichiLLMService(
            backend, params=MichiServiceParams(reconnect_attempts=2, reconnect_backoff_s=0.01)
        )

        async def kill() -> None:
            worker.server.should_exit = True  # the worker goes away: calls end with 1001
            stopped.set()

        frames = [*caller_audio(20), SleepFrame(1.0), *caller_audio(20, seed=1), SleepFrame(1.0)]
        down, up = await run(Pipeline([KillWorkerAfter(12, kill), service]), frames)
        await backend.close()
    assert stopped.is_set()
    errors = kinds(up, ErrorFrame)
    assert errors and "MichiAI backend unavailable" in errors[-1].error
    assert service.call is None
