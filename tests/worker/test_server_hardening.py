"""The worker against hostile clients (issue 12): raw WebSockets and raw TCP on loopback."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from pipecat_michi.engine.config import EngineConfig
from pipecat_michi.serving import ServerLimits
from pipecat_michi.worker.protocol import (
    KIND_CONTROL,
    PROTOCOL_VERSION,
    AudioFrame,
    EndMessage,
    HelloMessage,
    InjectTextMessage,
    ProtocolError,
    decode_client_message,
    decode_worker_message,
    encode_message,
    encode_voice_prompt,
)
from pipecat_michi.worker.config import WorkerConfig
from pipecat_michi.worker.harness import running_worker
from tests.support import eventually

TOKEN = "hardening-token-0123456789"
FRAME = 1920
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _config(**overrides) -> WorkerConfig:
    engine = EngineConfig(preset="tiny", device="cpu", slot_capacity=2, fill_after_ms=5000.0)
    return WorkerConfig(token=TOKEN, engine=engine, **overrides)


def _hello(**fields) -> bytes:
    return encode_message(HelloMessage(protocol_version=PROTOCOL_VERSION, **fields))


async def _messages_until_close(ws) -> list:  # noqa: ANN001 - a websockets connection
    received = []
    async with asyncio.timeout(15):
        try:
            while True:
                received.append(decode_worker_message(await ws.recv(), FRAME))
        except ConnectionClosed:
            return received


@pytest.mark.parametrize("version", ["true", "1.0", '"1"'])
def test_protocol_version_is_strictly_an_integer(version: str) -> None:
    data = bytes([KIND_CONTROL]) + f'{{"type": "hello", "protocol_version": {version}}}'.encode()
    with pytest.raises(ProtocolError) as raised:
        decode_client_message(data, FRAME)
    assert raised.value.code == 4000


async def test_bad_voice_prompts_and_flow_steps_close_with_4000_and_free_the_slot() -> None:
    async with running_worker(_config(max_flow_steps=4)) as worker:
        hellos = [
            _hello(voice_prompt_pcm_b64=base64.b64encode(b"\x01\x00").decode()),  # 1 sample
            _hello(voice_prompt_pcm_b64=encode_voice_prompt(np.ones(FRAME - 1, dtype=np.int16))),
            _hello(session={"flow_steps": 32}),
        ]
        for hello in hellos:
            async with connect(worker.url, additional_headers=AUTH) as ws:
                await ws.send(hello)
                received = await _messages_until_close(ws)
                assert ws.close_code == 4000, received
                assert received[-1].type == "error" and received[-1].fatal
        await eventually(lambda: worker.engine.sessions_in_use == 0, what="no slot held")


async def test_every_injection_before_end_gets_its_answer() -> None:
    async with running_worker(_config()) as worker:
        async with connect(worker.url, additional_headers=AUTH) as ws:
            await ws.send(_hello())
            assert decode_worker_message(await ws.recv(), FRAME).type == "ready"
            for i in range(5):
                await ws.send(encode_message(InjectTextMessage(text=f"fact {i}", role="system", request_id=str(i))))
            await ws.send(encode_message(EndMessage()))
            received = await _messages_until_close(ws)
        answers = [m.request_id for m in received if m.type in ("injected", "error")]
        assert answers == ["0", "1", "2", "3", "4"]
        assert received[-1].type == "ended" and ws.close_code == 1000


async def test_a_first_frame_index_at_the_uint32_limit_ends_with_4004_not_1011() -> None:
    # The next (filled) step would be frame 2**32, which the wire cannot carry.
    config = _config().model_copy(update={"engine": EngineConfig(preset="tiny", device="cpu", slot_capacity=2, fill_after_ms=50.0)})
    async with running_worker(config) as worker:
        async with connect(worker.url, additional_headers=AUTH) as ws:
            await ws.send(_hello())
            assert decode_worker_message(await ws.recv(), FRAME).type == "ready"
            await ws.send(encode_message(AudioFrame(frame_index=0xFFFF_FFFF, pcm=np.zeros(FRAME, np.int16))))
            received = await _messages_until_close(ws)
        assert ws.close_code == 4004, received
        await eventually(lambda: worker.engine.sessions_in_use == 0, what="no slot held")


async def test_call_opens_per_token_are_rate_limited() -> None:
    async with running_worker(_config(max_call_opens_per_minute=2)) as worker:
        codes = []
        for _ in range(3):
            async with connect(worker.url, additional_headers=AUTH) as ws:
                try:
                    await ws.send(_hello())
                    await ws.send(encode_message(EndMessage()))
                except ConnectionClosed:
                    pass  # refused before the hello was read
                await _messages_until_close(ws)
                codes.append(ws.close_code)
        assert codes == [1000, 1000, 1013]


async def test_half_sent_headers_are_closed_and_health_still_answers() -> None:
    limits = ServerLimits(header_timeout_s=0.5)
    async with running_worker(_config(server=limits)) as worker:
        host, port = worker.http_url.removeprefix("http://").split(":")
        idle = [await asyncio.open_connection(host, int(port)) for _ in range(5)]
        for _, writer in idle[:3]:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
            await writer.drain()
        async with asyncio.timeout(5):  # the server closes them: EOF
            for reader, _ in idle:
                assert await reader.read() == b""
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(5):
            assert (await reader.read()).startswith(b"HTTP/1.1 200")
        for _, w in [*idle, (reader, writer)]:
            w.close()


def test_production_logs_carry_no_local_variables(capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    from loguru import logger

    from pipecat_michi.serving import configure_production_logging

    def fail(secret_token: str) -> None:
        raise ValueError("boom")

    configure_production_logging("info")
    try:
        try:
            fail("s3cr3t" + "-in-a-local")  # the joined value appears only as a local
        except ValueError:
            logger.exception("a call failed")
        err = capsys.readouterr().err
    finally:
        logger.remove()
        logger.add(sys.stderr)
    assert "a call failed" in err and "ValueError: boom" in err
    assert "s3cr3t-in-a-local" not in err


@pytest.mark.parametrize("secret", [{"token": "x"}, {"token": "short-token"}, {"tenant_tokens": ["a" * 15]}])
def test_short_tokens_are_refused_at_start(secret: dict) -> None:
    from pipecat_michi.worker.app import create_app
    from pipecat_michi.worker.config import WorkerConfigError

    with pytest.raises(WorkerConfigError, match="shorter than 16"):
        create_app(WorkerConfig(engine=EngineConfig(preset="tiny", device="cpu"), **secret))


async def test_refused_strangers_are_logged_at_a_bounded_rate() -> None:
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="WARNING")
    try:
        async with running_worker(_config()) as worker:
            for _ in range(25):
                try:
                    async with connect(worker.url, additional_headers={"Authorization": "Bearer guess"}):
                        pass
                except Exception:  # noqa: BLE001 - refused at the upgrade (HTTP 403), as expected
                    pass
    finally:
        logger.remove(sink)
    refusals = [line for line in lines if "wrong bearer token" in line]
    assert 1 <= len(refusals) <= 10
