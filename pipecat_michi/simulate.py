"""michi-simulate: one simulated duplex call on the embedded default model.

The demo checkpoint (``--checkpoint`` for another) runs on the CPU in a ``LocalEngine``, the backend
the service embeds (the same slot, KV eviction, prompt checks and settings as a served call):
the caller's audio (a WAV file, or a synthetic 3 s signal of tone bursts and pauses) is fed one
80 ms frame at a time, paced in real time unless ``--fast``; each frame's step latency and
outputs are printed, then a summary, and the bot's audio (silence while it listens) is written
as a 24 kHz PCM16 WAV. The demo model's voice is speech-like sound and its text letters, not
words: this checks the plumbing and the timing, not the voice.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import numpy as np
import soundfile
import soxr
from loguru import logger

from pipecat_michi.engine.batch import ContextTooLongError
from pipecat_michi.engine.call import LocalCall, LocalEngine
from pipecat_michi.engine.config import EngineConfig
from pipecat_michi.engine.engine import DuplexEngine
from pipecat_michi.engine.settings import SessionSettingsUpdate
from pipecat_michi.model.quantize import QUANTIZE_MODES

DEFAULT_SYSTEM = "You are Michi, a friendly voice assistant. Keep answers short."
# A step of the tiny model takes milliseconds; this only stops a broken engine hanging the run.
STEP_TIMEOUT_S = 30.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="michi-simulate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--wav", type=Path, help="caller audio (any rate/channels); default: synthetic tones")
    parser.add_argument("--system", default=DEFAULT_SYSTEM, help="system prompt prefilled before the call")
    parser.add_argument("--out", type=Path, default=Path("artifacts/simulated_call.wav"), help="bot audio WAV")
    parser.add_argument("--frames", type=int, help="call length in 80 ms frames (default: the caller audio's)")
    parser.add_argument("--fast", action="store_true", help="step as fast as possible, not in real time")
    parser.add_argument("--checkpoint", default="demo",
                        help="MichiAI checkpoint directory, or demo (the one shipped in the package)")
    parser.add_argument("--device", default="cpu", help="cpu (the embedded default), auto or cuda")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampling noise")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    parser.add_argument("--quantize", default="auto", choices=(*QUANTIZE_MODES, "auto"), help="weight quantization (auto: int8-dynamic for a big model on CPU)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the step (the first steps compile: use with --fast)")
    args = parser.parse_args(argv)
    if args.frames is not None and args.frames < 1:
        parser.error("--frames must be at least 1")
    return args


def load_caller(path: Path, sample_rate_hz: int) -> np.ndarray:
    """A WAV (or any soundfile format) as mono float32 at ``sample_rate_hz``."""
    audio, file_rate_hz = soundfile.read(str(path), dtype="float32", always_2d=True)
    mono = audio.mean(axis=1)
    if file_rate_hz != sample_rate_hz:
        mono = soxr.resample(mono, file_rate_hz, sample_rate_hz)
    return mono.astype(np.float32)


def synthetic_caller(sample_rate_hz: int, seconds: float = 3.0) -> np.ndarray:
    """Three tone bursts ("speech") separated by pauses, with 10 ms fades against clicks."""
    audio = np.zeros(int(seconds * sample_rate_hz), dtype=np.float32)
    for start_s, end_s, tone_hz in ((0.2, 0.9, 220.0), (1.2, 1.8, 330.0), (2.1, 2.6, 262.0)):
        start, end = int(start_s * sample_rate_hz), int(end_s * sample_rate_hz)
        t = np.arange(end - start) / sample_rate_hz
        fade = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)
        audio[start:end] = 0.3 * fade * np.sin(2 * np.pi * tone_hz * t)
    return audio


def to_frames(audio: np.ndarray, frame_samples: int, frames: int | None) -> np.ndarray:
    """``[frames, frame_samples]``: padded with silence, or cut, to whole frames."""
    count = frames if frames is not None else -(-len(audio) // frame_samples)
    padded = np.zeros(count * frame_samples, dtype=np.float32)
    used = min(len(audio), len(padded))
    padded[:used] = audio[:used]
    return padded.reshape(count, frame_samples)


async def simulate(args: argparse.Namespace) -> None:
    """One call on a ``LocalEngine`` (the service's embedded backend), frame by frame."""
    config = EngineConfig(
        checkpoint=args.checkpoint,
        device=args.device,
        dtype=args.dtype,
        quantize=args.quantize,
        compile=args.compile,
        seed=args.seed,
        slot_capacity=1,
    )
    engine = DuplexEngine(config)
    step_ms: list[float] = []
    engine.tick_observers.append(lambda ms, calls, late: step_ms.append(ms))
    backend = LocalEngine(engine=engine)
    try:
        start = time.perf_counter()
        try:
            call = await backend.open_call(SessionSettingsUpdate(seed=args.seed), system_prompt=args.system)
        except ContextTooLongError as e:
            raise SystemExit(f"--system does not fit the call's context: {e}") from None
        logger.info(
            f"{engine.model.num_parameters():,} parameters on {engine.model.device} "
            f"({engine.model.dtype}, quantize {args.quantize}{', compiled' if args.compile else ''}); "
            f"call open, system prompt prefilled, in {(time.perf_counter() - start) * 1000:.0f} ms"
        )
        await _run_call(args, call, engine, step_ms)
    finally:
        await backend.close()


async def _run_call(args: argparse.Namespace, call: LocalCall, engine: DuplexEngine, step_ms: list[float]) -> None:
    caller = load_caller(args.wav, call.sample_rate_hz) if args.wav else synthetic_caller(call.sample_rate_hz)
    frames = to_frames(caller, call.frame_samples, args.frames)
    if len(frames) == 0:
        raise SystemExit(f"{args.wav} holds no audio")
    frame_ms = engine.frame_ms
    logger.info(f"caller: {args.wav or 'synthetic tone bursts'}, {len(frames)} frames of {frame_ms:.0f} ms")

    bot_audio, bot_text, transcript = [], [], []
    speaking_frames = 0
    print(f"{'frame':>5} {'step ms':>8} {'speak p':>7} {'speaking':>8}  {'text':<8} transcript")
    call_start = time.perf_counter()
    for index, frame in enumerate(frames):
        if not args.fast:  # a frame can be stepped once it has been fully heard
            await asyncio.sleep(max(0.0, call_start + (index + 1) * frame_ms / 1000 - time.perf_counter()))
        await call.send_audio(frame, index)
        result = await call.receive(timeout=STEP_TIMEOUT_S)
        silence = np.zeros(call.frame_samples, dtype=np.int16)
        bot_audio.append(result.audio if result.audio is not None else silence)
        bot_text.append(result.bot_text)
        transcript.append(result.transcript)
        speaking_frames += result.speaking
        print(f"{index:>5} {step_ms[-1]:>8.2f} {result.speak_prob:>7.2f} "
              f"{'yes' if result.speaking else 'no':>8}  {result.bot_text!r:<8} {result.transcript!r}")

    timings = np.array(step_ms[-len(frames) :])
    p50, p99 = np.percentile(timings, [50, 99])
    late = int((timings > frame_ms).sum())
    real_time_factor = timings.sum() / (len(frames) * frame_ms)
    print(f"\nstep ms p50 {p50:.2f}  p99 {p99:.2f}  max {timings.max():.2f}")
    print(f"bot spoke in {speaking_frames} of {len(frames)} frames")
    print(f"frames over the {frame_ms:.0f} ms budget: {late} of {len(frames)}")
    print(f"real-time factor {real_time_factor:.3f} (compute time / call time; below 1 keeps up)")
    print(f"bot text: {''.join(bot_text)!r}")
    print(f"caller transcript: {''.join(transcript)!r}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    audio = np.concatenate(bot_audio)
    soundfile.write(str(args.out), audio, call.sample_rate_hz, subtype="PCM_16")
    logger.info(f"bot audio: {args.out} ({len(audio) / call.sample_rate_hz:.2f} s)")


def main(argv: list[str] | None = None) -> None:
    asyncio.run(simulate(parse_args(argv)))


if __name__ == "__main__":
    main()
