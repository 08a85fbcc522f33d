"""How far the letter-proportional word timings put a word from where flite says it.

The speaking head's inner monologue places each word's text on the frames where the word is
spoken (``train/data.py``), so a timing error is text off its sound. For sentences of a domain in
a flite voice, this prints the share whose words line up with flite's phones (exact timings,
``train/flite_timing.py``) and, for those, the approximate timings' error against the exact ones:
mean absolute start error, and the share of words whose first 80 ms frame is off by one or more
and by two or more.

    .venv/bin/python benchmarks/word_timing_error.py --domain restaurant --sentences 200
    .venv/bin/python benchmarks/word_timing_error.py --domain everyday --voice slt --speed 160
"""

from __future__ import annotations

import argparse
import random

import numpy as np

from pipecat_michi.train.fluent import framed_utterance, training_sentences
from pipecat_michi.train.flite_timing import flite_speech_with_spans
from pipecat_michi.train.judge import FLITE_VOICES
from pipecat_michi.train.restaurant import restaurant_sentences

RATE_HZ = 24_000
FRAME_SAMPLES = 1_920  # one 80 ms frame at 24 kHz


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domain", choices=("restaurant", "everyday"), default="restaurant")
    parser.add_argument("--voice", choices=sorted(FLITE_VOICES), default="slt")
    parser.add_argument("--speed", type=int, default=160, help="words per minute")
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
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


if __name__ == "__main__":
    main()
