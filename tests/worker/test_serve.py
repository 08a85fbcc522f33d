"""MichiAI workers as a Ray Serve application (``pipecat_michi.worker.serve``).

The option mapping is checked without Ray; the rest runs a real local Ray cluster with two CPU
replicas of the tiny model behind Serve's HTTP proxy on a loopback port, reached by the same
``RemoteWorker`` and ``MichiLLMService`` that talk to a single worker.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pipecat.frames.frames import ErrorFrame, Frame, InputAudioRawFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.tests.utils import SleepFrame, run_test

from pipecat_michi.service import MichiLLMService
from pipecat_michi.worker.client import RemoteCall, RemoteWorker, WorkerUnavailableError
from pipecat_michi.worker.retry import RetryPolicy
from pipecat_michi.worker.config import WorkerConfigError
from tests.support import eventually

ray = pytest.importorskip("ray")
from pipecat_michi.worker.serve import (  # noqa: E402
    ServeConfig,
    ReplicaStats,
    build_app,
    deployment_options,
    replica_stats,
    serving,
)

TOKEN = "serve-test-token-0123456789"
FRAME = 1920
SLOTS_PER_REPLICA = 1


# --- options, no cluster --------------------------------------------------------------------


def test_one_gpu_per_replica_up_to_the_cluster_and_admission_just_above_the_slots() -> None:
    gpus = deployment_options(ServeConfig(), slot_capacity=32, cluster_gpus=4)
    assert gpus["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert gpus["autoscaling_config"]["max_replicas"] == 4
    assert gpus["autoscaling_config"]["target_ongoing_requests"] == 24  # 75% of the slots
    assert gpus["max_ongoing_requests"] == 33  # one beyond the slots: refused at once, not queued
    cpu = deployment_options(ServeConfig(min_replicas=2), slot_capacity=4, cluster_gpus=0)
    assert cpu["ray_actor_options"]["num_gpus"] == 0.0
    assert cpu["autoscaling_config"]["min_replicas"] == cpu["autoscaling_config"]["max_replicas"] == 2


def test_tokens_never_travel_in_the_application_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICHI_WORKER_TOKEN", TOKEN)
    for secret in ({"token": TOKEN}, {"tenant_tokens": [TOKEN]}):
        with pytest.raises(WorkerConfigError, match="MICHI_WORKER_TOKEN"):
            build_app({"worker": secret})
    bound = build_app({"worker": {"engine": {"preset": "tiny", "device": "cpu"}}})
    assert TOKEN not in repr(bound._bound_deployment.init_args)  # what Serve stores and shows
    monkeypatch.delenv("MICHI_WORKER_TOKEN")
    with pytest.raises(WorkerConfigError, match="no token"):
        build_app({})


def test_the_cluster_config_file_is_a_valid_serve_config_whose_args_build(monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema(**yaml.safe_load((Path(__file__).parents[2] / "deploy" / "serve.yaml").read_text()))
    (app,) = config.applications
    assert app.import_path == "pipecat_michi.worker.serve:build_app"
    monkeypatch.setenv("MICHI_WORKER_TOKEN", TOKEN)
    bound = build_app(app.args)
    assert bound._bound_deployment.init_args[0]["engine"]["slot_capacity"] == 64


# --- a real Serve application -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def serve_url() -> Iterator[str]:
    port = _free_port()
    # build_app checks the token where it runs (here); the replicas read it from Ray's runtime env.
    saved_token = os.environ.get("MICHI_WORKER_TOKEN")
    os.environ["MICHI_WORKER_TOKEN"] = TOKEN
    try:
        with serving(
            {
                "min_replicas": 2,
                "max_replicas": 2,
                "graceful_shutdown_timeout_s": 5,
                "worker": {
                    "engine": {"preset": "tiny", "device": "cpu", "slot_capacity": SLOTS_PER_REPLICA,
                               "torch_threads": 1, "fill_after_ms": 5000},
                },
            },
            port=port,
            ray_options={
                "num_cpus": 4,  # logical: two 1-CPU replicas fit however many cores the machine has
                "include_dashboard": False,
                "log_to_driver": False,
                "runtime_env": {"env_vars": {"MICHI_WORKER_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"}},
            },
        ) as url:
            yield url
    finally:
        if saved_token is None:
            os.environ.pop("MICHI_WORKER_TOKEN", None)
        else:
            os.environ["MICHI_WORKER_TOKEN"] = saved_token


def _backend(url: str, budget_s: float = 2.0) -> RemoteWorker:
    # Serve's router may offer a call to the full replica; each refusal (1013) is one attempt.
    retry = RetryPolicy(first_delay_s=0.05, max_delay_s=0.4, budget_s=budget_s)
    return RemoteWorker(url, TOKEN, connect_timeout_s=10, retry=retry)


async def _stats() -> list[ReplicaStats]:
    return await replica_stats("michi")


async def _slots_in_use() -> list[int]:
    return sorted(s.slots_in_use for s in await _stats())


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_calls_spread_over_replicas_stick_to_them_and_a_full_app_refuses(serve_url: str) -> None:
    backend = _backend(serve_url)
    calls = [await backend.open_call(), await backend.open_call()]
    stats = await _stats()
    assert len(stats) == 2 and sorted(s.slots_in_use for s in stats) == [1, 1]  # one call on each
    assert len({s.pid for s in stats}) == 2
    rng = np.random.default_rng(0)
    for index in range(12):
        for call in calls:
            await call.send_audio((rng.standard_normal(FRAME) * 3000).astype(np.int16), index)
        for call in calls:
            # Every step of a call comes back on its one WebSocket, in order: the call stays on
            # the replica that admitted it.
            assert (await call.receive(timeout=20)).frame_index == index
    # Both replicas full: a third call is refused (1013 from a replica, tried again), not queued.
    with pytest.raises(WorkerUnavailableError, match="slots are in use"):
        await _backend(serve_url, budget_s=0.3).open_call()
    for call in calls:
        await call.close()

    async def freed() -> bool:
        return await _slots_in_use() == [0, 0]

    await eventually(freed, timeout_s=10, what="slots freed on both replicas", poll_s=0.1)


class KillReplicaAfter(FrameProcessor):
    """Passes frames on; after ``count`` audio frames it kills the replica serving the call."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self._left = count
        self.killed: str | None = None

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            self._left -= 1
            if self._left == 0:
                busy = [s for s in await _stats() if s.slots_in_use]
                assert len(busy) == 1, busy
                self.killed = busy[0].actor_name
                ray.kill(ray.get_actor(self.killed, namespace="serve"), no_restart=True)
        await self.push_frame(frame, direction)


