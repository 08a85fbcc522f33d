"""RemoteWorker/RemoteCall against real loopback workers (and a fake one for other versions):
retries and rotation, auth, and a dead connection never leaving a waiter hanging."""

from __future__ import annotations

import asyncio
import random
import re
import socket
import time

import numpy as np
import pytest
from websockets.asyncio.server import ServerConnection, serve

from pipecat_michi.engine.config import EngineConfig
from pipecat_michi.engine.engine import FrameOrderError, SessionClosedError
from pipecat_michi.engine.settings import SessionSettingsUpdate
from pipecat_michi.worker.client import (
    RemoteWorker,
    WorkerAuthError,
    WorkerConnectionError,
    WorkerProtocolError,
    WorkerUnavailableError,
)
from pipecat_michi.worker.protocol import ErrorMessage, encode_message
from pipecat_michi.worker.retry import RetryPolicy
from pipecat_michi.worker.config import WorkerConfig
from pipecat_michi.worker.harness import running_worker
from tests.support import eventually

TOKEN = "client-test-token"
SILENCE = np.zeros(1920, dtype=np.int16)


def _config(slots: int = 2) -> WorkerConfig:
    engine = EngineConfig(preset="tiny", device="cpu", slot_capacity=slots, fill_after_ms=5000.0)
    return WorkerConfig(token=TOKEN, engine=engine)


def _dead_url() -> str:
    with socket.socket() as sock:  # bound then closed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"ws://127.0.0.1:{port}/v1/call"


async def test_a_dead_worker_gives_worker_unavailable_once_the_retry_budget_is_spent() -> None:
    retry = RetryPolicy(first_delay_s=0.05, max_delay_s=0.1, jitter=0, budget_s=0.5)
    backend = RemoteWorker(_dead_url(), TOKEN, connect_timeout_s=2, retry=retry)
    started = time.monotonic()
    with pytest.raises(WorkerUnavailableError, match="cannot connect") as failed:
        await backend.open_call()
    # Pauses 0.05, 0.1, 0.1, ...: attempts until the next pause would end past the budget.
    assert 0.4 <= time.monotonic() - started < 2.0
    assert re.search(r"in ([5-9]|1\d) attempt\(s\)", failed.value.message), failed.value.message


def test_the_retry_pauses_double_up_to_the_cap_and_are_jittered_down_only() -> None:
    policy = RetryPolicy(first_delay_s=0.25, max_delay_s=2.0, jitter=0.5, budget_s=15)
    rng = random.Random(0)
    pauses = [next(p) for p in [policy.pauses(rng)] for _ in range(8)]
    for pause, full in zip(pauses, [0.25, 0.5, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0], strict=True):
        assert full / 2 <= pause <= full
    assert len(set(pauses)) == len(pauses)  # jittered: calls dropped together spread out
    assert sum(pauses) < policy.budget_s  # several passes fit the budget (a restart: ~3 s)
    with pytest.raises(ValueError, match="max_delay_s"):
        RetryPolicy(first_delay_s=3, max_delay_s=1)


async def test_a_wrong_token_raises_worker_auth_error_at_once() -> None:
    async with running_worker(_config()) as worker:
        # A retry would sleep 30 s first: the deadline proves there is none.
        backend = RemoteWorker(worker.url, "wrong", retry=RetryPolicy(first_delay_s=30, max_delay_s=30))
        async with asyncio.timeout(10):
            with pytest.raises(WorkerAuthError, match="403"):
                await backend.open_call()


async def test_a_full_or_dead_worker_sends_the_call_to_the_next_url() -> None:
    async with running_worker(_config(slots=1)) as full, running_worker(_config()) as free:
        taken = await RemoteWorker(full.url, TOKEN).open_call()
        backend = RemoteWorker([full.url, _dead_url(), free.url], TOKEN, retry=RetryPolicy.once())
        call = await backend.open_call()
        assert call.url == free.url and free.engine.sessions_in_use == 1
        assert full.app.state.worker.metrics.stats().rejected_calls == 1
        await backend.close()
        await taken.close()
        await eventually(lambda: free.engine.sessions_in_use == full.engine.sessions_in_use == 0, 1.0, "slots freed")


