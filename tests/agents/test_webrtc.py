"""The WebRTC agent, driven by a real aiortc peer over loopback, as the prebuilt client drives it."""

import asyncio
import fractions
import time

import av
import httpx
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from agents.webrtc.app import WebRTCAgentConfig, create_app
from tests.support import eventually, serve
from tests.support import webrtc_agent as make_agent

CALLER_RATE_HZ = 48000
CALLER_FRAME_MS = 20


class ToneTrack(MediaStreamTrack):
    """A caller's microphone: a warbling 220 Hz tone with a little noise, 48 kHz mono, 20 ms
    frames paced in real time (as a browser's capture track delivers them)."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._samples_per_frame = CALLER_RATE_HZ * CALLER_FRAME_MS // 1000
        self._pts = 0
        self._started_at: float | None = None
        self._rng = np.random.default_rng(0)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._started_at is None:
            self._started_at = time.monotonic()
        # Real-time pacing of the media, not a synchronisation: frame n is due at n * 20 ms.
        due = self._started_at + self._pts / CALLER_RATE_HZ
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        t = (self._pts + np.arange(self._samples_per_frame)) / CALLER_RATE_HZ
        voice = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
        noise = 0.01 * self._rng.standard_normal(self._samples_per_frame)
        pcm = ((voice + noise) * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = CALLER_RATE_HZ
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, CALLER_RATE_HZ)
        self._pts += self._samples_per_frame
        return frame


class Caller:
    """An aiortc peer that sends ``ToneTrack`` and collects the bot's audio."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection()
        self.pc.addTrack(ToneTrack())
        self.bot_track: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio" and not self.bot_track.done():
                self.bot_track.set_result(track)

    async def offer(self) -> dict:
        # aiortc gathers its ICE candidates inside setLocalDescription: the SDP carries them.
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return {"sdp": self.pc.localDescription.sdp, "type": self.pc.localDescription.type}

    async def accept(self, answer: dict) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))

    async def read_bot_audio(self, seconds: float) -> np.ndarray:
        """At least ``seconds`` of the bot's audio track, as int16 samples of all channels."""
        track = await asyncio.wait_for(self.bot_track, 10)
        chunks: list[np.ndarray] = []
        duration_s = 0.0
        async with asyncio.timeout(15):
            while duration_s < seconds:
                frame = await track.recv()
                chunks.append(frame.to_ndarray().reshape(-1))
                duration_s += frame.samples / frame.sample_rate
        return np.concatenate(chunks)


async def test_a_peer_hears_the_bot_and_hanging_up_frees_its_slot() -> None:
    app, backend = make_agent()
    async with serve(app) as host, httpx.AsyncClient(base_url=f"http://{host}", timeout=10) as http:
        caller = Caller()
        try:
            response = await http.post("/api/offer", json=await caller.offer())
            assert response.status_code == 200, response.text
            answer = response.json()
            assert answer["type"] == "answer" and answer["pc_id"]
            await caller.accept(answer)

            audio = await caller.read_bot_audio(seconds=1.0)
            assert np.abs(audio).max() > 0  # the random tiny model speaks noise, but it speaks
            assert set(app.state.calls) == {answer["pc_id"]}
            stats = backend.engine.stats
            assert stats.ticks > stats.filled_frames  # the engine stepped the caller's own frames
            assert backend.engine.sessions_in_use == 1
        finally:
            await caller.pc.close()
        await eventually(lambda: not app.state.calls, what="the call's pipeline ends after the peer leaves")
        await eventually(lambda: backend.engine.sessions_in_use == 0, what="the call's engine slot is freed")


