"""Attack run against a worker and both agents on loopback (issue 12); prints one row per attack.

Starts, in this process and on loopback ports only: ``michi-worker`` (tiny preset, random
weights, 2 slots), the Twilio agent and the WebRTC agent (both on that worker), and a stand-in
for Twilio's REST API that records every request. Then it replays each attack once, bounded in
count and time, and prints: attack, expected outcome, observed outcome, worker slots held
afterwards, process RSS before/after. A genuine phone call runs last and must still work. Exits
non-zero when a row fails. Stops by itself (``--budget-s``, default 240 s).

    .venv/bin/python benchmarks/attack.py

One file of ~460 lines on purpose: each attack is a short function beside the others, so the
whole set reads (and is reviewed) as one table.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import numpy as np
from aiortc import RTCPeerConnection
from fastapi import FastAPI, Request
from loguru import logger
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from agents.twilio.app import create_app as create_twilio_app
from agents.twilio.caller import TwilioCaller
from agents.twilio.config import TwilioAgentConfig
from agents.twilio.security import STREAM_TOKEN_PARAMETER
from agents.webrtc.app import WebRTCAgentConfig
from agents.webrtc.app import create_app as create_webrtc_app
from pipecat_michi.engine.config import EngineConfig
from pipecat_michi.serving import ServerLimits, serve_on_loopback
from pipecat_michi.worker.protocol import (
    KIND_CONTROL,
    PROTOCOL_VERSION,
    AudioFrame,
    EndMessage,
    HelloMessage,
    InjectTextMessage,
    decode_worker_message,
    encode_message,
)
from pipecat_michi.worker.config import WorkerConfig
from pipecat_michi.worker.harness import running_worker

TOKEN = "attack-run-worker-token-0123456789"
AUTH_TOKEN = "attack-run-twilio-auth-token"
ACCOUNT_SID = "AC" + "a1" * 16
PUBLIC_HOST = "bot.example.test"
FRAME = 1920
HEADER_TIMEOUT_S = 2.0


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Row:
    attack: str
    expected: str
    observed: str
    passed: bool
    slots: int
    rss_before: float
    rss_after: float


class Targets:
    """Where everything listens, and what the REST stand-in received."""

    def __init__(self) -> None:
        self.worker = None  # RunningWorker
        self.twilio = ""
        self.webrtc = ""
        self.twilio_dead = ""
        self.worker_limited = None  # RunningWorker with max_call_opens_per_minute=3
        self.rest_requests: list[tuple[str, str]] = []

    @property
    def slots(self) -> int:
        return self.worker.engine.sessions_in_use


async def until_closed(ws) -> tuple[int | None, list]:  # noqa: ANN001 - websockets connection
    received = []
    async with asyncio.timeout(15):
        try:
            while True:
                received.append(await ws.recv())
        except ConnectionClosed:
            return ws.close_code, received


async def settle(targets: Targets, timeout_s: float = 10.0) -> None:
    """Wait (bounded) until the worker holds no slot; callers then read what is left."""
    deadline = time.monotonic() + timeout_s
    while targets.slots and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def hand_made_offer() -> str:
    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="sendrecv")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def rest_requests_since(t: Targets, before: int, timeout_s: float = 5.0) -> int:
    """REST requests since ``before``, once one came (the stream closes before the hang-up)."""
    deadline = time.monotonic() + timeout_s
    while len(t.rest_requests) == before and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return len(t.rest_requests) - before


def speech_8k(seconds: float) -> np.ndarray:
    t = np.arange(int(8000 * seconds)) / 8000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16)


# --- the attacks: each returns (observed, passed) -------------------------------------------


async def fake_twilio_stream(t: Targets) -> tuple[str, bool]:
    """Finding 1: a made-up start (no webhook, no token) on /ws."""
    codes = []
    for _ in range(3):
        caller = TwilioCaller(f"ws://{t.twilio}/ws", account_sid=ACCOUNT_SID)
        await caller.connect()
        await asyncio.wait_for(caller.closed.wait(), 15)
        codes.append(caller._ws.close_code)
    return f"closed {codes}", codes == [4401] * 3


async def forged_token(t: Targets) -> tuple[str, bool]:
    genuine = await TwilioCaller.dial(t.twilio, AUTH_TOKEN, PUBLIC_HOST, ACCOUNT_SID)
    forged = {STREAM_TOKEN_PARAMETER: "9999999999." + "0" * 64}
    caller = TwilioCaller(f"ws://{t.twilio}/ws", forged, call_sid=genuine.call_sid, account_sid=ACCOUNT_SID)
    await caller.connect()
    await asyncio.wait_for(caller.closed.wait(), 15)
    return f"closed {caller._ws.close_code} ({caller._ws.close_reason})", caller._ws.close_code == 4401


async def traversal_call_sid(t: Targets) -> tuple[str, bool]:
    """Finding 2: a callSid with ../ segments; nothing may reach Twilio's API."""
    genuine = await TwilioCaller.dial(t.twilio, AUTH_TOKEN, PUBLIC_HOST, ACCOUNT_SID)
    before = len(t.rest_requests)
    caller = TwilioCaller(
        f"ws://{t.twilio}/ws", genuine.custom_parameters, call_sid="CA../../Messages.json?To=1&Body=x",
        account_sid=ACCOUNT_SID,
    )
    await caller.connect()
    await asyncio.wait_for(caller.closed.wait(), 15)
    sent = len(t.rest_requests) - before
    return f"closed {caller._ws.close_code}, {sent} REST request(s)", caller._ws.close_code == 4401 and sent == 0