async def test_another_protocol_version_raises_worker_protocol_error() -> None:
    async def refuse(websocket: ServerConnection) -> None:
        await websocket.recv()
        refusal = ErrorMessage(code=4001, message="protocol version 1 is not supported", fatal=True)
        await websocket.send(encode_message(refusal))
        await websocket.close(4001, "unsupported version")

    async with serve(refuse, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        backend = RemoteWorker(f"ws://127.0.0.1:{port}/v1/call", TOKEN, retry=RetryPolicy(first_delay_s=30, max_delay_s=30))
        async with asyncio.timeout(10):
            with pytest.raises(WorkerProtocolError, match="not supported") as refused:
                await backend.open_call()
        assert refused.value.code == 4001


async def test_a_killed_worker_fails_receive_within_two_seconds_and_every_later_call() -> None:
    async with running_worker(_config()) as worker:
        call = await RemoteWorker(worker.url, TOKEN).open_call()
        await call.send_audio(SILENCE)
        assert (await call.receive(timeout=10)).frame_index == 0
        waiting = asyncio.create_task(call.receive(timeout=30))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        for connection in list(worker.server.server_state.connections):
            connection.transport.abort()  # the worker's side vanishes: no close frame
        with pytest.raises(WorkerConnectionError) as lost:
            await waiting
        assert time.monotonic() - started < 2.0
        assert lost.value.code == 1006
        assert isinstance(lost.value, SessionClosedError)  # handled like a closed local call
        async with asyncio.timeout(1):
            with pytest.raises(WorkerConnectionError):
                await call.receive(timeout=30)
            with pytest.raises(WorkerConnectionError):
                await call.send_audio(SILENCE)
            with pytest.raises(WorkerConnectionError):
                await call.inject_text("too late")
            await call.close()


async def test_a_worker_shutdown_ends_the_call_with_1001() -> None:
    async with running_worker(_config()) as worker:
        call = await RemoteWorker(worker.url, TOKEN).open_call()
        worker.server.should_exit = True
        with pytest.raises(WorkerConnectionError, match="shutdown") as ended:
            await call.receive(timeout=10)
        assert ended.value.code == 1001


async def test_a_call_streams_resets_updates_and_closes() -> None:
    async with running_worker(_config()) as worker:
        backend = RemoteWorker(worker.url, TOKEN, max_pending_steps=2)
        voice = np.zeros(2 * 1920, dtype=np.int16)  # two frames of reference voice
        call = await backend.open_call(SessionSettingsUpdate(seed=3), system_prompt="Be brief.", voice_prompt=voice)
        assert (call.frame_samples, call.sample_rate_hz) == (1920, 24000)
        with pytest.raises(ValueError, match="1920 samples"):
            await call.send_audio(SILENCE[:100])
        # Five frames unread with room for two: the three oldest are dropped, counted.
        for _ in range(5):
            await call.send_audio(SILENCE)
        await eventually(lambda: call.dropped_steps == 3, 10.0, "three steps dropped")
        assert [(await call.receive(timeout=1)).frame_index for _ in range(2)] == [3, 4]
        await call.update_settings(SessionSettingsUpdate(temperature=0.0))
        await call.reset()
        await call.send_audio(np.full(1920, 0.1, dtype=np.float32))  # floats are converted
        assert (await call.receive(timeout=10)).frame_index == 5  # indexes go on after a reset
        with pytest.raises(FrameOrderError):
            await call.send_audio(SILENCE, frame_index=5)
        await call.close()
        await call.close()  # idempotent
        with pytest.raises(WorkerConnectionError) as closed:
            await call.receive(timeout=1)
        assert closed.value.code == 1000
        await eventually(lambda: worker.engine.sessions_in_use == 0, 1.0, "slot freed")
