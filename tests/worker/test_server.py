"""The worker on a real loopback uvicorn: batching that never mixes calls, the handshake, every
close code of docs/protocol.md, slots freed on every exit path, and the HTTP endpoints."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from pipecat_michi.engine.config import EngineConfig
from pipecat_michi.engine.engine import StepResult
from pipecat_michi.engine.settings import SessionSettingsUpdate
from pipecat_michi.model.tokenizer import format_context
from pipecat_michi.worker.client import RemoteCall, RemoteWorker, WorkerError
from pipecat_michi.worker.protocol import (
    KIND_CONTROL,
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
from pipecat_michi.worker.server import RunningWorker, WorkerConfig, WorkerConfigError, create_app, running_worker
from tests.support import eventually

TOKEN = "test-token-0123456789"
FRAME = 1920


def _audio(seed: int, frames: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((frames, FRAME)) * 3000).astype(np.int16)


def _config(**overrides: object) -> WorkerConfig:
    engine = {"preset": "tiny", "device": "cpu", "slot_capacity": 2, "fill_after_ms": 5000.0}
    engine.update(overrides.pop("engine", {}))  # type: ignore[arg-type]
    return WorkerConfig(token=TOKEN, engine=EngineConfig(**engine), **overrides)


@asynccontextmanager
async def _worker(**overrides: object) -> AsyncIterator[RunningWorker]:
    async with running_worker(_config(**overrides)) as worker:
        yield worker


# --- raw WebSocket helpers: no client class, so the bad cases are the bytes we choose ---------


def _connect(worker: RunningWorker, token: str | None = TOKEN):
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return connect(worker.url, additional_headers=headers, max_size=MAX_MESSAGE_BYTES, compression=None)


def _hello(**fields: object) -> bytes:
    return encode_message(HelloMessage(protocol_version=PROTOCOL_VERSION, **fields))  # type: ignore[arg-type]


async def _recv(ws: ClientConnection) -> WorkerMessage:
    async with asyncio.timeout(10):
        return decode_worker_message(await ws.recv(), FRAME)  # type: ignore[arg-type]


async def _ready(ws: ClientConnection) -> ReadyMessage:
    await ws.send(_hello(session=SessionSettingsUpdate(seed=1)))
    ready = await _recv(ws)
    assert isinstance(ready, ReadyMessage), ready
    return ready


async def _last_words(ws: ClientConnection) -> tuple[list[WorkerMessage], int]:
    """Every control message the worker sends until it closes (STEPs skipped), and the close code."""
    messages: list[WorkerMessage] = []
    try:
        while True:
            message = await _recv(ws)
            if not isinstance(message, StepMessage):
                messages.append(message)
    except ConnectionClosed as closed:
        assert closed.rcvd is not None, "the worker dropped the connection without a close frame"
        return messages, closed.rcvd.code


async def _expect_fatal(ws: ClientConnection, code: int) -> None:
    messages, close_code = await _last_words(ws)
    assert close_code == code
    assert len(messages) == 1 and isinstance(messages[0], ErrorMessage), messages
    assert (messages[0].code, messages[0].fatal) == (code, True)
    # The close reason is the error's message, shortened to fit a close frame.
    reason = ws.close_reason or ""
    assert len(reason.encode()) <= 123 and messages[0].message.startswith(reason.removesuffix("..."))


async def _serves_a_call(worker: RunningWorker) -> None:
    """The worker still works: a new call gets ready and a STEP, and its slot comes back."""
    async with _connect(worker) as ws:
        await _ready(ws)
        await ws.send(encode_message(AudioFrame(frame_index=0, pcm=_audio(0, 1)[0])))
        step = await _recv(ws)
        assert isinstance(step, StepMessage) and step.frame_index == 0
        await ws.send(encode_message(EndMessage()))
        messages, code = await _last_words(ws)
        assert code == 1000 and messages == [EndedMessage(reason="client_end", frames=1)]
    await eventually(lambda: worker.engine.sessions_in_use == 0, timeout_s=1.0, what="slot freed")


# --- batching --------------------------------------------------------------------------------


async def _stream(call: RemoteCall, audio: np.ndarray) -> list[StepResult]:
    results = []
    for frame in audio:
        await call.send_audio(frame)
        results.append(await call.receive(timeout=10))
    await call.close()
    return results


async def test_concurrent_calls_get_one_step_per_frame_in_order_equal_to_running_alone() -> None:
    audio_a, audio_b = _audio(1, 8), _audio(2, 8)
    settings_a = SessionSettingsUpdate(seed=5, speak_threshold=0.3)
    settings_b = SessionSettingsUpdate(seed=6, speak_threshold=0.3)
    async with _worker() as worker:
        backend = RemoteWorker(worker.url, TOKEN)
        call_a = await backend.open_call(settings_a, system_prompt="You are a helpful agent.")
        call_b = await backend.open_call(settings_b)
        together_a, together_b = await asyncio.gather(_stream(call_a, audio_a), _stream(call_b, audio_b))
        alone_a = await _stream(await backend.open_call(settings_a, system_prompt="You are a helpful agent."), audio_a)
        alone_b = await _stream(await backend.open_call(settings_b), audio_b)
        assert worker.engine.stats.ticks < 32  # some ticks stepped both calls together
    for together, alone in ((together_a, alone_a), (together_b, alone_b)):
        assert [r.frame_index for r in together] == list(range(8))
        assert not any(r.filled for r in together)
        assert [(r.bot_text, r.transcript, r.speaking) for r in together] == [
            (r.bot_text, r.transcript, r.speaking) for r in alone
        ]
        for x, y in zip(together, alone):
            assert x.speak_prob == pytest.approx(y.speak_prob, abs=1e-5)
            assert (x.audio is None) == (y.audio is None) == (not x.speaking)
            if x.audio is not None:
                assert np.abs(x.audio.astype(int) - y.audio.astype(int)).max() <= 2
            assert x.kv_length is None
    assert any(r.speaking for r in together_a + together_b)
    assert any(r.bot_text for r in together_a + together_b)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
async def test_a_call_on_a_half_precision_worker(dtype: str) -> None:
    async with _worker(engine={"dtype": dtype}) as worker:
        call = await RemoteWorker(worker.url, TOKEN).open_call(SessionSettingsUpdate(seed=5, speak_threshold=0.3))
        results = await _stream(call, _audio(1, 4))
    assert [r.frame_index for r in results] == list(range(4))
    assert any(r.audio is not None and np.abs(r.audio).max() > 0 for r in results)


# --- auth and admission -----------------------------------------------------------------------


async def test_wrong_or_missing_token_is_refused_with_403_before_the_upgrade() -> None:
    async with _worker() as worker:
        for token in ("wrong-token", None):
            with pytest.raises(InvalidStatus) as refused:
                async with _connect(worker, token):
                    pass
            assert refused.value.response.status_code == 403
        await _serves_a_call(worker)


def test_a_worker_without_token_refuses_to_start_unless_told() -> None:
    engine = EngineConfig(preset="tiny", device="cpu")
    with pytest.raises(WorkerConfigError, match="MICHI_WORKER_TOKEN"):
        create_app(WorkerConfig(engine=engine))
    create_app(WorkerConfig(engine=engine, allow_unauthenticated=True))


def test_config_reads_the_environment_with_nested_engine_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICHI_WORKER_TOKEN", "from-env")
    monkeypatch.setenv("MICHI_WORKER_ENGINE__SLOT_CAPACITY", "5")
    config = WorkerConfig(engine={"preset": "tiny"})  # type: ignore[arg-type]
    assert config.token is not None and config.token.get_secret_value() == "from-env"
    assert (config.engine.slot_capacity, config.engine.preset) == (5, "tiny")
    assert "from-env" not in repr(config)


async def test_a_full_worker_answers_1013_at_once_and_admits_again_when_a_slot_frees() -> None:
    async with _worker(engine={"slot_capacity": 1}) as worker:
        async with _connect(worker) as first:
            await _ready(first)
            async with _connect(worker) as second:
                await _expect_fatal(second, 1013)  # before any hello
        await eventually(lambda: worker.engine.sessions_in_use == 0, timeout_s=1.0, what="slot freed")
        await _serves_a_call(worker)
        stats = worker.app.state.worker.metrics.stats()
        assert stats.rejected_calls == 1


# --- bad messages and timeouts ----------------------------------------------------------------


BAD_MESSAGES = {
    "unknown kind": b"\xffgarbage",
    "empty": b"",
    "bad JSON": bytes((KIND_CONTROL,)) + b"{not json",
    "unknown type": bytes((KIND_CONTROL,)) + json.dumps({"type": "dance"}).encode(),
    "short audio": encode_message(AudioFrame(frame_index=0, pcm=np.zeros(10, dtype=np.int16))),
    "text message": "hello",
}


async def test_bad_messages_end_their_call_with_4000_and_the_worker_serves_on() -> None:
    async with _worker() as worker:
        for name, data in BAD_MESSAGES.items():
            async with _connect(worker) as ws:
                await _ready(ws)
                await ws.send(data)
                try:
                    await _expect_fatal(ws, 4000)
                except AssertionError as exc:
                    raise AssertionError(f"{name}: {exc}") from exc
            await _serves_a_call(worker)
        # A garbage first message is a bad message too, before any hello.
        async with _connect(worker) as ws:
            await ws.send(b"\x07\x00")
            await _expect_fatal(ws, 4000)
        assert worker.engine.sessions_in_use == 0


async def test_an_oversized_message_closes_with_1009() -> None:
    async with _worker() as worker:
        async with _connect(worker) as ws:
            await _ready(ws)
            await ws.send(bytes((KIND_CONTROL,)) + b" " * MAX_MESSAGE_BYTES)
            _, code = await _last_words(ws)
            assert code == 1009
        await eventually(lambda: worker.engine.sessions_in_use == 0, timeout_s=1.0, what="slot freed")
        await _serves_a_call(worker)


async def test_another_protocol_version_gets_4001() -> None:
    async with _worker() as worker:
        async with _connect(worker) as ws:
            await ws.send(bytes((KIND_CONTROL,)) + json.dumps({"type": "hello", "protocol_version": 2}).encode())
            await _expect_fatal(ws, 4001)
        await _serves_a_call(worker)


async def test_unexpected_messages_get_4004() -> None:
    pcm = _audio(3, 1)[0]
    async with _worker() as worker:
        # Audio before hello.
        async with _connect(worker) as ws:
            await ws.send(encode_message(AudioFrame(frame_index=0, pcm=pcm)))
            await _expect_fatal(ws, 4004)
        # A frame index that does not increase.
        async with _connect(worker) as ws:
            await _ready(ws)
            await ws.send(encode_message(AudioFrame(frame_index=3, pcm=pcm)))
            await ws.send(encode_message(AudioFrame(frame_index=3, pcm=pcm)))
            await _expect_fatal(ws, 4004)
        # A second hello.
        async with _connect(worker) as ws:
            await _ready(ws)
            await ws.send(_hello())
            await _expect_fatal(ws, 4004)
        await eventually(lambda: worker.engine.sessions_in_use == 0, timeout_s=1.0, what="slot freed")
        await _serves_a_call(worker)


async def test_no_hello_in_time_gets_4002() -> None:
    async with _worker(handshake_timeout_s=0.3) as worker:
        async with _connect(worker) as ws:
            await _expect_fatal(ws, 4002)
        await _serves_a_call(worker)


async def test_a_silent_client_gets_ended_idle_timeout_and_4003() -> None:
    async with _worker(idle_timeout_s=0.5) as worker:
        async with _connect(worker) as ws:
            await _ready(ws)
            messages, code = await _last_words(ws)
            assert code == 4003
            assert messages == [EndedMessage(reason="idle_timeout", frames=0)]
        await eventually(lambda: worker.engine.sessions_in_use == 0, timeout_s=1.0, what="slot freed")


async def test_an_abrupt_disconnect_frees_the_slot_within_a_second() -> None:
    async with _worker() as worker:
        for frames in (0, 3):
            ws = await _connect(worker)
            await _ready(ws)
            for index, frame in enumerate(_audio(4, frames)):
                await ws.send(encode_message(AudioFrame(frame_index=index, pcm=frame)))
            assert worker.engine.sessions_in_use == 1
            ws.transport.abort()  # TCP gone, no close frame, no end
            await eventually(lambda: worker.engine.sessions_in_use == 0, timeout_s=1.0, what="slot freed")
            await ws.close()
        await _serves_a_call(worker)
        await eventually(lambda: not worker.app.state.worker.calls, timeout_s=1.0, what="calls forgotten")


# --- control messages -------------------------------------------------------------------------


async def test_injection_mid_call_grows_the_context_by_its_tokens_and_a_refusal_keeps_the_call() -> None:
    async with _worker(engine={"kv_capacity": 64}) as worker:
        call = await RemoteWorker(worker.url, TOKEN).open_call(SessionSettingsUpdate(seed=2))
        for frame in _audio(5, 2):
            await call.send_audio(frame)
            await call.receive(timeout=10)
        first = await call.inject_text("Open 9 to 5.", role="document")
        second = await call.inject_text("Closed Sundays.", role="document")
        tokenizer = worker.engine.tokenizer
        assert second.token_count == len(tokenizer.encode(format_context(tokenizer, "document", "Closed Sundays.")))
        assert second.kv_length == first.kv_length + second.token_count
        assert first.kv_length == 2 + first.token_count  # two frames, then the text
        # Pinned text over half the window: refused, and the call goes on.
        with pytest.raises(WorkerError) as refused:
            await call.inject_text("x" * 200, role="document", pinned=True)
        assert refused.value.code == 4000 and "half" in refused.value.message
        await call.send_audio(_audio(6, 1)[0])
        assert (await call.receive(timeout=10)).frame_index == 2
        await call.close()


# --- shutdown and HTTP ------------------------------------------------------------------------


async def test_a_shutting_down_worker_ends_calls_with_ended_shutdown_and_1001() -> None:
    async with _worker() as worker:
        ws = await _connect(worker)
        await _ready(ws)
        worker.server.should_exit = True
        messages, code = await _last_words(ws)
        assert code == 1001 and messages == [EndedMessage(reason="shutdown", frames=0)]


async def test_health_readiness_metrics_and_stats_endpoints() -> None:
    async with _worker() as worker:
        await _serves_a_call(worker)
        async with httpx.AsyncClient(base_url=worker.http_url, timeout=10) as http:
            assert (await http.get("/healthz")).status_code == 200
            ready = await http.get("/readyz")
            assert ready.status_code == 200
            assert ready.json() == {"ready": True, "slots_in_use": 0, "slot_capacity": 2}
            metrics = (await http.get("/metrics")).text
            for name in (
                "michi_worker_slots_in_use",
                "michi_worker_slot_capacity",
                "michi_worker_step_ms_bucket",
                "michi_worker_step_ms_p99",
                "michi_worker_step_residence_ms_bucket",
                "michi_worker_late_ticks_total",
                "michi_worker_rejected_calls_total",
                "michi_worker_filled_frames_total",
                "michi_worker_dropped_input_frames_total",
                "michi_worker_dropped_outputs_total",
                "michi_worker_calls_total",
            ):
                assert f"\n{name}" in metrics, name
            assert "michi_worker_calls_total 1.0" in metrics
            assert (await http.get("/v1/stats")).status_code == 401
            assert (await http.get("/v1/stats", headers={"Authorization": "Bearer nope"})).status_code == 401
            stats = (await http.get("/v1/stats", headers={"Authorization": f"Bearer {TOKEN}"})).json()
            assert stats["calls_total"] == 1 and stats["ticks"] >= 1
            assert stats["step_ms"]["count"] == stats["ticks"] and stats["step_ms"]["p50"] > 0
            assert stats["step_ms_by_batch"]["1"]["count"] >= 1
    # Without a running engine (no lifespan), the worker is not ready.
    app = create_app(_config())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://worker") as http:
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).status_code == 503
