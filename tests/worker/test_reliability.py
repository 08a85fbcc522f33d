"""The worker under misbehaving clients and operators' limits, on a real loopback uvicorn:
call-length and per-token limits, tokens kept out of logs, a client that stops reading, a TCP
half-close, and a worker restarted under its clients."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest
from loguru import logger
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from pipecat_michi.engine.settings import SessionSettingsUpdate
from pipecat_michi.worker.client import RemoteWorker, WorkerAuthError, WorkerConnectionError, WorkerUnavailableError
from pipecat_michi.worker.protocol import MAX_MESSAGE_BYTES, AudioFrame, EndedMessage, encode_message
from pipecat_michi.worker.retry import RetryPolicy
from pipecat_michi.worker.harness import running_worker
from tests.support import (
    FRAME,
    WORKER_TOKEN as TOKEN,
    connect_raw,
    eventually,
    hello_bytes,
    last_words,
    noise_frames,
    raw_ready,
    serves_a_call,
    tiny_worker,
    worker_config,
)

ONCE = RetryPolicy.once()
TENANT_A = "tenant-a-0123456789abcdef"
TENANT_B = "tenant-b-0123456789abcdef"


async def test_a_call_past_max_call_s_is_ended_with_max_duration_and_frees_its_slot() -> None:
    async with tiny_worker(max_call_s=0.5) as worker:
        async with connect_raw(worker) as ws:
            await raw_ready(ws)
            messages, code = await last_words(ws)  # nothing sent: the limit, not the idle timeout
        assert code == 1000 and messages == [EndedMessage(reason="max_duration", frames=0)]
        await eventually(lambda: worker.engine.sessions_in_use == 0, timeout_s=1.0, what="slot freed")


async def test_each_token_holds_at_most_max_calls_per_token_and_others_are_not_counted() -> None:
    config = worker_config(tenant_tokens=[TENANT_A, TENANT_B], max_calls_per_token=1, engine={"slot_capacity": 4})
    async with running_worker(config) as worker:
        tenant_a = RemoteWorker(worker.url, TENANT_A, retry=ONCE)
        first = await tenant_a.open_call()
        with pytest.raises(WorkerUnavailableError, match="max_calls_per_token"):
            await tenant_a.open_call()  # a slot is free, but tenant A has its one call
        others = [await RemoteWorker(worker.url, token, retry=ONCE).open_call() for token in (TENANT_B, TOKEN)]
        assert worker.engine.sessions_in_use == 3
        await first.close()
        await eventually(lambda: worker.engine.sessions_in_use == 2, timeout_s=1.0, what="slot freed")
        again = await tenant_a.open_call()  # its call ended: tenant A may call again
        for call in (again, *others):
            await call.close()
        assert worker.app.state.worker.metrics.stats().rejected_calls == 1


async def test_no_token_reaches_the_logs() -> None:
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message) + repr(message.record["extra"])), level="DEBUG")
    try:
        async with running_worker(worker_config(tenant_tokens=[TENANT_A])) as worker:
            for wrong in ("guess-" + TOKEN, TENANT_A[:-1]):
                with pytest.raises(WorkerAuthError, match="refused the token"):
                    await RemoteWorker(worker.url, wrong, retry=ONCE).open_call()
            call = await RemoteWorker(worker.url, TENANT_A).open_call()
            await call.send_audio(noise_frames(0, 1)[0])
            await call.receive(timeout=10)
            await call.close()
            await serves_a_call(worker)
    finally:
        logger.remove(sink)
    text = "\n".join(lines)
    assert "Refused a call: missing or wrong bearer token" in text  # the sink did see the calls
    for secret in (TOKEN, TENANT_A, TENANT_A[:-1]):
        assert secret not in text


async def test_a_client_that_stops_reading_loses_its_oldest_steps_and_never_slows_another_call() -> None:
    # speak_threshold ~0: every STEP carries a frame of audio, so the stalled socket fills fast.
    speaking = SessionSettingsUpdate(seed=3, speak_threshold=0.001)
    # The worker's small send buffer (send_buffer_bytes) and the client's fill within a few
    # dozen STEPs; then the stalled call's bounded output queue must start dropping.
    max_frames, frames_after_drops = 300, 40
    async with tiny_worker(engine={"max_pending_outputs": 8}) as worker:
        sock = socket.socket()
        # A small receive window: the worker's sends block after a few STEPs instead of filling
        # megabytes of kernel buffers first.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        host, port = worker.url.removeprefix("ws://").split("/")[0].split(":")
        sock.connect((host, int(port)))
        async with connect(
            worker.url, sock=sock, max_queue=2, max_size=MAX_MESSAGE_BYTES, compression=None,
            additional_headers={"Authorization": f"Bearer {TOKEN}"},
        ) as stalled:
            await stalled.send(hello_bytes(session=speaking))
            healthy = await RemoteWorker(worker.url, TOKEN).open_call(speaking)
            audio = noise_frames(1, 8)
            received = []
            first_drop = None
            for index in range(max_frames):
                frame = audio[index % len(audio)]
                # The stalled client keeps talking (its frames drive the lockstep tick) and never reads.
                await stalled.send(encode_message(AudioFrame(frame_index=index, pcm=frame)))
                await healthy.send_audio(frame, index)
                received.append(await healthy.receive(timeout=10))
                if first_drop is None and worker.engine.stats.dropped_outputs:
                    first_drop = index
                if first_drop is not None and index >= first_drop + frames_after_drops:
                    break
            # The stalled call's steps piled up in its bounded queue and the oldest were dropped ...
            assert first_drop is not None, f"no STEP of the stalled call dropped in {max_frames} frames"
            # ... while the healthy call got every step, in order, none stepped as silence: both
            # calls ticked together throughout.
            assert [r.frame_index for r in received] == list(range(len(received)))
            assert not any(r.filled for r in received)
            assert healthy.dropped_steps == 0
            await healthy.close()
            stalled.transport.abort()  # it never reads its close frame either
        await eventually(lambda: worker.engine.sessions_in_use == 0, timeout_s=3.0, what="slots freed")


async def test_a_half_closed_connection_ends_the_call_and_frees_the_slot() -> None:
    async with tiny_worker() as worker:
        ws = await connect_raw(worker)
        await raw_ready(ws)
        await ws.send(encode_message(AudioFrame(frame_index=0, pcm=noise_frames(2, 1)[0])))
        ws.transport.write_eof()  # the client's side of TCP is shut; no close frame, no end
        await eventually(lambda: worker.engine.sessions_in_use == 0, timeout_s=2.0, what="slot freed")
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(5):
                while True:
                    await ws.recv()
        await serves_a_call(worker)


async def test_a_restarted_worker_serves_new_calls_and_its_old_calls_end_with_1001() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = worker_config()
    backend = RemoteWorker(f"ws://127.0.0.1:{port}/v1/call", TOKEN, retry=RetryPolicy(first_delay_s=0.05, budget_s=0.2))
    async with running_worker(config, port=port):
        call = await backend.open_call(SessionSettingsUpdate(seed=4))
        await call.send_audio(np.zeros(FRAME, dtype=np.int16))
        await call.receive(timeout=10)
    # The worker went away under the call: it ends with 1001, never hangs.
    with pytest.raises(WorkerConnectionError) as lost:
        await call.receive(timeout=5)
    assert lost.value.code == 1001
    with pytest.raises(WorkerUnavailableError):
        await backend.open_call()  # nothing listens on the port
    async with running_worker(config, port=port) as restarted:
        again = await backend.open_call(SessionSettingsUpdate(seed=4))  # same URL, same backend object
        await again.send_audio(np.zeros(FRAME, dtype=np.int16))
        assert (await again.receive(timeout=10)).frame_index == 0
        await again.close()
        await eventually(lambda: restarted.engine.sessions_in_use == 0, timeout_s=1.0, what="slot freed")
