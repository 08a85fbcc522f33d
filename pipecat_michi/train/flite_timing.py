"""Exact word timings of flite's speech, from flite itself.

The speaking head learns what to say at each 80 ms frame from the inner monologue: each word's
text tokens placed on the frames where the word is spoken (``data.frame_tokens``). A fluent
synthesiser gives no word timings, so the corpus split the voiced span among the words in
proportion to their letters (``fluent.approximate_word_timings``), which puts a word's text off
its sound by a frame or more (``benchmarks/word_timing_error.py``): the model is asked to say a
word where its text is not. flite knows where every phone ends (``-psdur``: ``phone:end_s``
over the whole utterance, pauses included) and each word's phones (``-ps`` on the word alone);
walking the sentence's phones word by word gives each word's first and last phone, hence its
span, exact to the sample.
"""

from __future__ import annotations

import functools
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile
from loguru import logger

PAUSE = "pau"


def parse_segments(printed: str) -> list[tuple[str, float]]:
    """``-psdur`` output (``pau:0.222 w:0.263 ...``) as ``[(phone, end_s), ...]``."""
    segments = []
    for item in printed.split():
        phone, _, end = item.rpartition(":")
        if not phone:
            raise ValueError(f"not a flite segment: {item!r}")
        segments.append((phone, float(end)))
    return segments


@functools.cache
def word_phone_count(word: str, voice: str) -> int:
    """How many phones flite says for ``word`` alone (pauses not counted); 0 for punctuation."""
    printed = subprocess.run(["flite", "-voice", voice, "-ps", "-t", word, "none"], check=True,
                             capture_output=True, text=True).stdout
    return sum(1 for phone in printed.split() if phone != PAUSE)


def word_spans(segments: list[tuple[str, float]], phone_counts: list[int]) -> list[tuple[float, float]] | None:
    """Each word's ``(start_s, end_s)``: its phones are the next ``count`` non-pause segments.

    ``None`` when the counts do not add up to the sentence's phones (a word said differently in
    context than alone): the caller falls back to approximate timings. A word without phones
    (a lone dash) gets an empty span where the next word starts.
    """
    spoken = [(index, end) for index, (phone, end) in enumerate(segments) if phone != PAUSE]
    if sum(phone_counts) != len(spoken):
        return None
    spans, cursor = [], 0
    for count in phone_counts:
        if count == 0:
            at = segments[spoken[cursor][0] - 1][1] if cursor < len(spoken) and spoken[cursor][0] > 0 else 0.0
            spans.append((at, at))
            continue
        first_index = spoken[cursor][0]
        start = segments[first_index - 1][1] if first_index > 0 else 0.0
        spans.append((start, spoken[cursor + count - 1][1]))
        cursor += count
    return spans


def flite_speech_with_spans(text: str, voice: str, speed_wpm: int) -> tuple[np.ndarray, int, list[tuple[float, float]] | None]:
    """flite's ``voice`` saying ``text`` at ``speed_wpm`` (as ``judge.fluent_speech`` does), and
    each word's span in seconds from the start of the audio (``None`` if they cannot be had)."""
    with tempfile.TemporaryDirectory(prefix="michi-flite-") as tmp:
        out = Path(tmp) / "speech.wav"
        stretch = f"{170 / speed_wpm:.3f}"  # flite's duration stretch: 1.0 is its natural ~170 wpm
        printed = subprocess.run(
            ["flite", "-voice", voice, "--setf", f"duration_stretch={stretch}", "-psdur", "-t", text, "-o", str(out)],
            check=True, capture_output=True, text=True,
        ).stdout
        audio, rate = soundfile.read(out, dtype="float32")
    words = text.split()
    spans = word_spans(parse_segments(printed), [word_phone_count(word, voice) for word in words])
    if spans is None:
        logger.debug(f"flite {voice}: word phones do not line up with {text!r}; approximate timings")
    return audio, rate, spans
