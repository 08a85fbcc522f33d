"""Bad-input fuzzing (hypothesis) of every entry point a stranger can reach, over real loopback
servers: the worker's call WebSocket, the Twilio agent's media stream and webhook, and the
WebRTC agent's signalling. Whatever arrives, the server answers with a clean rejection or goes
on, never crashes or hangs, and leaks no call: afterwards every slot is free and a valid call
still works.

Hypothesis runs derandomised (the same examples every run, no example database), and each
server runs in a thread of its own so that each example drives it from a fresh event loop.
"""

from __future__ import annotations

import asyncio
import base64
import json
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from agents.twilio.app import create_app as create_twilio_app
from agents.twilio.caller import TwilioCaller
from agents.webrtc.app import WebRTCAgentConfig
from agents.webrtc.app import create_app as create_webrtc_app
from pipecat_michi.engine.call import LocalEngine
from pipecat_michi.engine.config import EngineConfig
from pipecat_michi.engine.engine import DuplexEngine
from pipecat_michi.engine.settings import SessionSettingsUpdate
from pipecat_michi.serving import serve_on_loopback
from pipecat_michi.worker.protocol import (
    KIND_AUDIO,
    KIND_CONTROL,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    AudioFrame,
    EndMessage,
    HelloMessage,
    encode_message,
)
from pipecat_michi.worker.app import create_app as create_worker_app
from pipecat_michi.worker.config import WorkerConfig
from tests.support import eventually, speech_8k, twilio_agent_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

def fuzz(max_examples: int) -> settings:
    """Derandomised (the same examples every run), no example database, no per-example deadline."""
    return settings(
        max_examples=max_examples, derandomize=True, database=None, deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
TOKEN = "fuzz-token-0123456789"
FRAME = 1920
ENGINE = EngineConfig(preset="tiny", device="cpu", slot_capacity=2, fill_after_ms=5000)
CLOSE_TIMEOUT_S = 15.0  # a server that has not closed a bad call by then hangs: the test fails

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@contextmanager
def served_in_thread(app) -> Iterator[str]:  # noqa: ANN001 - any ASGI app
    """Serve ``app`` on loopback from a thread with its own event loop; yield ``host:port``."""
    started: queue.Queue[str | BaseException] = queue.Queue()
    stop = threading.Event()

    async def serve() -> None:
        try:
            async with serve_on_loopback(app) as host:
                started.put(host)
                await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            started.put(exc)

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="fuzz-server", daemon=True)
    thread.start()
    host = started.get(timeout=60)
    if isinstance(host, BaseException):
        raise host
    try:
        yield host
    finally:
        stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive(), "the server did not shut down"


def _wait_until(condition, timeout_s: float, what: str) -> None:  # noqa: ANN001
    """``eventually`` from a test thread (the servers' loops run in threads of their own)."""
    asyncio.run(eventually(condition, timeout_s, what))


async def _until_closed(ws) -> int | None:  # noqa: ANN001 - a websockets connection
    """Drain what the server sends until it closes; the close code. Fails on a hang."""
    async with asyncio.timeout(CLOSE_TIMEOUT_S):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed:
            return ws.close_code


# --- the worker's call WebSocket --------------------------------------------------------------

_hello = st.builds(
    lambda seed, threshold: encode_message(
        HelloMessage(protocol_version=PROTOCOL_VERSION, session=SessionSettingsUpdate(seed=seed, speak_threshold=threshold))
    ),
    st.integers(0, 2**31),
    st.floats(0.01, 0.99),
)
_audio = st.builds(
    lambda index, level: encode_message(
        AudioFrame(frame_index=index, pcm=np.full(FRAME, level, dtype=np.int16))
    ),
    st.integers(0, 10),
    st.integers(-32768, 32767),
)
_control = st.builds(
    lambda body: bytes((KIND_CONTROL,)) + json.dumps(body).encode(),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["hello", "inject_text", "update_settings", "reset", "end", "dance"])},
        optional={"protocol_version": json_values, "text": json_values, "role": json_values,
                  "session": json_values, "request_id": json_values, "pinned": json_values},
    ),
)
_mangled = st.tuples(st.sampled_from([KIND_CONTROL, KIND_AUDIO, 0x7F, 0xFF]), st.binary(max_size=80)).map(
    lambda kind_rest: bytes((kind_rest[0],)) + kind_rest[1]
)
worker_messages = st.lists(_hello | _audio | _control | _mangled | st.text(max_size=40), min_size=1, max_size=6)


