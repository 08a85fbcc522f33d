"""How far the letter-proportional word timings put a word from where flite says it.

The speaking head's inner monologue places each word's text on the frames where the word is
spoken (``train/data.py``), so a timing error is text off its sound. For sentences of a domain in
a flite voice, this prints the share whose words line up with flite's phones (exact timings,
``train/flite_timing.py``) and, for those, the approximate timings' error against the exact ones:
mean absolute start error, and the share of words whose first 80 ms frame is off by one or more
and by two or more.

``--probe N`` also asks what the timings tell about the sound. A table learned on N training
sentences maps (the last word whose text has started, 80 ms frames since its start) to the mean
log-mel block (Whisper's 80 bins x 8 hops) of the frame: what the inner monologue alone can say
about each frame, the way the backbone reads it. Its R^2 on held-out sentences of the same
grammar (other draws), once with the exact timings and once with the approximate ones, on the
same frames.

    .venv/bin/python benchmarks/word_timing_error.py --domain restaurant --sentences 200
    .venv/bin/python benchmarks/word_timing_error.py --domain everyday --voice slt --speed 160
    .venv/bin/python benchmarks/word_timing_error.py --sentences 100 --probe 600
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import soxr
import torch

from pipecat_michi.model.whisper.frontend import log_mel_spectrogram
from pipecat_michi.train.fluent import framed_utterance, training_sentences
from pipecat_michi.train.flite_timing import flite_speech_with_spans
from pipecat_michi.train.judge import FLITE_VOICES
from pipecat_michi.train.restaurant import restaurant_sentences

RATE_HZ = 24_000
FRAME_SAMPLES = 1_920  # one 80 ms frame at 24 kHz
MEL_HOPS_PER_FRAME = 8  # Whisper's 10 ms hops
MAX_OFFSET_FRAMES = 8  # frames since a word's start, capped (long words and the pauses after them)


def frame_keys(timings: list, frames: int) -> list[tuple[str, int] | None]:
    """Per frame: the last word started by the frame's middle, and frames since its start."""
    keys: list[tuple[str, int] | None] = []
    for frame in range(frames):
        middle = frame * FRAME_SAMPLES + FRAME_SAMPLES // 2
        started = [t for t in timings if t.start_sample <= middle]
        if not started:
            keys.append(None)
            continue
        word = started[-1]
        keys.append((word.word.lower().strip(".,?!"), min(frame - word.start_sample // FRAME_SAMPLES, MAX_OFFSET_FRAMES)))
    return keys


def sentence_frames(text: str, voice: str, speed: int) -> tuple[np.ndarray, list, list] | None:
    """One sentence's log-mel blocks ``[frames, 640]`` (frames inside speech) and both timings' keys."""
    audio, rate, spans = flite_speech_with_spans(text, voice, speed)
    if spans is None:
        return None
    wav, exact = framed_utterance(text, audio, rate, RATE_HZ, spans_s=spans)
    _, approximate = framed_utterance(text, audio, rate, RATE_HZ)
    mel = log_mel_spectrogram(torch.from_numpy(soxr.resample(wav, RATE_HZ, 16_000).astype(np.float32))[None])[0]
    frames = mel.shape[0] // MEL_HOPS_PER_FRAME
    blocks = mel[: frames * MEL_HOPS_PER_FRAME].reshape(frames, -1).numpy()
    first, last = exact[0].start_sample // FRAME_SAMPLES, (exact[-1].end_sample - 1) // FRAME_SAMPLES
    keep = range(first, min(last + 1, frames))
    exact_keys, approximate_keys = frame_keys(exact, frames), frame_keys(approximate, frames)
    return (blocks[list(keep)], [exact_keys[i] for i in keep], [approximate_keys[i] for i in keep])


def probe_r2(train: list, held_out: list, which: int) -> float:
    """R^2 on ``held_out`` of the (word, offset) -> mean block table learned on ``train``
    (``which``: 1 exact keys, 2 approximate); unseen keys fall back to the word's mean, then the mean."""
    sums: dict = {}
    for blocks, *keys in train:
        for block, key in zip(blocks, keys[which - 1]):
            for k in (key, key and key[0]):
                total, count = sums.get(k, (0.0, 0))
                sums[k] = (total + block, count + 1)
    overall = np.mean(np.concatenate([blocks for blocks, *_ in train]), axis=0)
    errors, variance = 0.0, 0.0
    targets = np.concatenate([blocks for blocks, *_ in held_out])
    mean_target = targets.mean(axis=0)
    for blocks, *keys in held_out:
        for block, key in zip(blocks, keys[which - 1]):
            found = sums.get(key) or sums.get(key and key[0])
            guess = found[0] / found[1] if found else overall
            errors += float(np.sum((block - guess) ** 2))
            variance += float(np.sum((block - mean_target) ** 2))
    return 1.0 - errors / variance


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domain", choices=("restaurant", "everyday"), default="restaurant")
    parser.add_argument("--voice", choices=sorted(FLITE_VOICES), default="slt")
    parser.add_argument("--speed", type=int, default=160, help="words per minute")
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe", type=int, default=0,
                        help="training sentences of the (word, offset) -> log-mel probe (restaurant domain; 0: no probe)")
    args = parser.parse_args(argv)
    if args.domain == "restaurant":
        sentences = restaurant_sentences(args.sentences, args.seed)
    else:
        sentences = random.Random(args.seed).sample(training_sentences(None), args.sentences)
    exact_sentences, errors_ms, frame_offsets = 0, [], []
    for text in sentences:
        audio, rate, spans = flite_speech_with_spans(text, args.voice, args.speed)
        if spans is None:
            continue
        exact_sentences += 1
        _, exact = framed_utterance(text, audio, rate, RATE_HZ, spans_s=spans)
        _, approximate = framed_utterance(text, audio, rate, RATE_HZ)
        for ours, theirs in zip(approximate, exact):
            errors_ms.append(abs(ours.start_sample - theirs.start_sample) * 1000 / RATE_HZ)
            frame_offsets.append(abs(ours.start_sample // FRAME_SAMPLES - theirs.start_sample // FRAME_SAMPLES))
    offsets = np.array(frame_offsets)
    print(f"{args.domain}, flite {args.voice} at {args.speed} wpm: {exact_sentences} of {len(sentences)} sentences "
          f"line up with flite's phones (exact timings)")
    if offsets.size:
        print(f"approximate timings vs exact, {offsets.size} words: mean start error {np.mean(errors_ms):.0f} ms "
              f"(p90 {np.percentile(errors_ms, 90):.0f} ms); first frame off by >= 1: {100 * np.mean(offsets >= 1):.1f}%, "
              f">= 2: {100 * np.mean(offsets >= 2):.1f}%")
    if args.probe:
        run_probe(args)


def run_probe(args: argparse.Namespace) -> None:
    # Held-out: the first sentences of another seed's draws that no training draw repeats.
    train_texts = restaurant_sentences(args.probe, args.seed)
    seen = set(train_texts)
    held_texts = [t for t in restaurant_sentences(4 * args.sentences, args.seed + 1000) if t not in seen][: args.sentences]
    train = [f for f in (sentence_frames(t, args.voice, args.speed) for t in train_texts) if f is not None]
    held_out = [f for f in (sentence_frames(t, args.voice, args.speed) for t in held_texts) if f is not None]
    frames = sum(len(blocks) for blocks, *_ in held_out)
    print(f"probe: (word, frames since its start) -> the frame's log-mel block, learned on {len(train)} sentences, "
          f"R^2 on {len(held_out)} held-out ones ({frames} frames of speech): exact timings "
          f"{probe_r2(train, held_out, 1):.3f}, approximate {probe_r2(train, held_out, 2):.3f}")


if __name__ == "__main__":
    main()
