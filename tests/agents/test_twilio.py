"""The Twilio phone bot, driven exactly as Twilio drives it: signed webhook, then media stream;
and as an attacker would drive it (issue 12): raw WebSockets, forged starts, big bodies, and a
loopback stand-in for Twilio's REST API that records every request it gets."""

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Request
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import connect

from agents.twilio.app import create_app
from agents.twilio.caller import TwilioCaller
from agents.twilio.config import TwilioAgentConfig
from agents.twilio.security import STREAM_TOKEN_PARAMETER, StreamTokens
from pipecat_michi.engine.call import LocalEngine
from pipecat_michi.engine.config import EngineConfig
from tests.service.service_fakes import ScriptedBackend, ScriptedCall, Step
from tests.support import eventually, serve
from tests.support import speech_8k as _speech_8k
from tests.support import twilio_agent_config as _config

AUTH_TOKEN = "test-auth-token"
PUBLIC_HOST = "bot.example.test"
ACCOUNT_SID = "AC" + "0123456789abcdef" * 2


def _signed_config(api_host: str, **overrides) -> TwilioAgentConfig:
    return _config(
        public_host=PUBLIC_HOST,
        twilio_account_sid=ACCOUNT_SID,
        twilio_auth_token=AUTH_TOKEN,
        twilio_api_base_url=f"http://{api_host}",
        **overrides,
    )


@asynccontextmanager
async def twilio_rest_api() -> AsyncIterator[tuple[str, list[tuple[str, str, dict]]]]:
    """A loopback stand-in for api.twilio.com: records (method, path, form) of every request."""
    received: list[tuple[str, str, dict]] = []
    api = FastAPI()

    @api.api_route("/{path:path}", methods=["GET", "POST", "DELETE"])
    async def anything(path: str, request: Request) -> dict:
        received.append((request.method, "/" + path, dict(await request.form())))
        return {"sid": path.rsplit("/", 1)[-1].removesuffix(".json"), "status": "completed"}

    async with serve(api) as host:
        yield host, received


async def _dial(host: str, **kwargs) -> TwilioCaller:
    return await TwilioCaller.dial(host, auth_token=AUTH_TOKEN, public_host=PUBLIC_HOST, account_sid=ACCOUNT_SID, **kwargs)


async def _closed(caller: TwilioCaller) -> tuple[int | None, str | None]:
    await asyncio.wait_for(caller.closed.wait(), 15)
    assert caller._ws is not None
    return caller._ws.close_code, caller._ws.close_reason


async def test_twiml_connects_the_call_to_the_media_stream_when_signed() -> None:
    config = _config(public_host=PUBLIC_HOST, twilio_account_sid=ACCOUNT_SID, twilio_auth_token=AUTH_TOKEN)
    app = create_app(config, backend=LocalEngine(EngineConfig(device="cpu")))
    call_sid = "CA" + uuid.uuid4().hex
    form = {"CallSid": call_sid, "From": "+15550001111", "To": "+15550002222", "AccountSid": ACCOUNT_SID}
    signature = RequestValidator(AUTH_TOKEN).compute_signature(f"https://{PUBLIC_HOST}/twiml", form)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
        ok = await client.post("/twiml", data=form, headers={"X-Twilio-Signature": signature})
        forged = await client.post("/twiml", data=form, headers={"X-Twilio-Signature": "Zm9yZ2Vk"})
        missing = await client.post("/twiml", data=form)
        tampered = await client.post(
            "/twiml", data={**form, "From": "+15559999999"}, headers={"X-Twilio-Signature": signature}
        )
        docs = [(await client.get(path)).status_code for path in ("/docs", "/openapi.json", "/redoc")]
    assert ok.status_code == 200 and ok.headers["content-type"].startswith("application/xml")
    assert f'<Stream url="wss://{PUBLIC_HOST}/ws">' in ok.text
    assert '<Parameter name="From" value="+15550001111" />' in ok.text
    assert f'<Parameter name="{STREAM_TOKEN_PARAMETER}" value="' in ok.text
    assert ok.text.startswith('<?xml version="1.0" encoding="UTF-8"?><Response><Connect>')
    assert [forged.status_code, missing.status_code, tampered.status_code] == [403, 403, 403]
    assert docs == [404, 404, 404]


