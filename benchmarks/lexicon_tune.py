"""Tune and time the lexicon transcript decoder on a dev set of our own, never on the judge's.

The dev set: 24 everyday sentences written for this (in no training text, none of the judge's
held-out sentences) spoken by training voices, clean and through Twilio's 8 kHz mu-law. The
listening head runs once per clip; then each decoder setting is scored with jiwer (greedy CTC
printed first) and timed (Python milliseconds per 80 ms frame, silence included). The defaults of
``BeamSettings`` come from this script's grid; ``benchmarks/listen_eval.py`` then judges them once
on the held-out sets.

    .venv/bin/python benchmarks/lexicon_tune.py --checkpoint nano-listening
    .venv/bin/python benchmarks/lexicon_tune.py --checkpoint nano-listening --grid "lm_weight=0.4,0.6 word_bonus=3,4.5"
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time

import numpy as np
import torch

from pipecat_michi.engine.config import PACKAGED_CHECKPOINTS
from pipecat_michi.model.checkpoint import load_checkpoint
from pipecat_michi.model.ctc_decoder import BeamSettings, CtcBeamDecoder, english_lexicon
from pipecat_michi.train.fluent import ESPEAK_TRAINING_VOICES, NATURAL_VOICES
from pipecat_michi.train.judge import DEV_SENTENCES, Clip, fluent_speech, twilio_path, wer

def dev_clips() -> list[Clip]:
    voices = list(NATURAL_VOICES) + list(ESPEAK_TRAINING_VOICES[::7])
    rng = np.random.default_rng(5)
    return [Clip(f"dev/{i}", *fluent_speech(text, voices[rng.integers(len(voices))]), text)
            for i, text in enumerate(DEV_SENTENCES)]


@torch.no_grad()
def head_logprobs(model, clip: Clip, twilio: bool) -> np.ndarray:  # noqa: ANN001
    """The listening head's CTC log-probabilities ``[T, C]`` of one clip (+ 0.5 s of silence)."""
    audio = twilio_path(clip.audio, clip.sample_rate_hz) if twilio else clip.audio
    rate, frame = model.config.sample_rate_hz, model.config.frame_samples
    wav = Clip(clip.name, audio, clip.sample_rate_hz, clip.text).resampled(rate)
    wav = np.pad(wav, (0, (-wav.size) % frame + 6 * frame)).astype(np.float32)
    logits = model.listening(torch.from_numpy(wav)[None].to(model.device, model.dtype))[1][0]
    return torch.log_softmax(logits.float(), dim=-1).cpu().numpy()


def greedy(logprobs: np.ndarray, alphabet: str) -> str:
    best, previous, out = logprobs.argmax(-1), 0, []
    for symbol in best:
        if symbol != 0 and symbol != previous:
            out.append(alphabet[symbol - 1])
        previous = symbol
    return "".join(out)


def decode(logprobs: np.ndarray, alphabet: str, settings: BeamSettings, per_frame: int) -> str:
    decoder = CtcBeamDecoder(alphabet, english_lexicon(), settings)
    text = "".join(decoder.push(logprobs[i: i + per_frame]) for i in range(0, len(logprobs), per_frame))
    return text + decoder.finish()


def parse_grid(spec: str) -> list[dict[str, float]]:
    """``"lm_weight=0.4,0.6 word_bonus=3"`` -> every combination, as BeamSettings overrides."""
    fields = {f.name: f.type for f in dataclasses.fields(BeamSettings)}
    axes = []
    for item in spec.split():
        name, values = item.split("=")
        if name not in fields:
            raise SystemExit(f"unknown setting {name!r}; BeamSettings has {sorted(fields)}")
        cast = int if fields[name] in (int, "int") else float
        axes.append([(name, cast(v)) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a CTC-head checkpoint directory or a packaged name")
    parser.add_argument("--grid", default="", help="settings to try, e.g. 'lm_weight=0.4,0.6 beam_size=8,16'")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_checkpoint(PACKAGED_CHECKPOINTS.get(args.checkpoint, args.checkpoint)).eval()
    if model.config.listening.transcript != "ctc":
        raise SystemExit("the lexicon decoder needs a CTC listening head")
    alphabet, per_frame = model.config.listening.ctc_alphabet, model.listening.tokens_per_frame
    clips = dev_clips()
    sets = {name: [(clip.text, head_logprobs(model, clip, twilio)) for clip in clips]
            for name, twilio in (("dev", False), ("dev Twilio", True))}
    frames = sum(len(lp) for rows in sets.values() for _, lp in rows) / per_frame
    print(f"dev set: {len(clips)} sentences in training voices, clean and Twilio ({frames:.0f} frames in all)")
    print("greedy CTC: " + ", ".join(
        f"{name} {100 * wer([greedy(lp, alphabet) for _, lp in rows], [t for t, _ in rows]):.1f}%"
        for name, rows in sets.items()))
    for overrides in parse_grid(args.grid) if args.grid else [{}]:
        settings = dataclasses.replace(BeamSettings(), **overrides)
        started = time.perf_counter()
        scores = {name: wer([decode(lp, alphabet, settings, per_frame) for _, lp in rows], [t for t, _ in rows])
                  for name, rows in sets.items()}
        ms = 1000 * (time.perf_counter() - started) / frames
        label = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "defaults"
        print(f"lexicon ({label}): " + ", ".join(f"{n} {100 * s:.1f}%" for n, s in scores.items())
              + f"; {ms:.2f} ms a frame")


if __name__ == "__main__":
    main()
