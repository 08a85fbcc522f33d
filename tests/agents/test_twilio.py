"""The Twilio phone bot, driven exactly as Twilio drives it: webhook, then media stream."""

import asyncio

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Request
from twilio.request_validator import RequestValidator

from agents.twilio.app import create_app
from agents.twilio.caller import TwilioCaller
from agents.twilio.config import TwilioAgentConfig
from pipecat_michi.engine.call import LocalEngine
from pipecat_michi.engine.config import EngineConfig
from tests.support import eventually, serve
from tests.support import speech_8k as _speech_8k
from tests.support import twilio_agent_config as _config

AUTH_TOKEN = "test-auth-token"
PUBLIC_HOST = "bot.example.test"


async def test_twiml_connects_the_call_to_the_media_stream_when_signed() -> None:
    config = _config(
        public_host=PUBLIC_HOST, twilio_account_sid="AC123", twilio_auth_token=AUTH_TOKEN
    )
    app = create_app(config, backend=LocalEngine(EngineConfig(device="cpu")))
    form = {"CallSid": "CA42", "From": "+15550001111", "To": "+15550002222", "AccountSid": "AC123"}
    signature = RequestValidator(AUTH_TOKEN).compute_signature(f"https://{PUBLIC_HOST}/twiml", form)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
        ok = await client.post("/twiml", data=form, headers={"X-Twilio-Signature": signature})
        forged = await client.post("/twiml", data=form, headers={"X-Twilio-Signature": "Zm9yZ2Vk"})
        missing = await client.post("/twiml", data=form)
        tampered = await client.post(
            "/twiml", data={**form, "From": "+15559999999"}, headers={"X-Twilio-Signature": signature}
        )
    assert ok.status_code == 200 and ok.headers["content-type"].startswith("application/xml")
    assert f'<Stream url="wss://{PUBLIC_HOST}/ws">' in ok.text
    assert '<Parameter name="From" value="+15550001111" />' in ok.text
    assert ok.text.startswith('<?xml version="1.0" encoding="UTF-8"?><Response><Connect>')
    assert [forged.status_code, missing.status_code, tampered.status_code] == [403, 403, 403]


def test_contradictory_config_fails_at_start() -> None:
    with pytest.raises(ValueError, match="public_host"):
        TwilioAgentConfig(twilio_account_sid="AC1", twilio_auth_token=AUTH_TOKEN)
    with pytest.raises(ValueError, match="both"):
        TwilioAgentConfig(twilio_account_sid="AC1")
    with pytest.raises(ValueError, match="worker_token"):
        TwilioAgentConfig(backend={"worker_url": "ws://127.0.0.1:1/v1/call"})


@pytest.mark.slow
async def test_a_call_gets_bot_audio_and_the_bot_hangs_up_at_the_time_limit() -> None:
    hang_ups: list[tuple[str, dict]] = []
    twilio_api = FastAPI()

    @twilio_api.post("/2010-04-01/Accounts/{account}/Calls/{call}.json")
    async def update_call(account: str, call: str, request: Request) -> dict:
        hang_ups.append((call, dict(await request.form())))
        return {"sid": call, "status": "completed"}

    backend = LocalEngine(EngineConfig(device="cpu", slot_capacity=2))
    async with serve(twilio_api) as api_host:
        config = _config(
            max_call_s=3.0,
            public_host=PUBLIC_HOST,
            twilio_account_sid="AC123",
            twilio_auth_token=AUTH_TOKEN,
            twilio_api_base_url=f"http://{api_host}",
        )
        async with serve(create_app(config, backend=backend)) as host:
            caller = TwilioCaller(f"ws://{host}/ws", custom_parameters={"From": "+15550001111"})
            await caller.connect()
            await caller.press("1")
            await caller.send_audio(_speech_8k(2.0))
            # The bot ends the call at its 3 s limit: Twilio's API is told, the stream closes.
            await eventually(lambda: bool(hang_ups), what="the bot hangs up through Twilio's API")
            await asyncio.wait_for(caller.closed.wait(), 10)
            assert hang_ups == [(caller.call_sid, {"Status": "completed"})]
            await eventually(lambda: backend.engine.sessions_in_use == 0, what="the call's slot is freed")
            await caller.hang_up()
    audio = np.frombuffer(bytes(caller.log.bot_audio), dtype=np.int16)
    assert np.abs(audio).max() > 0  # the random model speaks noise, but it speaks


async def test_a_stream_that_is_not_twilio_is_closed() -> None:
    from websockets.asyncio.client import connect

    async with serve(create_app(_config(), backend=LocalEngine(EngineConfig(device="cpu")))) as host:
        async with connect(f"ws://{host}/ws") as ws:
            await ws.send('{"event": "hello"}')
            await ws.send("not json")
            async with asyncio.timeout(15):
                await ws.wait_closed()
            assert ws.close_code == 1008


async def test_barge_in_clears_twilio_playback_and_hanging_up_frees_the_call() -> None:
    from tests.service.service_fakes import ScriptedBackend, ScriptedCall, Step

    # The bot talks for 10 frames; the caller talks over it and the model yields the turn.
    script = [Step(True, "hello ")] * 10 + [Step(True, transcript="wait"), Step(False, transcript=" stop")]
    call = ScriptedCall(script + [Step()] * 40)
    async with serve(create_app(_config(), backend=ScriptedBackend(call))) as host:
        caller = TwilioCaller(f"ws://{host}/ws")
        await caller.connect()
        await caller.send_audio(_speech_8k(1.5))
        await eventually(lambda: caller.log.clears >= 1, what="Twilio is told to clear its playback")
        assert len(caller.log.bot_audio) > 0  # the bot had been speaking when it was cut off
        await caller.hang_up()
        await eventually(lambda: call.closed, what="the model call is closed after the caller hangs up")