async def foreign_account(t: Targets) -> tuple[str, bool]:
    genuine = await TwilioCaller.dial(t.twilio, AUTH_TOKEN, PUBLIC_HOST, ACCOUNT_SID)
    caller = TwilioCaller(f"ws://{t.twilio}/ws", genuine.custom_parameters, call_sid=genuine.call_sid,
                          account_sid="AC" + "f" * 32)
    await caller.connect()
    await asyncio.wait_for(caller.closed.wait(), 15)
    return f"closed {caller._ws.close_code}", caller._ws.close_code == 4401


async def unsigned_webhook(t: Targets) -> tuple[str, bool]:
    async with httpx.AsyncClient(timeout=10) as http:
        form = {"CallSid": "CA" + uuid.uuid4().hex, "AccountSid": ACCOUNT_SID}
        codes = [(await http.post(f"http://{t.twilio}/twiml", data=form)).status_code for _ in range(20)]
    return f"HTTP {sorted(set(codes))} x{len(codes)}", set(codes) == {403}


async def big_webhook_bodies(t: Targets) -> tuple[str, bool]:
    """Finding 8: 50 x 1 MB unsigned bodies, declared and chunked."""
    body = b"Field=" + b"x" * 1_000_000

    async def chunked():  # no Content-Length
        for _ in range(1000):
            yield b"x" * 1000

    async with httpx.AsyncClient(timeout=20) as http:
        codes = [
            (await http.post(f"http://{t.twilio}/twiml", content=body,
                             headers={"Content-Type": "application/x-www-form-urlencoded"})).status_code
            for _ in range(40)
        ]
        codes += [
            (await http.post(f"http://{t.twilio}/twiml", content=chunked(),
                             headers={"Content-Type": "application/x-www-form-urlencoded"})).status_code
            for _ in range(10)
        ]
    return f"HTTP {sorted(set(codes))} x{len(codes)}", set(codes) == {413}


def slow_headers(where: Callable[[Targets], str]) -> Callable[[Targets], Awaitable[tuple[str, bool]]]:
    async def attack(t: Targets) -> tuple[str, bool]:
        """Finding 6: 20 idle sockets and 20 half-sent request heads; all closed by the server."""
        host, port = where(t).split(":")
        conns = [await asyncio.open_connection(host, int(port)) for _ in range(40)]
        for _, writer in conns[20:]:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            await writer.drain()
        started = time.monotonic()
        closed = 0
        try:
            async with asyncio.timeout(HEADER_TIMEOUT_S + 8):
                for reader, _ in conns:
                    await reader.read()
                    closed += 1
        except TimeoutError:
            pass
        waited = time.monotonic() - started
        for _, writer in conns:
            writer.close()
        return f"{closed}/40 closed by the server in {waited:.1f} s", closed == 40
    return attack


