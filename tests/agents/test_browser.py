"""The WebRTC agent with a real browser: headless Chromium, its microphone a fake capture device,
driven over the Chrome DevTools Protocol on the agent's prebuilt-client page."""

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.support import webrtc_agent as make_agent
from tests.support import eventually, serve

CHROMIUM = shutil.which("chromium")
SCREENSHOT = Path(__file__).resolve().parents[2] / "artifacts" / "browser_client.png"
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--use-fake-ui-for-media-stream",  # grant the microphone without asking
    "--use-fake-device-for-media-stream",  # a synthetic microphone (a beep) instead of a real one
    "--autoplay-policy=no-user-gesture-required",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--remote-debugging-port=0",
    "--window-size=1280,800",
    "--disable-features=WebRtcHideLocalIpsWithMdns",  # plain host candidates aiortc can use
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium)"),
]


class DevTools:
    """A Chrome DevTools Protocol session on one page: ``call`` a method, get its result."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, timeout_s: float = 10.0, **params) -> dict:
        message_id = next(self._ids)
        await self._ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        async with asyncio.timeout(timeout_s):
            while True:  # events we did not subscribe to may come first; skip them
                reply = json.loads(await self._ws.recv())
                if reply.get("id") == message_id:
                    break
        if "error" in reply:
            raise RuntimeError(f"{method} failed: {reply['error']}")
        return reply["result"]

    async def evaluate(self, expression: str, timeout_s: float = 20.0):  # noqa: ANN201 - the page's JSON value
        """The value of a JavaScript expression in the page (awaited), as a user gesture."""
        result = await self.call(
            "Runtime.evaluate",
            timeout_s,
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
            userGesture=True,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"page error in {expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")


@asynccontextmanager
async def headless_chromium() -> AsyncIterator[DevTools]:
    """Chromium on a fresh profile, killed (its whole process group) on exit; yields its page."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="michi-chromium-", ignore_cleanup_errors=True) as profile:
        browser = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: renderers and zygotes die with it
        )
        try:
            # Chromium writes the port it picked (and the browser's ws path) once it listens.
            active_port = Path(profile) / "DevToolsActivePort"
            await eventually(
                lambda: (active_port.is_file() and len(active_port.read_text().splitlines()) >= 2)
                or browser.poll() is not None,
                # A first start on a loaded 2-core machine (CI, a fresh profile) can take 20 s+.
                timeout_s=60,
                what="chromium opens its DevTools port",
            )
            assert browser.poll() is None, f"chromium exited with {browser.returncode}"
            port = active_port.read_text().splitlines()[0]
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
                targets = (await http.get("/json/list")).json()
            page = next(t for t in targets if t["type"] == "page")
            async with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
                yield DevTools(ws)
        finally:
            # The group is ours alone (start_new_session); helpers outliving the browser go too.
            try:
                os.killpg(browser.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            browser.wait(10)


def find_button(label: str) -> str:
    """JavaScript: the first button whose text is ``label``, or null."""
    return f"([...document.querySelectorAll('button')].find(b => b.textContent.trim() === {json.dumps(label)}) ?? null)"


def until(condition_js: str, timeout_ms: int = 15000) -> str:
    """JavaScript: a promise that polls ``condition_js`` in the page until it is truthy, then
    resolves to its value."""
    return f"""new Promise((resolve, reject) => {{
        const started = performance.now();
        const poll = async () => {{
            const value = await ({condition_js});
            if (value) resolve(value instanceof Node ? true : value);
            else if (performance.now() - started > {timeout_ms}) reject(new Error({json.dumps(condition_js)}));
            else setTimeout(poll, 50);
        }};
        poll();
    }})"""


# The prebuilt client's SmallWebRTC signalling, in the browser's own WebRTC stack: POST /start,
# POST the offer to /sessions/{id}/api/offer, trickle ICE candidates with PATCH; the same
# transceivers (audio, video), the "chat" data channel and its keep-alive pings. (The prebuilt
# UI's own Connect button needs Daily's device bundle from c.daily.co, unreachable offline.)
CONNECT_JS = """(async () => {
    const started = await (await fetch('/start', {method: 'POST', headers: {'content-type': 'application/json'},
                                                  body: JSON.stringify({body: {}})})).json();
    const endpoint = `/sessions/${started.sessionId}/api/offer`;
    const microphone = await navigator.mediaDevices.getUserMedia({audio: true});
    const pc = new RTCPeerConnection();
    pc.addTransceiver('audio', {direction: 'sendrecv'});
    pc.addTransceiver('video', {direction: 'sendrecv'});
    await pc.getTransceivers()[0].sender.replaceTrack(microphone.getAudioTracks()[0]);
    pc.ontrack = e => {  // played, as the client plays it: Chrome decodes only audio with a sink
        if (e.track.kind !== 'audio') return;
        window.michiPlayer = new Audio();
        window.michiPlayer.srcObject = new MediaStream([e.track]);
        window.michiPlayer.play();
    };
    const chat = pc.createDataChannel('chat', {ordered: true});
    chat.onopen = () => { window.michiPing = setInterval(() => chat.send(`ping: ${Date.now()}`), 1000); };
    const candidates = [];
    const gathered = new Promise(resolve => {
        pc.onicecandidate = e => e.candidate ? candidates.push(e.candidate) : resolve();
    });
    await pc.setLocalDescription(await pc.createOffer());
    const answer = await (await fetch(endpoint, {method: 'POST', headers: {'content-type': 'application/json'},
        body: JSON.stringify({sdp: pc.localDescription.sdp, type: 'offer'})})).json();
    await pc.setRemoteDescription(answer);
    await gathered;
    const patch = await fetch(endpoint, {method: 'PATCH', headers: {'content-type': 'application/json'},
        body: JSON.stringify({pc_id: answer.pc_id, candidates: candidates.map(c => (
            {candidate: c.candidate, sdp_mid: c.sdpMid, sdp_mline_index: c.sdpMLineIndex}))})});
    window.michiPeer = pc;
    return {pc_id: answer.pc_id, patch: patch.status, candidates: candidates.length};
})()"""

# Resolves once the browser has played half a second of the bot's audio, not all of it silence.
BOT_AUDIO_JS = """(async () => {
    const stats = [...(await window.michiPeer.getStats()).values()];
    const inbound = stats.find(s => s.type === 'inbound-rtp' && s.kind === 'audio');
    return inbound && inbound.totalSamplesReceived >= 24000 && inbound.totalAudioEnergy > 0
        ? {packets: inbound.packetsReceived, samples: inbound.totalSamplesReceived, energy: inbound.totalAudioEnergy}
        : null;
})()"""

# A banner over the prebuilt UI, so the screenshot says what the test saw.
BANNER_JS = """(() => {
    const banner = document.createElement('div');
    banner.textContent = `michi browser test: peer ${window.michiPeer.connectionState}, ` +
                         `bot audio ${window.michiBotAudio.samples} samples played, energy ${window.michiBotAudio.energy.toExponential(2)}`;
    banner.style.cssText = 'position:fixed;bottom:0;left:0;right:0;padding:8px;z-index:99999;' +
                           'background:#0a7d28;color:white;font:14px monospace';
    document.body.appendChild(banner);
})()"""


async def test_chromium_on_the_client_page_talks_to_the_agent_and_closing_it_frees_the_call() -> None:
    app, backend = make_agent()
    async with serve(app) as host:
        async with headless_chromium() as page:
            await page.call("Page.navigate", url=f"http://{host}/client/")
            await page.evaluate(until(find_button("Connect")))  # the agent serves the prebuilt UI

            peer = await page.evaluate(CONNECT_JS)
            assert peer["patch"] == 200 and peer["candidates"] > 0, peer
            await eventually(lambda: set(app.state.calls) == {peer["pc_id"]}, what="the browser's peer reaches the agent")
            # 25 frames of 80 ms: two seconds of the fake microphone's own audio through the model.
            stats = backend.engine.stats
            await eventually(lambda: stats.ticks - stats.filled_frames > 25, what="the engine steps the browser's audio")
            assert backend.engine.sessions_in_use == 1

            bot_audio = await page.evaluate(until(BOT_AUDIO_JS))
            assert bot_audio["energy"] > 0  # the random tiny model speaks noise, and the browser hears it
            await page.evaluate(f"window.michiBotAudio = {json.dumps(bot_audio)}")
            await page.evaluate(BANNER_JS)
            SCREENSHOT.parent.mkdir(exist_ok=True)
            shot = await page.call("Page.captureScreenshot", format="png")
            SCREENSHOT.write_bytes(base64.b64decode(shot["data"]))

            # Leave as the client's Disconnect does (close the peer connection), then quit Chromium.
            # (Chromium killed without closing its peer is noticed only when aiortc's ICE consent
            # checks fail, about 30 s later.)
            await page.evaluate("window.michiPeer.close()")
            await page.call("Browser.close")
        await eventually(lambda: not app.state.calls, what="the call ends after the browser leaves")
        await eventually(lambda: backend.engine.sessions_in_use == 0, what="the call's engine slot is freed")
