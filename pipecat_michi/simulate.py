"""michi-simulate: one simulated duplex call on the embedded default model.

The tiny preset with random (seeded) weights runs on the CPU: the caller's audio (a WAV file, or
a synthetic 3 s signal of tone bursts and pauses) is fed one 80 ms frame at a time, paced in
real time unless ``--fast``; each frame's step latency and outputs are printed, then a summary,
and the bot's audio is written as a 24 kHz PCM16 WAV. The output is noise and random text:
this checks the plumbing and the timing, not the voice.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import soundfile
import soxr
import torch
from loguru import logger

from pipecat_michi.model.quantize import QUANTIZE_MODES, quantize_model
from pipecat_michi.model.runtime import prepare_model_thread, resolve_device, resolve_dtype
from pipecat_michi.model.config import MichiConfig
from pipecat_michi.model.michi import MichiModel, Sampling, StepNoise
from pipecat_michi.model.tokenizer import StreamingDetokenizer, load_tokenizer

DEFAULT_SYSTEM = "You are Michi, a friendly voice assistant. Keep answers short."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="michi-simulate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--wav", type=Path, help="caller audio (any rate/channels); default: synthetic tones")
    parser.add_argument("--system", default=DEFAULT_SYSTEM, help="system prompt prefilled before the call")
    parser.add_argument("--out", type=Path, default=Path("artifacts/simulated_call.wav"), help="bot audio WAV")
    parser.add_argument("--frames", type=int, help="call length in 80 ms frames (default: the caller audio's)")
    parser.add_argument("--fast", action="store_true", help="step as fast as possible, not in real time")
    parser.add_argument("--device", default="cpu", help="cpu (the embedded default), auto or cuda")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and the sampling noise")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    parser.add_argument("--quantize", default="none", choices=QUANTIZE_MODES, help="weight quantization")
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


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub download must fail fast, never hang
    args = parse_args(argv)
    config = MichiConfig.preset("tiny")
    prepare_model_thread()
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    dtype = resolve_dtype(args.dtype, device)
    model = quantize_model(MichiModel(config).to(device, dtype).eval(), args.quantize)
    if args.compile:
        model.compile_step(mode="reduce-overhead" if device.type == "cuda" else None)
    tokenizer = load_tokenizer(config)
    logger.info(f"tiny preset, {model.num_parameters():,} random parameters on {device} ({dtype}, "
                f"quantize {args.quantize}{', compiled' if args.compile else ''})")

    caller = load_caller(args.wav, config.sample_rate_hz) if args.wav else synthetic_caller(config.sample_rate_hz)
    frames = to_frames(caller, config.frame_samples, args.frames)
    if len(frames) == 0:
        raise SystemExit(f"{args.wav} holds no audio")
    source = args.wav or "synthetic tone bursts"
    logger.info(f"caller: {source}, {len(frames)} frames of {config.codec.frame_ms:.0f} ms")

    cache, state = model.new_cache(1), model.init_state(1)
    start = time.perf_counter()
    system_tokens = tokenizer.encode(args.system)
    if len(system_tokens) >= cache.capacity // 2:
        raise SystemExit(f"--system is {len(system_tokens)} tokens; keep it under half the KV capacity "
                         f"({cache.capacity}) so the call has room")
    model.prefill_text(system_tokens, cache, slot=0, pinned=True)
    logger.info(f"system prompt: {len(system_tokens)} tokens in {(time.perf_counter() - start) * 1000:.1f} ms")

    sampling = Sampling(
        temperature=torch.tensor([0.8], device=device),
        top_k=torch.tensor([50], device=device),
        speak_threshold=torch.tensor([config.speak_threshold], device=device),
    )
    generator = torch.Generator().manual_seed(args.seed)
    text_detok, transcript_detok = StreamingDetokenizer(tokenizer), StreamingDetokenizer(tokenizer)
    frame_s = config.codec.frame_ms / 1000
    step_ms, bot_audio, bot_text, transcript = [], [], [], []
    speaking_frames = 0

    print(f"{'frame':>5} {'step ms':>8} {'speak p':>7} {'speaking':>8}  {'text':<8} transcript")
    call_start = time.perf_counter()
    for index, frame in enumerate(frames):
        if not args.fast:  # a frame can be stepped once it has been fully heard
            time.sleep(max(0.0, call_start + (index + 1) * frame_s - time.perf_counter()))
        if cache.free_space(0) == 0:  # ring: drop the oldest quarter of the frames, keep the prompt
            cache.evict(0, cache.capacity // 4)
        user_audio = torch.from_numpy(frame)[None].to(device)
        noise = StepNoise.draw([generator], config.codec.latent_dim, device)
        start = time.perf_counter()
        # A compiled step attends over the whole window: one shape for every frame.
        key_count = cache.capacity if args.compile else None
        out, state = model.step(user_audio, state, cache, sampling, noise, key_count=key_count)
        bot_audio.append(out.audio[0].cpu().numpy())  # inside the timing: on CUDA this waits for the step
        step_ms.append((time.perf_counter() - start) * 1000)
        text = text_detok.push(int(out.text_tokens[0]))
        heard = transcript_detok.push(int(out.transcript_tokens[0]))
        bot_text.append(text)
        transcript.append(heard)
        speaking = bool(out.speaking[0])
        speaking_frames += speaking
        print(f"{index:>5} {step_ms[-1]:>8.2f} {float(out.speak_prob[0]):>7.2f} "
              f"{'yes' if speaking else 'no':>8}  {text!r:<8} {heard!r}")

    timings = np.array(step_ms)
    p50, p99 = np.percentile(timings, [50, 99])
    late = int((timings > config.codec.frame_ms).sum())
    real_time_factor = timings.sum() / 1000 / (len(frames) * frame_s)
    print(f"\nstep ms p50 {p50:.2f}  p99 {p99:.2f}  max {timings.max():.2f}")
    print(f"bot spoke in {speaking_frames} of {len(frames)} frames")
    print(f"frames over the {config.codec.frame_ms:.0f} ms budget: {late} of {len(frames)}")
    print(f"real-time factor {real_time_factor:.3f} (compute time / call time; below 1 keeps up)")
    print(f"bot text: {''.join(bot_text)!r}")
    print(f"caller transcript: {''.join(transcript)!r}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    audio = np.concatenate(bot_audio)
    soundfile.write(str(args.out), np.clip(audio, -1.0, 1.0), config.sample_rate_hz, subtype="PCM_16")
    logger.info(f"bot audio: {args.out} ({len(audio) / config.sample_rate_hz:.2f} s)")


if __name__ == "__main__":
    main()