async def test_the_prebuilt_client_flow_start_session_offer_and_ice_patch() -> None:
    app, backend = make_agent()
    async with serve(app) as host, httpx.AsyncClient(base_url=f"http://{host}", timeout=10) as http:
        start = await http.post("/start", json={"body": {"language": "en"}})
        assert start.status_code == 200
        session = f"/sessions/{start.json()['sessionId']}/api/offer"

        caller = Caller()
        try:
            response = await http.post(session, json=await caller.offer())
            assert response.status_code == 200, response.text
            pc_id = response.json()["pc_id"]
            await caller.accept(response.json())

            # The prebuilt client trickles candidates with PATCH; an empty list, the end-of-candidates
            # marker (an empty candidate string) and a real host candidate are all accepted.
            candidate = "candidate:1 1 udp 2130706431 127.0.0.1 9 typ host"
            for candidates in (
                [],
                [{"candidate": "", "sdp_mid": "0", "sdp_mline_index": 0}],
                [{"candidate": candidate, "sdp_mid": "0", "sdp_mline_index": 0}],
            ):
                patch = await http.patch(session, json={"pc_id": pc_id, "candidates": candidates})
                assert (patch.status_code, patch.json()) == (200, {"status": "success"}), patch.text
            plain = await http.patch("/api/offer", json={"pc_id": pc_id, "candidates": []})
            assert (plain.status_code, plain.json()) == (200, {"status": "success"})

            await asyncio.wait_for(caller.bot_track, 10)
            await eventually(lambda: backend.engine.stats.ticks > 0, what="the engine steps the caller's audio")
            assert set(app.state.calls) == {pc_id}
        finally:
            await caller.pc.close()
        await eventually(lambda: not app.state.calls, what="the call's pipeline ends after the peer leaves")
        await eventually(lambda: backend.engine.sessions_in_use == 0, what="the call's engine slot is freed")


async def test_bad_signalling_requests_are_refused() -> None:
    app, _ = make_agent()
    async with serve(app) as host, httpx.AsyncClient(base_url=f"http://{host}", timeout=10) as http:
        session = f"/sessions/{(await http.post('/start', json={})).json()['sessionId']}/api/offer"
        unknown = await http.post("/sessions/no-such-session/api/offer", json={"sdp": "v=0", "type": "offer"})
        not_json = await http.post(session, content=b"{not json", headers={"content-type": "application/json"})
        not_object = await http.post(session, json=["sdp"])
        no_sdp = await http.post(session, json={"type": "offer"})
        bad_type = await http.post("/api/offer", json={"sdp": "v=0", "type": "hello"})
        bad_patch = await http.patch(session, json={"candidates": []})
        unknown_peer = await http.patch(session, json={"pc_id": "SmallWebRTCConnection#0-nobody", "candidates": []})
        start_not_json = await http.post("/start", content=b"{", headers={"content-type": "application/json"})
        assert unknown.status_code == 404
        assert [not_json.status_code, not_object.status_code, no_sdp.status_code, bad_type.status_code] == [400] * 4
        assert [bad_patch.status_code, unknown_peer.status_code] == [400, 404]
        assert start_not_json.status_code == 400
        assert not app.state.calls


async def test_a_peer_that_never_connects_is_dropped_and_frees_its_slot() -> None:
    app, backend = make_agent(connect_timeout_s=1.0)
    async with serve(app) as host, httpx.AsyncClient(base_url=f"http://{host}", timeout=10) as http:
        caller = Caller()
        try:
            # It offers, then never takes the answer: no ICE, the server's side stays "new".
            response = await http.post("/api/offer", json=await caller.offer())
            assert response.status_code == 200, response.text
            await eventually(lambda: backend.engine.sessions_in_use == 1, what="the call opens its engine slot")
            await eventually(lambda: not app.state.calls, timeout_s=10, what="the unconnected peer is dropped")
            await eventually(lambda: backend.engine.sessions_in_use == 0, what="its engine slot is freed")
        finally:
            await caller.pc.close()


# --- admission, as an attacker tries it (issue 12) ---------------------------------------------


async def _hand_made_offer() -> str:
    """An SDP offer with one audio section, made once by aiortc and then replayed as text by
    the attacks below (no peer behind it ever connects)."""
    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="sendrecv")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def test_concurrent_and_spoofed_offers_cannot_take_more_than_max_peers() -> None:
    app, backend = make_agent(max_peers=2, connect_timeout_s=1.0, requests_per_minute=1000)
    sdp = await _hand_made_offer()
    async with serve(app) as host, httpx.AsyncClient(base_url=f"http://{host}", timeout=20) as http:
        offers = await asyncio.gather(*(http.post("/api/offer", json={"sdp": sdp, "type": "offer"}) for _ in range(8)))
        assert sorted(r.status_code for r in offers) == [200, 200] + [503] * 6
        spoofed = await asyncio.gather(
            *(http.post("/api/offer", json={"sdp": sdp, "type": "offer", "pc_id": f"made-up-{i}"}) for i in range(4))
        )
        assert [r.status_code for r in spoofed] == [404] * 4
        assert app.state.admission.held <= 2 and backend.engine.sessions_in_use <= 2
        # Offers that never connect give their places back after connect_timeout_s.
        await eventually(lambda: app.state.admission.held == 0, what="unconnected offers release their places")
        await eventually(lambda: backend.engine.sessions_in_use == 0, what="their slots are freed")