async def test_webhook_refuses_bad_call_sids_foreign_accounts_and_big_bodies() -> None:
    config = _config(public_host=PUBLIC_HOST, twilio_account_sid=ACCOUNT_SID, twilio_auth_token=AUTH_TOKEN)
    app = create_app(config, backend=LocalEngine(EngineConfig(device="cpu")))

    def signed(form: dict) -> dict:
        return {"X-Twilio-Signature": RequestValidator(AUTH_TOKEN).compute_signature(f"https://{PUBLIC_HOST}/twiml", form)}

    traversal = {"CallSid": "CA../../Messages", "AccountSid": ACCOUNT_SID}
    foreign = {"CallSid": "CA" + uuid.uuid4().hex, "AccountSid": "AC" + "f" * 32}

    async def chunked_body():  # no Content-Length: capped while reading
        for _ in range(64):
            yield b"x" * 1024

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
        bad_sid = await client.post("/twiml", data=traversal, headers=signed(traversal))
        other_account = await client.post("/twiml", data=foreign, headers=signed(foreign))
        big = await client.post("/twiml", content=b"a=" + b"x" * 1_000_000,
                                headers={"Content-Type": "application/x-www-form-urlencoded"})
        big_chunked = await client.post("/twiml", content=chunked_body(),
                                        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert [bad_sid.status_code, other_account.status_code, big.status_code, big_chunked.status_code] == [
        400, 403, 413, 413
    ]


def test_contradictory_or_unsafe_config_fails_at_start() -> None:
    with pytest.raises(ValueError, match="public_host"):
        TwilioAgentConfig(twilio_account_sid=ACCOUNT_SID, twilio_auth_token=AUTH_TOKEN)
    with pytest.raises(ValueError, match="both"):
        TwilioAgentConfig(twilio_account_sid=ACCOUNT_SID)
    with pytest.raises(ValueError, match="worker_token"):
        TwilioAgentConfig(backend={"worker_url": "ws://127.0.0.1:1/v1/call"})
    with pytest.raises(ValueError, match="no Twilio auth token"):
        TwilioAgentConfig(host="0.0.0.0")
    assert TwilioAgentConfig(host="0.0.0.0", insecure=True).insecure
    assert not TwilioAgentConfig(host="127.0.0.1").checks_signatures


async def test_forged_streams_are_refused_before_a_model_slot_is_taken() -> None:
    """No token, a forged or expired token, a call the webhook never saw, another account,
    a replayed stream: each closed with 4401 and a reason; no model call is opened; a genuine
    call afterwards works."""
    backend = ScriptedBackend(ScriptedCall([Step(True, "hi ")] * 5 + [Step()] * 200))
    async with twilio_rest_api() as (api_host, api_requests):
        async with serve(create_app(_signed_config(api_host), backend=backend)) as host:
            genuine = await _dial(host)
            token = genuine.custom_parameters[STREAM_TOKEN_PARAMETER]
            unknown_sid = "CA" + uuid.uuid4().hex
            attempts = {
                "no token": TwilioCaller(f"ws://{host}/ws", {}, account_sid=ACCOUNT_SID),
                "forged token": TwilioCaller(f"ws://{host}/ws", {STREAM_TOKEN_PARAMETER: "1" * 10 + "." + "0" * 64},
                                             call_sid=genuine.call_sid, account_sid=ACCOUNT_SID),
                "token of another call": TwilioCaller(f"ws://{host}/ws", {STREAM_TOKEN_PARAMETER: token},
                                                      call_sid=unknown_sid, account_sid=ACCOUNT_SID),
                "unknown call, valid-looking token": TwilioCaller(
                    f"ws://{host}/ws", {STREAM_TOKEN_PARAMETER: StreamTokens(b"k" * 32, 60).issue(unknown_sid)},
                    call_sid=unknown_sid, account_sid=ACCOUNT_SID),
                "other account": TwilioCaller(f"ws://{host}/ws", genuine.custom_parameters,
                                              call_sid=genuine.call_sid, account_sid="AC" + "f" * 32),
                "path traversal sid": TwilioCaller(f"ws://{host}/ws", genuine.custom_parameters,
                                                   call_sid="CA../../Messages.json?To=1", account_sid=ACCOUNT_SID),
            }
            for what, attacker in attempts.items():
                await attacker.connect()
                code, reason = await _closed(attacker)
                assert code == 4401 and reason, what
            assert backend.opened == []
            await genuine.connect()
            await genuine.send_audio(_speech_8k(0.5))
            await eventually(lambda: len(genuine.log.bot_audio) > 0, what="the genuine caller hears the bot")
            replay = TwilioCaller(f"ws://{host}/ws", genuine.custom_parameters, call_sid=genuine.call_sid,
                                  account_sid=ACCOUNT_SID)
            await replay.connect()
            assert await _closed(replay) == (4401, "this call already has a media stream")
            await genuine.hang_up()
            await eventually(lambda: backend.opened[0].closed, what="the call is closed")
    assert len(backend.opened) == 1
    assert api_requests == []  # the caller hung up: nothing to tell Twilio


def test_stream_tokens_expire_and_are_bound_to_their_call() -> None:
    tokens = StreamTokens(b"s" * 32, ttl_s=30)
    token = tokens.issue("CA" + "1" * 32, now=1000.0)
    assert tokens.check("CA" + "1" * 32, token, now=1010.0) is None
    assert tokens.check("CA" + "1" * 32, token, now=1031.0) == "expired stream token"
    assert tokens.check("CA" + "2" * 32, token, now=1010.0) == "invalid stream token"
    assert tokens.check("CA" + "1" * 32, None) == "no stream token"
    assert tokens.check("CA" + "1" * 32, "x" * 5000) == "malformed stream token"


async def test_a_raw_websocket_that_is_not_twilio_is_closed() -> None:
    async with serve(create_app(_config(), backend=LocalEngine(EngineConfig(device="cpu")))) as host:
        async with connect(f"ws://{host}/ws") as ws:
            await ws.send('{"event": "hello"}')
            await ws.send("not json")
            async with asyncio.timeout(15):
                await ws.wait_closed()
            assert ws.close_code == 4400


@pytest.mark.slow
async def test_a_call_gets_bot_audio_and_the_bot_hangs_up_at_the_time_limit() -> None:
    backend = LocalEngine(EngineConfig(device="cpu", slot_capacity=2))
    async with twilio_rest_api() as (api_host, api_requests):
        async with serve(create_app(_signed_config(api_host, max_call_s=3.0), backend=backend)) as host:
            caller = await _dial(host)
            await caller.connect()
            await caller.press("1")
            await caller.send_audio(_speech_8k(2.0))
            # The bot ends the call at its 3 s limit: Twilio's API is told, the stream closes.
            await eventually(lambda: bool(api_requests), what="the bot hangs up through Twilio's API")
            await asyncio.wait_for(caller.closed.wait(), 10)
            assert api_requests == [
                ("POST", f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{caller.call_sid}.json", {"Status": "completed"})
            ]
            await eventually(lambda: backend.engine.sessions_in_use == 0, what="the call's slot is freed")
            await caller.hang_up()
    audio = np.frombuffer(bytes(caller.log.bot_audio), dtype=np.int16)
    assert np.abs(audio).max() > 0  # the random model speaks noise, but it speaks


async def test_a_dead_backend_ends_the_phone_call_instead_of_leaving_it_silent() -> None:
    # The call dies after 5 steps and no new call can be opened: the service gives up.
    backend = ScriptedBackend(ScriptedCall([Step(True, "hi ")] * 3 + [Step()] * 40, die_after=5))
    async with twilio_rest_api() as (api_host, api_requests):
        async with serve(create_app(_signed_config(api_host), backend=backend)) as host:
            caller = await _dial(host)
            await caller.connect()
            sending = asyncio.create_task(caller.send_audio(_speech_8k(15.0)))
            try:
                await eventually(lambda: bool(api_requests), timeout_s=20, what="the bot hangs up the dead call")
                await asyncio.wait_for(caller.closed.wait(), 10)
            finally:
                sending.cancel()
                await asyncio.gather(sending, return_exceptions=True)
    assert api_requests == [
        ("POST", f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{caller.call_sid}.json", {"Status": "completed"})
    ]


async def test_barge_in_clears_twilio_playback_and_hanging_up_frees_the_call() -> None:
    # The bot talks for 10 frames; the caller talks over it and the model yields the turn.
    script = [Step(True, "hello ")] * 10 + [Step(True, transcript="wait"), Step(False, transcript=" stop")]
    call = ScriptedCall(script + [Step()] * 40)
    async with serve(create_app(_config(), backend=ScriptedBackend(call))) as host:
        caller = await TwilioCaller.dial(host)
        await caller.connect()
        await caller.send_audio(_speech_8k(1.5))
        await eventually(lambda: caller.log.clears >= 1, what="Twilio is told to clear its playback")
        assert len(caller.log.bot_audio) > 0  # the bot had been speaking when it was cut off
        await caller.hang_up()
        await eventually(lambda: call.closed, what="the model call is closed after the caller hangs up")


async def test_a_stream_that_stops_sending_audio_is_ended_and_hung_up() -> None:
    """Issue 12 finding 5, the agent's side: a media stream that goes quiet (no media at all,
    which a live phone line never does) is ended instead of holding its model slot."""
    backend = ScriptedBackend(ScriptedCall([Step()] * 400))
    async with twilio_rest_api() as (api_host, api_requests):
        config = _signed_config(api_host, caller_silence_timeout_s=1.0)
        async with serve(create_app(config, backend=backend)) as host:
            caller = await _dial(host)
            await caller.connect()
            await caller.send_audio(_speech_8k(0.4))
            await asyncio.wait_for(caller.closed.wait(), 15)  # then nothing more is sent
            await eventually(lambda: backend.opened[0].closed, what="the model call is closed")
    assert [path for _, path, _ in api_requests] == [f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{caller.call_sid}.json"]


def test_the_call_registry_is_bounded_expiring_and_single_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    from agents.twilio import security

    now = [1000.0]
    monkeypatch.setattr(security.time, "monotonic", lambda: now[0])
    registry = security.CallRegistry(max_calls=3, ttl_s=60)
    sids = [f"CA{i:032x}" for i in range(5)]
    for sid in sids:
        registry.saw(sid)
    assert len(registry) == 3 and not registry.knows(sids[0])  # bounded: oldest forgotten
    assert registry.claim(sids[4]) is None
    assert registry.claim(sids[4]) == "this call already has a media stream"
    now[0] += 61
    assert registry.claim(sids[3]) == "unknown call: the signed webhook did not answer it"  # expired
    assert registry.knows(sids[4])  # a streaming call stays known until forgotten
    registry.forget(sids[4])
    assert len(registry) == 0