async def webrtc_offer_race(t: Targets) -> tuple[str, bool]:
    """Finding 3: 8 concurrent offers without pc_id at max_peers=2, then 4 made-up pc_ids."""
    sdp = await hand_made_offer()
    async with httpx.AsyncClient(base_url=f"http://{t.webrtc}", timeout=20) as http:
        offers = await asyncio.gather(*(http.post("/api/offer", json={"sdp": sdp, "type": "offer"}) for _ in range(8)))
        spoofed = await asyncio.gather(
            *(http.post("/api/offer", json={"sdp": sdp, "type": "offer", "pc_id": f"x{i}"}) for i in range(4))
        )
    peak = t.slots
    ok = sum(r.status_code == 200 for r in offers)
    codes = sorted({r.status_code for r in spoofed})
    await settle(t, 15)  # the unconnected offers are dropped after connect_timeout_s
    return (f"{ok} admitted, {8 - ok} x 503; pc_id spoofs {codes}; peak slots {peak}",
            ok <= 2 and codes == [404] and peak <= 2)


async def webrtc_csrf_and_types(t: Targets) -> tuple[str, bool]:
    async with httpx.AsyncClient(base_url=f"http://{t.webrtc}", timeout=10) as http:
        plain = await http.post("/start", content=b"{}", headers={"Content-Type": "text/plain"})
        foreign = await http.post("/start", json={}, headers={"Origin": "https://evil.example"})
        docs = await http.get("/openapi.json")
    codes = [plain.status_code, foreign.status_code, docs.status_code]
    return f"text/plain {codes[0]}, foreign Origin {codes[1]}, /openapi.json {codes[2]}", codes == [415, 403, 404]


async def webrtc_broken_sdp(t: Targets) -> tuple[str, bool]:
    sdp = await hand_made_offer()
    broken = [
        sdp.replace("a=fingerprint:", "a=x-fingerprint:"),
        sdp.replace("a=ice-ufrag:", "a=x-ufrag:"),
        "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\n",
        "v=0\r\n",
    ]
    async with httpx.AsyncClient(base_url=f"http://{t.webrtc}", timeout=10) as http:
        codes = [(await http.post("/api/offer", json={"sdp": s, "type": "offer"})).status_code for s in broken]
    await settle(t, 15)
    return f"HTTP {codes}", all(c in (200, 400) for c in codes)


async def webrtc_big_bodies(t: Targets) -> tuple[str, bool]:
    body = b"{" + b" " * 1_000_000 + b"}"
    async with httpx.AsyncClient(base_url=f"http://{t.webrtc}", timeout=20) as http:
        codes = [(await http.post("/api/offer", content=body, headers={"content-type": "application/json"})).status_code
                 for _ in range(30)]
    return f"HTTP {sorted(set(codes))} x{len(codes)}", set(codes) == {413}