async def test_signalling_needs_json_an_allowed_origin_the_token_and_a_sane_rate() -> None:
    token = "webrtc-token-0123456789"
    app, _ = make_agent(token=token, allowed_origins=["https://app.example.test"], requests_per_minute=8)
    auth = {"Authorization": f"Bearer {token}"}
    async with serve(app) as host, httpx.AsyncClient(base_url=f"http://{host}", timeout=10) as http:
        ok = await http.post("/start", json={}, headers=auth)
        same_origin = await http.post("/start", json={}, headers={**auth, "Origin": f"http://{host}"})
        listed = await http.post("/start", json={}, headers={**auth, "Origin": "https://app.example.test"})
        text_plain = await http.post("/start", content=b"{}", headers={**auth, "Content-Type": "text/plain"})
        foreign = await http.post("/start", json={}, headers={**auth, "Origin": "https://evil.example"})
        no_token = await http.post("/start", json={})
        wrong_token = await http.post("/start", json={}, headers={"Authorization": "Bearer nope"})
        docs = [(await http.get(path)).status_code for path in ("/docs", "/openapi.json")]
        flood = [(await http.post("/start", json={}, headers=auth)).status_code for _ in range(3)]
    assert [ok.status_code, same_origin.status_code, listed.status_code] == [200, 200, 200]
    assert [text_plain.status_code, foreign.status_code] == [415, 403]
    assert [no_token.status_code, wrong_token.status_code] == [401, 401]
    assert docs == [404, 404]
    assert flood[-1] == 429


async def test_sdp_that_trips_aiortc_is_a_400_not_a_500() -> None:
    app, _ = make_agent()
    sdp = await _hand_made_offer()
    broken = [
        sdp.replace("a=fingerprint:", "a=fingerprint-broken:"),  # no DTLS fingerprint
        sdp.replace("a=ice-ufrag:", "a=x-ufrag:"),  # no ICE credentials
        "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\n",
        sdp.replace("m=audio 9 UDP/TLS/RTP/SAVPF", "m=audio 9 RTP/AVP"),
    ]
    async with serve(app) as host, httpx.AsyncClient(base_url=f"http://{host}", timeout=10) as http:
        codes = [(await http.post("/api/offer", json={"sdp": s, "type": "offer"})).status_code for s in broken]
    assert all(code in (200, 400) for code in codes), codes  # never a 500


async def test_a_dead_backend_closes_the_peer_instead_of_leaving_it_silent() -> None:
    from tests.service.service_fakes import ScriptedBackend, ScriptedCall, Step

    backend = ScriptedBackend(ScriptedCall([Step(True, "hi ")] * 3 + [Step()] * 40, die_after=5))
    config = WebRTCAgentConfig(backend={"max_call_s": None})
    app = create_app(config, backend=backend)
    async with serve(app) as host, httpx.AsyncClient(base_url=f"http://{host}", timeout=10) as http:
        caller = Caller()
        closed = asyncio.Event()

        @caller.pc.on("connectionstatechange")
        def on_state() -> None:
            if caller.pc.connectionState in ("closed", "failed"):
                closed.set()

        try:
            response = await http.post("/api/offer", json=await caller.offer())
            await caller.accept(response.json())
            await eventually(lambda: bool(backend.opened), what="the call opens")
            # The call dies, no new one opens: the service gives up and the agent hangs up.
            await asyncio.wait_for(closed.wait(), 20)
        finally:
            await caller.pc.close()
        await eventually(lambda: not app.state.calls, what="the call's pipeline is gone")


async def test_big_signalling_bodies_are_refused_before_they_are_read() -> None:
    app, _ = make_agent()

    async def chunked():  # no Content-Length
        for _ in range(200):
            yield b" " * 1024

    async with serve(app) as host, httpx.AsyncClient(base_url=f"http://{host}", timeout=10) as http:
        declared = await http.post("/api/offer", content=b"{" + b" " * 1_000_000 + b"}",
                                   headers={"content-type": "application/json"})
        streamed = await http.post("/api/offer", content=chunked(), headers={"content-type": "application/json"})
    assert [declared.status_code, streamed.status_code] == [413, 413]