def _caller_audio(chunks: int, seed: int) -> list[Frame]:
    rng = np.random.default_rng(seed)
    return [
        InputAudioRawFrame(audio=(rng.standard_normal(320) * 3000).astype(np.int16).tobytes(), sample_rate=16000,
                           num_channels=1)
        for _ in range(chunks)
    ]


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_killed_replica_moves_the_call_to_a_live_one_and_serve_heals(serve_url: str) -> None:
    backend = _backend(serve_url, budget_s=15)  # the service's default budget: a restart fits
    service = MichiLLMService(backend)
    opened: list[str] = []

    @service.event_handler("on_call_opened")
    async def on_call_opened(service: MichiLLMService, call: RemoteCall) -> None:
        opened.append(call.session_id)

    killer = KillReplicaAfter(12)
    frames = [*_caller_audio(20, seed=1), SleepFrame(2.0), *_caller_audio(20, seed=2), SleepFrame(1.0)]
    _, up = await asyncio.wait_for(
        run_test(Pipeline([killer, service]), frames_to_send=frames, pipeline_params=PipelineParams(),
                 start_timeout=20),
        timeout=60,
    )
    assert killer.killed is not None
    assert not [f for f in up if isinstance(f, ErrorFrame)]  # no dead call, no give-up
    assert len(opened) == 2  # the first call, then one on the surviving replica
    assert service.is_usable and service.call is None  # the pipeline ended and closed it
    await backend.close()

    # A new call lands on the surviving replica (or on the replacement Serve starts).
    survivor = _backend(serve_url)
    call = await survivor.open_call()
    await call.send_audio(np.zeros(FRAME, dtype=np.int16), 0)
    assert (await call.receive(timeout=20)).frame_index == 0
    await call.close()

    # Serve replaces the dead replica: the application heals to its two replicas.
    async def healed() -> bool:
        stats = await _stats()
        return len(stats) == 2 and killer.killed not in {s.actor_name for s in stats}

    await eventually(healed, timeout_s=120, what="a replacement replica", poll_s=0.5)