@pytest.fixture(scope="module")
def worker_host() -> Iterator[tuple[str, object]]:
    app = create_worker_app(WorkerConfig(token=TOKEN, engine=ENGINE))
    with served_in_thread(app) as host:
        yield host, app.state.worker


@fuzz(40)
@given(messages=worker_messages, say_hello_first=st.booleans())
def test_the_worker_survives_any_message_sequence(worker_host, messages: list[bytes | str], say_hello_first: bool) -> None:
    host, worker = worker_host

    async def call() -> None:
        async with connect(f"ws://{host}/v1/call", additional_headers={"Authorization": f"Bearer {TOKEN}"},
                           max_size=MAX_MESSAGE_BYTES, compression=None) as ws:
            try:
                if say_hello_first:
                    await ws.send(encode_message(HelloMessage(protocol_version=PROTOCOL_VERSION)))
                for message in messages:
                    await ws.send(message)
                await ws.send(encode_message(EndMessage()))
            except ConnectionClosed:
                pass  # the worker already ended the call: that is a clean rejection
            code = await _until_closed(ws)
        # Any documented close (1000, 1009, 4000-4004, ...), never an internal failure (1011) or
        # a dropped connection without a close frame (1006).
        assert code not in (None, 1006, 1011), code

    asyncio.run(call())
    _wait_until(lambda: worker.engine.sessions_in_use == 0 and not worker.calls, 5.0, "the call's slot freed")


def test_the_worker_still_serves_after_the_fuzzing(worker_host) -> None:
    host, worker = worker_host

    async def call() -> None:
        from pipecat_michi.worker.client import RemoteWorker

        remote = await RemoteWorker(f"ws://{host}/v1/call", TOKEN).open_call(SessionSettingsUpdate(seed=0))
        await remote.send_audio(np.zeros(FRAME, dtype=np.int16), 0)
        assert (await remote.receive(timeout=10)).frame_index == 0
        await remote.close()

    asyncio.run(call())
    _wait_until(lambda: worker.engine.sessions_in_use == 0, 5.0, "slot freed")


