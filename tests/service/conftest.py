"""Backends the service is tested against. Each test taking ``backend`` runs once per kind.

Add a kind to ``params`` (e.g. a ``RemoteWorker`` on a loopback worker) and every
backend-agnostic test runs against it too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from pipecat_michi.engine.call import DuplexBackend, LocalEngine
from pipecat_michi.engine.config import EngineConfig
from pipecat_michi.engine.engine import DuplexEngine
from pipecat_michi.worker.client import RemoteWorker
from pipecat_michi.worker.config import WorkerConfig
from pipecat_michi.worker.harness import running_worker

WORKER_TOKEN = "service-test-token"

# A long fill deadline: tests feed audio in bursts, not in real time, and a loaded CI machine
# must not turn a slow frame into a filled (silent) one.
ENGINE_CONFIG = EngineConfig(preset="tiny", device="cpu", slot_capacity=2, kv_capacity=1024, fill_after_ms=5000)


def tiny_engine() -> DuplexEngine:
    """The tiny preset with random (seeded) weights, in this process."""
    return DuplexEngine(ENGINE_CONFIG)


@pytest.fixture(params=["local", "remote"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[DuplexBackend]:
    if request.param == "local":
        local = LocalEngine(engine=tiny_engine())
        await local.engine.start()
        yield local
        await local.close()
    elif request.param == "remote":
        # The same engine behind a real worker on a loopback port, reached over the protocol.
        config = WorkerConfig(token=WORKER_TOKEN, engine=ENGINE_CONFIG)
        async with running_worker(config, tiny_engine()) as worker:
            remote = RemoteWorker(worker.url, WORKER_TOKEN)
            yield remote
            await remote.close()
    else:  # pragma: no cover - a kind listed in params without a branch here
        raise ValueError(f"unknown backend kind {request.param!r}")
