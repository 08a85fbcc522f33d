"""The worker on a real loopback uvicorn: batching that never mixes calls, the handshake, every
close code of docs/protocol.md, slots freed on every exit path, and the HTTP endpoints."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
from websockets.exceptions import InvalidStatus

from pipecat_michi.engine.config import EngineConfig
from pipecat_michi.engine.engine import StepResult
from pipecat_michi.engine.settings import SessionSettingsUpdate
from pipecat_michi.model.tokenizer import format_context
from pipecat_michi.worker.client import RemoteCall, RemoteWorker, WorkerError
from pipecat_michi.worker.protocol import (
    KIND_CONTROL,
    MAX_MESSAGE_BYTES,
    AudioFrame,
    EndedMessage,
    encode_message,
)
from pipecat_michi.worker.app import create_app
from pipecat_michi.worker.config import WorkerConfig, WorkerConfigError
from tests.support import (
    WORKER_TOKEN as TOKEN,
    connect_raw,
    expect_fatal,
    hello_bytes,
    last_words,
    noise_frames,
    raw_ready,
    serves_a_call,
    tiny_worker,
    worker_config,
    eventually,
)



# --- batching --------------------------------------------------------------------------------


async def _stream(call: RemoteCall, audio: np.ndarray) -> list[StepResult]:
    results = []
    for frame in audio:
        await call.send_audio(frame)
        results.append(await call.receive(timeout=10))
    await call.close()
    return results


async def test_concurrent_calls_get_one_step_per_frame_in_order_equal_to_running_alone() -> None:
    audio_a, audio_b = noise_frames(1, 8), noise_frames(2, 8)
    settings_a = SessionSettingsUpdate(seed=5, speak_threshold=0.3)
    settings_b = SessionSettingsUpdate(seed=6, speak_threshold=0.3)
    async with tiny_worker() as worker:
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
    async with tiny_worker(engine={"dtype": dtype}) as worker:
        call = await RemoteWorker(worker.url, TOKEN).open_call(SessionSettingsUpdate(seed=5, speak_threshold=0.3))
        results = await _stream(call, noise_frames(1, 4))
    assert [r.frame_index for r in results] == list(range(4))
    assert any(r.audio is not None and np.abs(r.audio).max() > 0 for r in results)


# --- auth and admission -----------------------------------------------------------------------


async def test_wrong_or_missing_token_is_refused_with_403_before_the_upgrade() -> None:
    async with tiny_worker() as worker:
        for token in ("wrong-token", None):
            with pytest.raises(InvalidStatus) as refused:
                async with connect_raw(worker, token):
                    pass
            assert refused.value.response.status_code == 403
        await serves_a_call(worker)


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
    async with tiny_worker(engine={"slot_capacity": 1}) as worker:
        async with connect_raw(worker) as first:
            await raw_ready(first)
            async with connect_raw(worker) as second:
                await expect_fatal(second, 1013)  # before any hello
        await eventually(lambda: worker.engine.sessions_in_use == 0, timeout_s=1.0, what="slot freed")
        await serves_a_call(worker)
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
    async with tiny_worker() as worker:
        for name, data in BAD_MESSAGES.items():
            async with connect_raw(worker) as ws:
                await raw_ready(ws)
                await ws.send(data)
                try:
                    await expect_fatal(ws, 4000)
                except AssertionError as exc:
                    raise AssertionError(f"{name}: {exc}") from exc
            await serves_a_call(worker)
        # A garbage first message is a bad message too, before any hello.
        async with connect_raw(worker) as ws:
            await ws.send(b"\x07\x00")
            await expect_fatal(ws, 4000)
        assert worker.engine.sessions_in_use == 0


async def test_an_oversized_message_closes_with_1009() -> None:
    async with tiny_worker() as worker:
        async with connect_raw(worker) as ws:
            await raw_ready(ws)
            await ws.send(bytes((KIND_CONTROL,)) + b" " * MAX_MESSAGE_BYTES)
            _, code = await last_words(ws)
            assert code == 1009
        await eventually(lambda: worker.engine.sessions_in_use == 0, timeout_s=1.0, what="slot freed")
        await serves_a_call(worker)


async def test_another_protocol_version_gets_4001() -> None:
    async with tiny_worker() as worker:
        async with connect_raw(worker) as ws:
            await ws.send(bytes((KIND_CONTROL,)) + json.dumps({"type": "hello", "protocol_version": 2}).encode())
            await expect_fatal(ws, 4001)
        await serves_a_call(worker)


async def test_unexpected_messages_get_4004() -> None:
    pcm = noise_frames(3, 1)[0]
    async with tiny_worker() as worker:
        # Audio before hello.
        async with connect_raw(worker) as ws:
            await ws.send(encode_message(AudioFrame(frame_index=0, pcm=pcm)))
            await expect_fatal(ws, 4004)
        # A frame index that does not increase.
        async with connect_raw(worker) as ws:
            await raw_ready(ws)
            await ws.send(encode_message(AudioFrame(frame_index=3, pcm=pcm)))
            await ws.send(encode_message(AudioFrame(frame_index=3, pcm=pcm)))
            await expect_fatal(ws, 4004)
        # A second hello.
        async with connect_raw(worker) as ws:
            await raw_ready(ws)
            await ws.send(hello_bytes())
            await expect_fatal(ws, 4004)
        await eventually(lambda: worker.engine.sessions_in_use == 0, timeout_s=1.0, what="slot freed")
        await serves_a_call(worker)


async def test_no_hello_in_time_gets_4002() -> None:
    async with tiny_worker(handshake_timeout_s=0.3) as worker:
        async with connect_raw(worker) as ws:
            await expect_fatal(ws, 4002)
        await serves_a_call(worker)


async def test_a_silent_client_gets_ended_idle_timeout_and_4003() -> None:
    async with tiny_worker(idle_timeout_s=0.5) as worker:
        async with connect_raw(worker) as ws:
            await raw_ready(ws)
            messages, code = await last_words(ws)
            assert code == 4003
            assert messages == [EndedMessage(reason="idle_timeout", frames=0)]
        await eventually(lambda: worker.engine.sessions_in_use == 0, timeout_s=1.0, what="slot freed")


async def test_an_abrupt_disconnect_frees_the_slot_within_a_second() -> None:
    async with tiny_worker() as worker:
        for frames in (0, 3):
            ws = await connect_raw(worker)
            await raw_ready(ws)
            for index, frame in enumerate(noise_frames(4, frames)):
                await ws.send(encode_message(AudioFrame(frame_index=index, pcm=frame)))
            assert worker.engine.sessions_in_use == 1
            ws.transport.abort()  # TCP gone, no close frame, no end
            await eventually(lambda: worker.engine.sessions_in_use == 0, timeout_s=1.0, what="slot freed")
            await ws.close()
        await serves_a_call(worker)
        await eventually(lambda: not worker.app.state.worker.calls, timeout_s=1.0, what="calls forgotten")


# --- control messages -------------------------------------------------------------------------


async def test_injection_mid_call_grows_the_context_by_its_tokens_and_a_refusal_keeps_the_call() -> None:
    async with tiny_worker(engine={"kv_capacity": 64}) as worker:
        call = await RemoteWorker(worker.url, TOKEN).open_call(SessionSettingsUpdate(seed=2))
        for frame in noise_frames(5, 2):
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
        await call.send_audio(noise_frames(6, 1)[0])
        assert (await call.receive(timeout=10)).frame_index == 2
        await call.close()


# --- shutdown and HTTP ------------------------------------------------------------------------


async def test_a_shutting_down_worker_ends_calls_with_ended_shutdown_and_1001() -> None:
    async with tiny_worker() as worker:
        ws = await connect_raw(worker)
        await raw_ready(ws)
        worker.server.should_exit = True
        messages, code = await last_words(ws)
        assert code == 1001 and messages == [EndedMessage(reason="shutdown", frames=0)]


async def test_health_readiness_metrics_and_stats_endpoints() -> None:
    async with tiny_worker() as worker:
        await serves_a_call(worker)
        async with httpx.AsyncClient(base_url=worker.http_url, timeout=10) as http:
            assert (await http.get("/healthz")).status_code == 200
            ready = await http.get("/readyz")
            assert ready.status_code == 200
            body = ready.json()
            assert {k: body.pop(k) for k in ("ready", "slots_in_use", "slot_capacity")} == {
                "ready": True, "slots_in_use": 0, "slot_capacity": 2}
            # The start-up calibration's verdict, for an operator wondering why calls lag.
            assert set(body) == {"step_ms_p50", "real_time"} and body["step_ms_p50"] > 0
            assert body["real_time"] == (body["step_ms_p50"] <= worker.engine.frame_ms)
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
                "michi_worker_unheard_frames_at_close_total",
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
    app = create_app(worker_config())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://worker") as http:
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).status_code == 503


def test_a_model_whose_codec_rate_the_protocol_cannot_carry_is_refused_at_start() -> None:
    from fastapi.testclient import TestClient

    from pipecat_michi.engine.engine import DuplexEngine
    from pipecat_michi.model.config import MichiConfig
    from pipecat_michi.model.michi import MichiModel
    from pipecat_michi.model.tokenizer import load_tokenizer

    tiny = MichiConfig.preset("tiny")
    config = tiny.model_copy(update={"codec": tiny.codec.model_copy(update={"sample_rate_hz": 16000})})
    engine = DuplexEngine(model=MichiModel(config).eval(), tokenizer=load_tokenizer(config))
    app = create_app(WorkerConfig(token=TOKEN, engine=EngineConfig(device="cpu", slot_capacity=1)), engine)
    with pytest.raises(WorkerConfigError, match="16000 Hz; protocol version 1 carries 24000 Hz"):
        with TestClient(app):
            pass