def test_a_bad_token_never_gets_a_websocket(worker_host) -> None:
    host, _ = worker_host

    async def attempt(header: dict[str, str]) -> int:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"ws://{host}/v1/call", additional_headers=header):
                pass
        return refused.value.response.status_code

    for header in ({}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"},
                   {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": "Bearer "}):
        assert asyncio.run(attempt(header)) == 403, header


# --- the Twilio agent -------------------------------------------------------------------------

_media = st.one_of(
    st.binary(max_size=400).map(lambda b: base64.b64encode(b).decode()),
    st.text(max_size=40),  # not base64
).map(lambda payload: {"event": "media", "media": {"payload": payload, "track": "inbound", "chunk": "1"}})
_twilio_event = st.one_of(
    _media,
    st.builds(lambda digit: {"event": "dtmf", "dtmf": {"digit": digit}}, json_values),
    st.builds(lambda name: {"event": "mark", "mark": {"name": name}}, json_values),
    st.dictionaries(st.sampled_from(["event", "media", "start", "streamSid", "x"]), json_values, max_size=3),
    json_values,
).map(json.dumps)
twilio_messages = st.lists(_twilio_event | st.text(max_size=30) | st.binary(max_size=30), min_size=1, max_size=8)


@pytest.fixture(scope="module")
def twilio_host() -> Iterator[tuple[str, LocalEngine]]:
    backend = LocalEngine(engine=DuplexEngine(ENGINE))
    app = create_twilio_app(twilio_agent_config(), backend=backend)
    with served_in_thread(app) as host:
        yield host, backend


async def _fuzz_a_twilio_stream(host: str, backend: LocalEngine, messages: list, start_first: bool) -> None:
    """One stream of ``messages``; ``start_first``: after a valid start, so the pipeline is live."""
    caller = await TwilioCaller.dial(host)  # the webhook first, as Twilio does
    if start_first:
        await caller.connect()  # a valid connected + start: the pipeline opens a model call
        ws = caller._ws
        async with asyncio.timeout(10):
            while not backend.engine.sessions_in_use:
                await asyncio.sleep(0.01)
    else:
        ws = await connect(f"ws://{host}/ws")
    try:
        for message in messages:
            await ws.send(message)
        # Hang up as Twilio does: stop, then close the socket (the agent may close first).
        await ws.send(json.dumps({"event": "stop", "stop": {}}))
    except ConnectionClosed:
        pass
    async with asyncio.timeout(CLOSE_TIMEOUT_S):
        await ws.close()


@fuzz(15)
@given(messages=twilio_messages, start_first=st.booleans())
def test_the_twilio_stream_survives_anything_a_caller_sends(twilio_host, messages: list, start_first: bool) -> None:
    host, backend = twilio_host
    asyncio.run(_fuzz_a_twilio_stream(host, backend, messages, start_first))
    _wait_until(lambda: backend.engine.sessions_in_use == 0, 10.0, "the call's slot freed")


def test_the_twilio_agent_still_answers_a_real_call_after_the_fuzzing(twilio_host) -> None:
    host, backend = twilio_host
    # Its own abuse first, so that it holds alone and in any order: live calls fed garbage.
    garbage = ['{"event": "media", "media": {"payload": "not base64"}}', b"\xff\x00", "{", '{"event": 7}']
    for start_first in (True, True, False):
        asyncio.run(_fuzz_a_twilio_stream(host, backend, garbage, start_first))
        _wait_until(lambda: backend.engine.sessions_in_use == 0, 10.0, "the call's slot freed")

    async def call() -> int:
        async with await TwilioCaller.dial(host) as caller:
            await caller.send_audio(speech_8k(1.0), realtime=False)
            async with asyncio.timeout(20):
                while not caller.log.bot_audio:
                    await asyncio.sleep(0.05)
            return len(caller.log.bot_audio)

    assert asyncio.run(call()) > 0
    _wait_until(lambda: backend.engine.sessions_in_use == 0, 10.0, "slot freed")


@fuzz(60)
@given(form=st.dictionaries(st.text(max_size=12), st.text(max_size=30), max_size=5), signature=st.text(max_size=40))
def test_the_twiml_webhook_rejects_every_unsigned_or_forged_request(form: dict, signature: str) -> None:
    app = create_twilio_app(
        twilio_agent_config(public_host="bot.example.test", twilio_account_sid="AC" + "1" * 32, twilio_auth_token="fuzz-auth"),
        backend=LocalEngine(ENGINE),
    )

    async def post() -> int:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            headers = {"X-Twilio-Signature": signature.encode("utf-8")}  # raw bytes, as an attacker sends
            return (await client.post("/twiml", data=form, headers=headers)).status_code

    assert asyncio.run(post()) == 403


# --- the WebRTC agent's signalling ------------------------------------------------------------

_offer_body = st.one_of(
    st.fixed_dictionaries(
        {"sdp": st.text(max_size=60) | st.just("v=0\r\n") | st.text(max_size=30).map(lambda t: "v=0\r\nm=audio 9 " + t),
         "type": st.sampled_from(["offer", "answer", "x"])},
        optional={"pc_id": json_values, "restart_pc": json_values, "request_data": json_values},
    ),
    st.fixed_dictionaries({"pc_id": st.text(max_size=20), "candidates": json_values}),
    json_values,
)


@pytest.fixture(scope="module")
def webrtc_app():  # noqa: ANN201
    # A short connect watchdog: an offer aiortc takes but no peer follows is dropped within the wait below.
    config = WebRTCAgentConfig(backend={"engine": {"preset": "tiny", "device": "cpu"}, "max_call_s": None},
                               connect_timeout_s=2.0, requests_per_minute=100_000)  # fuzzing is one client
    app = create_webrtc_app(config, backend=LocalEngine(ENGINE))
    with served_in_thread(app) as host:
        yield host, app


@fuzz(60)
@given(
    method=st.sampled_from(["POST", "PATCH"]),
    path=st.sampled_from(["/api/offer", "/sessions/{session}/api/offer", "/sessions/nobody/api/offer", "/start"]),
    body=_offer_body | st.binary(max_size=40),
)
def test_webrtc_signalling_answers_any_body_with_a_client_error_never_a_crash(webrtc_app, method, path, body) -> None:
    host, app = webrtc_app

    async def request() -> int:
        async with httpx.AsyncClient(base_url=f"http://{host}", timeout=20) as http:
            target = path
            if "{session}" in path:
                target = path.format(session=(await http.post("/start", json={})).json()["sessionId"])
            if isinstance(body, bytes):
                response = await http.request(method, target, content=body, headers={"content-type": "application/json"})
            else:
                response = await http.request(method, target, json=body)
            return response.status_code

    status = asyncio.run(request())
    assert status < 500 or status == 503, status
    _wait_until(lambda: not app.state.calls, 10.0, "no peer left behind")