async def worker_frame_index_overflow(t: Targets) -> tuple[str, bool]:
    async with connect(t.worker.url, additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
        await ws.send(encode_message(HelloMessage(protocol_version=PROTOCOL_VERSION)))
        await ws.recv()
        await ws.send(encode_message(AudioFrame(frame_index=0xFFFF_FFFF, pcm=np.zeros(FRAME, np.int16))))
        code, _ = await until_closed(ws)
    return f"closed {code}", code == 4004


async def worker_bad_hellos(t: Targets) -> tuple[str, bool]:
    """Low: strict protocol_version; voice prompts shorter than a frame; flow_steps over the cap."""
    hellos = [
        bytes([KIND_CONTROL]) + b'{"type": "hello", "protocol_version": true}',
        bytes([KIND_CONTROL]) + b'{"type": "hello", "protocol_version": 1.0}',
        encode_message(HelloMessage(protocol_version=PROTOCOL_VERSION, voice_prompt_pcm_b64=base64.b64encode(b"\1\0").decode())),
        encode_message(HelloMessage(protocol_version=PROTOCOL_VERSION, session={"flow_steps": 32})),
    ]
    codes = []
    for hello in hellos:
        async with connect(t.worker.url, additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
            await ws.send(hello)
            codes.append((await until_closed(ws))[0])
    return f"closed {codes}", codes == [4000] * 4


async def worker_injections_then_end(t: Targets) -> tuple[str, bool]:
    async with connect(t.worker.url, additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
        await ws.send(encode_message(HelloMessage(protocol_version=PROTOCOL_VERSION)))
        await ws.recv()
        for i in range(5):
            await ws.send(encode_message(InjectTextMessage(text=f"fact {i}", role="system", request_id=str(i))))
        await ws.send(encode_message(EndMessage()))
        _, received = await until_closed(ws)
    answers = [m for m in (decode_worker_message(r, FRAME) for r in received) if m.type in ("injected", "error")]
    return f"{len(answers)}/5 answered", len(answers) == 5


async def silent_stream(t: Targets) -> tuple[str, bool]:
    """Finding 5: a genuine stream that stops sending audio is ended and hung up."""
    before = len(t.rest_requests)
    caller = await TwilioCaller.dial(t.twilio, AUTH_TOKEN, PUBLIC_HOST, ACCOUNT_SID)
    await caller.connect()
    await caller.send_audio(speech_8k(0.4))
    started = time.monotonic()
    await asyncio.wait_for(caller.closed.wait(), 20)
    silent_for = time.monotonic() - started
    hung_up = await rest_requests_since(t, before)
    return f"ended after {silent_for:.1f} s silent, {hung_up} hang-up", hung_up == 1


async def dead_backend(t: Targets) -> tuple[str, bool]:
    """Finding 4: the worker is unreachable; the call is ended and hung up, not left silent."""
    before = len(t.rest_requests)
    caller = await TwilioCaller.dial(t.twilio_dead, AUTH_TOKEN, PUBLIC_HOST, ACCOUNT_SID)
    await caller.connect()
    sending = asyncio.create_task(caller.send_audio(speech_8k(30.0)))
    try:
        started = time.monotonic()
        await asyncio.wait_for(caller.closed.wait(), 30)
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
    ended_after = time.monotonic() - started
    hung_up = await rest_requests_since(t, before)
    return f"ended after {ended_after:.1f} s, {hung_up} hang-up", hung_up == 1


async def call_open_rate(t: Targets) -> tuple[str, bool]:
    """Finding 7: call opens per token are rate-limited (a second worker, limit 3/min)."""
    codes = []
    for _ in range(5):
        async with connect(t.worker_limited.url, additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
            try:
                await ws.send(encode_message(HelloMessage(protocol_version=PROTOCOL_VERSION)))
                await ws.send(encode_message(EndMessage()))
            except ConnectionClosed:
                pass
            codes.append((await until_closed(ws))[0])
    return f"closed {codes}", codes == [1000] * 3 + [1013] * 2


async def genuine_call(t: Targets) -> tuple[str, bool]:
    caller = await TwilioCaller.dial(t.twilio, AUTH_TOKEN, PUBLIC_HOST, ACCOUNT_SID)
    await caller.connect()
    await caller.send_audio(speech_8k(2.0))
    await caller.hang_up()
    seconds = len(caller.log.bot_audio) / 2 / 8000
    await settle(t)
    return f"{seconds:.2f} s of bot audio", seconds > 0


ATTACKS: list[tuple[str, str, Callable[[Targets], Awaitable[tuple[str, bool]]]]] = [
    ("twilio: fake stream, no token (x3)", "close 4401, no slot", fake_twilio_stream),
    ("twilio: forged stream token", "close 4401", forged_token),
    ("twilio: ../ callSid", "close 4401, 0 REST requests", traversal_call_sid),
    ("twilio: foreign accountSid", "close 4401", foreign_account),
    ("twilio: unsigned /twiml (x20)", "HTTP 403", unsigned_webhook),
    ("twilio: 1 MB /twiml bodies (x50)", "HTTP 413, flat RSS", big_webhook_bodies),
    ("twilio: idle + half-sent heads (x40)", "all closed", slow_headers(lambda t: t.twilio)),
    ("webrtc: 8 racing offers, 4 fake pc_id", "<= 2 admitted, 404", webrtc_offer_race),
    ("webrtc: text/plain, foreign Origin", "415, 403, no docs", webrtc_csrf_and_types),
    ("webrtc: 1 MB signalling bodies (x30)", "HTTP 413", webrtc_big_bodies),
    ("webrtc: SDP that trips aiortc", "400 (never 500)", webrtc_broken_sdp),
    ("webrtc: idle + half-sent heads (x40)", "all closed", slow_headers(lambda t: t.webrtc)),
    ("worker: bad hellos (x4)", "close 4000", worker_bad_hellos),
    ("worker: first frame_index 0xFFFFFFFF", "close 4004 (not 1011)", worker_frame_index_overflow),
    ("worker: inject_text x5 then end", "5 answers", worker_injections_then_end),
    ("worker: idle + half-sent heads (x40)", "all closed", slow_headers(lambda t: t.worker.http_url.removeprefix("http://"))),
    ("twilio: stream goes silent", "ended, 1 REST hang-up", silent_stream),
    ("twilio: worker unreachable", "ended, 1 REST hang-up", dead_backend),
    ("worker: call opens per token (x5)", "3 x 1000, then 1013", call_open_rate),
    ("genuine call at the end", "bot audio, slot freed", genuine_call),
]


async def run(budget_s: float) -> list[Row]:
    targets = Targets()
    limits = ServerLimits(header_timeout_s=HEADER_TIMEOUT_S)
    rest = FastAPI()

    @rest.api_route("/{path:path}", methods=["GET", "POST"])
    async def record(path: str, request: Request) -> dict:
        targets.rest_requests.append((request.method, path))
        return {"sid": "CA" + "0" * 32, "status": "completed"}

    engine = EngineConfig(preset="tiny", device="cpu", slot_capacity=2)
    worker_config = WorkerConfig(token=TOKEN, engine=engine, server=limits)
    backend = {"worker_url": "", "worker_token": TOKEN, "max_call_s": 60}
    rows: list[Row] = []
    async with asyncio.timeout(budget_s):
        limited_config = WorkerConfig(token=TOKEN, engine=engine.model_copy(update={"slot_capacity": 1}),
                                      max_call_opens_per_minute=3)
        async with running_worker(worker_config) as worker, serve_on_loopback(rest) as rest_host, \
                running_worker(limited_config) as limited:
            targets.worker, targets.worker_limited = worker, limited
            backend["worker_url"] = worker.url
            twilio_settings = dict(
                public_host=PUBLIC_HOST, twilio_account_sid=ACCOUNT_SID, caller_silence_timeout_s=3.0,
                twilio_auth_token=AUTH_TOKEN, twilio_api_base_url=f"http://{rest_host}",
                server=limits.model_copy(update={"max_ws_message_bytes": 64 * 1024}),
            )
            twilio = TwilioAgentConfig(backend=backend, **twilio_settings)
            # The same agent on a worker address where nothing listens (port 9 on loopback).
            dead = TwilioAgentConfig(backend={**backend, "worker_url": "ws://127.0.0.1:9/v1/call"}, **twilio_settings)
            webrtc = WebRTCAgentConfig(backend=backend, max_peers=2, connect_timeout_s=3.0, server=limits,
                                       requests_per_minute=1000)
            async with serve_on_loopback(create_twilio_app(twilio), limits=twilio.server) as twilio_host, \
                    serve_on_loopback(create_webrtc_app(webrtc), limits=webrtc.server) as webrtc_host, \
                    serve_on_loopback(create_twilio_app(dead), limits=dead.server) as dead_host:
                targets.twilio, targets.webrtc, targets.twilio_dead = twilio_host, webrtc_host, dead_host
                for attack, expected, fn in ATTACKS:
                    before = rss_mb()
                    try:
                        async with asyncio.timeout(60):
                            observed, passed = await fn(targets)
                    except Exception as exc:  # noqa: BLE001 - a row that crashes is a failed row
                        observed, passed = f"raised {exc!r}"[:60], False
                    await settle(targets)
                    rows.append(Row(attack, expected, observed, passed, targets.slots, before, rss_mb()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=240.0, help="the whole run stops after this")
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="ERROR", diagnose=False)
    rows = asyncio.run(run(args.budget_s))
    header = f"{'attack':40} {'expected':28} {'observed':58} {'ok':4} {'slots':5} {'RSS MB before/after':>20}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.attack:40} {r.expected:28} {r.observed[:58]:58} {'PASS' if r.passed and r.slots == 0 else 'FAIL':4} "
              f"{r.slots:5} {r.rss_before:9.0f} / {r.rss_after:.0f}")
    failed = [r for r in rows if not (r.passed and r.slots == 0)]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} rows pass")
    sys.exit(1 if failed or len(rows) != len(ATTACKS) else 0)


if __name__ == "__main__":
    main()
