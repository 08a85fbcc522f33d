"""A listening corpus of fluent sentences (whole-sentence synthesis, not word by word).

Voices: flite's (awb, kal, kal16, rms, slt), festival's slt HTS voice and espeak-ng variants,
and on request festival's ked diphones and two neural voices (``neural_voices.py``), minus the
judge's held-out voices (``judge.JUDGE_VOICES``); texts: the corpus sentences plus
any lines of ``extra_text`` (e.g. lines SmolLM2 wrote), minus the judge's held-out sentences.

Word timings: flite's voices say where each word is (``flite_timing.py``: exact, from flite's
phone durations), which the speaking head's inner monologue needs. The other voices give none,
so theirs are approximate: the voiced span (silence trimmed) is split among the words in
proportion to their letters plus one. Listening needs no more: its CTC transcript is free of
alignment, and the speak/hold label only needs the end of speech, which the trim makes exact.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile
import soxr
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipecat_michi.train.corpus import DIALOGUES, SENTENCES
from pipecat_michi.train.flite_timing import flite_speech_with_spans
from pipecat_michi.train.judge import (
    ALL_HELD_OUT_SENTENCES,
    ESPEAK_VOICES,
    FESTIVAL_DIPHONE_VOICES,
    FESTIVAL_HTS_VOICE,
    FLITE_VOICES,
    HELD_OUT_VOICES,
    JUDGE_VOICES,
    fluent_speech,
)
from pipecat_michi.train.manifest import ManifestEntry, WordTiming, write_manifest
from pipecat_michi.train.neural_voices import NEURAL_VOICES
from pipecat_michi.train.restaurant import restaurant_sentences

# Two families, drawn half and half: flite's and festival's voices (closest to human recordings)
# and espeak-ng's formant voices, many of them (accents x voice variants) so the head meets
# many timbres. The judge's voices are left out, and with them their accent (en-gb-scotland) and
# variant (f3) in any combination.
NATURAL_VOICES = tuple(v for v in (*FLITE_VOICES, FESTIVAL_HTS_VOICE) if v not in HELD_OUT_VOICES)
ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
ESPEAK_VARIANTS = ("m1", "m2", "m4", "m5", "m7", "f1", "f2", "f4", "klatt", "klatt4", "Andy", "annie", "david",
                   "john", "linda", "max", "paul", "edward", "grandma")
ESPEAK_TRAINING_VOICES = tuple(v for v in ESPEAK_VOICES if v not in HELD_OUT_VOICES) + tuple(
    f"{accent}+{variant}" for accent in ESPEAK_ACCENTS for variant in ESPEAK_VARIANTS
)
# Festival's diphone voices (judge.FESTIVAL_DIPHONE_VOICES): trained on only when asked for
# (``--voices ked``), so the default mix, and the corpora the shipped heads were trained on, stay
# as they were drawn.
DIPHONE_TRAINING_VOICES = tuple(FESTIVAL_DIPHONE_VOICES)
# The neural voices (train/neural_voices.py: a person's timbre, from PyPI packages), likewise only
# when asked for (``--voices hibari-heart``); Piper's joe is the judge's (JUDGE_VOICES).
NEURAL_TRAINING_VOICES = tuple(v for v in NEURAL_VOICES if v not in JUDGE_VOICES)
TRAINING_VOICES = NATURAL_VOICES + ESPEAK_TRAINING_VOICES + DIPHONE_TRAINING_VOICES + NEURAL_TRAINING_VOICES
SPEEDS_WPM = (130, 150, 170, 190, 210)


class FluentCorpusConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    out_dir: Path
    utterances: int = Field(default=400, ge=1)
    extra_text: Path | None = Field(default=None, description="more sentences, one per line")
    # everyday: the corpus sentences (+ extra_text), drawn with replacement; restaurant: draws from
    # the demo domain's grammar (train/restaurant.py), which never yields its held-out answers.
    domain: Literal["everyday", "restaurant"] = "everyday"
    sample_rate_hz: int = 24000
    lead_ms: float = 200.0
    tail_ms: float = 800.0  # silence after the sentence: where the model should take its turn
    seed: int = 0
    workers: int = Field(default=2, ge=1, description="synthesis processes run at once")
    # One voice (or a few) instead of the listening mix: the bot's voice for the codec and the
    # speaking head, e.g. ``slt``. Comma-separated on the command line.
    voices: tuple[str, ...] = Field(default=(), description="only these voices, e.g. slt (default: all)")
    # Speaking rates drawn per sentence; the bot's voice speaks at one (e.g. 160, the judge's).
    speeds_wpm: tuple[int, ...] = Field(default=SPEEDS_WPM, min_length=1, description="speaking rates, e.g. 160")
    # Speed perturbation (Ko et al., 2015, as Kaldi's recipes do): each sentence is resampled by a
    # factor drawn in [1 - p, 1 + p], which moves pitch, formants and tempo together, as a
    # different speaker's vocal tract would: five natural voices become a continuum of them.
    speed_perturb: float = Field(default=0.0, ge=0.0, le=0.3,
                                 description="resample each sentence by a factor in [1-p, 1+p] (0: off)")

    @field_validator("voices", "speeds_wpm", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        return tuple(v.strip() for v in value.split(",") if v.strip()) if isinstance(value, str) else value

    @field_validator("voices")
    @classmethod
    def _known_voices(cls, voices: tuple[str, ...]) -> tuple[str, ...]:
        held_out = [v for v in voices if v in JUDGE_VOICES]
        if held_out:
            raise ValueError(f"{held_out} are the judge's held-out voices: never train on them")
        unknown = [v for v in voices if v not in TRAINING_VOICES]
        if unknown:
            raise ValueError(f"unknown voices {unknown}; known: {', '.join(TRAINING_VOICES)}")
        return voices


def approximate_word_timings(words: list[str], start: int, end: int) -> list[WordTiming]:
    """Split ``[start, end)`` among ``words`` in proportion to ``len(word) + 1``."""
    weights = np.array([len(w) + 1 for w in words], dtype=np.float64)
    edges = start + np.round(np.concatenate([[0.0], np.cumsum(weights)]) / weights.sum() * (end - start)).astype(int)
    return [WordTiming(word=w, start_sample=int(a), end_sample=int(max(b, a + 1))) for w, a, b in zip(words, edges, edges[1:])]


# ~700 everyday sentences (phone calls, shops, travel, home, small talk) with a wide vocabulary:
# a character-level transcript must meet many words to spell unseen ones.
EVERYDAY_TEXT = Path(__file__).parent / "texts" / "everyday.txt"
# 6,446 distinct sentences SmolLM2-135M-Instruct wrote (``michi-train sentences --answers 3000
# --batch-size 64 --seed 0``, 41 min on 2 cores; 5,347 distinct words): a head trained on ~1,000
# lines memorised them, and thousands more made held-out speech better (docs/training.md).
SMOLLM2_TEXT = Path(__file__).parent / "texts" / "smollm2.txt"
# 5,581 more: what callers ask a phone line or a voice assistant (``michi-train sentences --answers
# 2400 --batch-size 64 --prompt-set requests --seed 1 --exclude-text <SMOLLM2_TEXT>``, 35 min;
# 4,231 distinct words, 6,725 with the first file).
SMOLLM2_REQUESTS_TEXT = Path(__file__).parent / "texts" / "smollm2-requests.txt"


def training_sentences(extra_text: Path | None) -> list[str]:
    lines = list(SENTENCES) + [line for pair in DIALOGUES for line in pair]
    for text in (EVERYDAY_TEXT, SMOLLM2_TEXT, SMOLLM2_REQUESTS_TEXT):
        lines += [line.strip() for line in text.read_text().splitlines() if line.strip()]
    if extra_text is not None:
        lines += [line.strip() for line in extra_text.read_text().splitlines() if line.strip()]
    held_out = {s.lower() for s in ALL_HELD_OUT_SENTENCES}
    return [s for s in lines if s.lower() not in held_out]


def generate_fluent_corpus(config: FluentCorpusConfig) -> Path:
    """Write ``audio/*.wav`` and ``manifest.jsonl`` under ``config.out_dir``; return the manifest."""
    rng = random.Random(config.seed)
    if config.domain == "restaurant":  # one draw of the grammar per utterance, in order
        sentences = restaurant_sentences(config.utterances, config.seed)
    else:
        sentences = training_sentences(config.extra_text)
    audio_dir = config.out_dir / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    # Draws first (the corpus depends only on the seed), synthesis in parallel, results in order.
    picks = []
    for _ in range(config.utterances):
        family = config.voices or (NATURAL_VOICES if rng.random() < 0.5 else ESPEAK_TRAINING_VOICES)
        text = sentences[len(picks)] if config.domain == "restaurant" else rng.choice(sentences)
        picks.append((text, rng.choice(family), rng.choice(config.speeds_wpm)))
    # Drawn after the picks, so a corpus without perturbation is the one this seed always gave.
    factors = [1.0 + rng.uniform(-config.speed_perturb, config.speed_perturb) if config.speed_perturb else 1.0
               for _ in picks]
    with ThreadPoolExecutor(max_workers=config.workers) as pool:
        spoken = pool.map(lambda pick: speech_with_spans(*pick), picks)
        exact = 0
        for i, ((text, voice, speed), (audio, source_rate, spans), factor) in enumerate(zip(picks, spoken, factors)):
            audio = speed_perturbed(audio, source_rate, factor)
            if spans is not None:
                exact += 1
                spans = [(start * factor, end * factor) for start, end in spans]
            entries.append(_write_utterance(config, audio_dir, i, text, voice, speed, audio, source_rate, factor, spans))
    logger.info(f"fluent corpus: exact word timings for {exact} of {len(picks)} sentences (flite's), "
                "approximate for the rest")
    manifest = write_manifest(config.out_dir / "manifest.jsonl", entries)
    voices = len(config.voices or TRAINING_VOICES)
    logger.info(f"fluent corpus: {config.utterances} sentences, {voices} voices -> {manifest}")
    return manifest


def speech_with_spans(text: str, voice: str, speed_wpm: int) -> tuple[np.ndarray, int, list[tuple[float, float]] | None]:
    """``judge.fluent_speech``'s audio, with each word's span in seconds where the voice says it (flite)."""
    if voice in FLITE_VOICES:
        return flite_speech_with_spans(text, voice, speed_wpm)
    return (*fluent_speech(text, voice, speed_wpm), None)


def framed_speech(text: str, voice: str, rate: int, speed_wpm: int = 160,
                  timings: Literal["exact", "approximate"] = "exact") -> tuple[np.ndarray, list[WordTiming]]:
    """``text`` in ``voice`` as the corpus stores a sentence (``framed_utterance``), with the
    corpus's word timings: flite's exact ones where the voice gives them, unless ``timings`` asks
    for the letter-proportional approximation (what corpora before exact timings held)."""
    audio, source_rate, spans = speech_with_spans(text, voice, speed_wpm)
    return framed_utterance(text, audio, source_rate, rate, spans_s=spans if timings == "exact" else None)


def speed_perturbed(audio: np.ndarray, rate: int, factor: float) -> np.ndarray:
    """``audio`` stretched to ``factor`` times its length at the same ``rate``: slower and lower
    for a factor above 1, faster and higher below."""
    if factor == 1.0:
        return audio
    return soxr.resample(audio, rate, round(rate * factor)).astype(np.float32)


def framed_utterance(
    text: str, audio: np.ndarray, source_rate: int, rate: int, lead_ms: float = 200.0, tail_ms: float = 800.0,
    spans_s: list[tuple[float, float]] | None = None,
) -> tuple[np.ndarray, list[WordTiming]]:
    """A synthesised sentence as the corpus stores it: resampled to ``rate``, silence trimmed,
    peak 0.7, ``lead_ms`` of silence before and ``tail_ms`` after; with word timings: exact from
    ``spans_s`` (each word's seconds in ``audio``) when given, else approximate."""
    lead, tail = round(lead_ms * rate / 1000), round(tail_ms * rate / 1000)
    audio = soxr.resample(audio, source_rate, rate).astype(np.float32)
    loud = np.flatnonzero(np.abs(audio) > 0.02 * max(float(np.abs(audio).max()), 1e-6))
    trimmed = int(loud[0]) if loud.size else 0
    audio = audio[loud[0]: loud[-1] + 1] if loud.size else audio
    audio = 0.7 * audio / max(float(np.abs(audio).max()), 1e-6)
    wav = np.concatenate([np.zeros(lead, np.float32), audio, np.zeros(tail, np.float32)])
    words = text.split()
    if spans_s is None or len(spans_s) != len(words):
        return wav, approximate_word_timings(words, lead, lead + len(audio))
    end_of_speech = lead + len(audio)
    timings, previous_end = [], lead
    for word, (start_s, end_s) in zip(words, spans_s):
        # In the stored file's samples: the trim moved the audio by ``trimmed``, the lead back.
        # Clipped to the speech the file keeps; a word the trim cut (a faint first sound) or an
        # empty one (a lone dash) still gets a sample, after the word before it.
        start = min(max(round(start_s * rate) - trimmed + lead, previous_end), end_of_speech - 1)
        end = min(max(round(end_s * rate) - trimmed + lead, start + 1), len(wav))
        timings.append(WordTiming(word=word, start_sample=start, end_sample=end))
        previous_end = end
    return wav, timings


def _write_utterance(
    config: FluentCorpusConfig, audio_dir: Path, i: int, text: str, voice: str, speed: int,
    audio: np.ndarray, source_rate: int, factor: float = 1.0, spans_s: list[tuple[float, float]] | None = None,
) -> ManifestEntry:
    rate = config.sample_rate_hz
    wav, words = framed_utterance(text, audio, source_rate, rate, config.lead_ms, config.tail_ms, spans_s)
    name = f"fluent{i:05d}.wav"
    soundfile.write(audio_dir / name, wav, rate, subtype="FLOAT")
    return ManifestEntry(id=f"fluent{i:05d}", audio=f"audio/{name}", sample_rate_hz=rate,
                         text=text, words=words,
                         speaker=f"{voice}@{speed}" + ("" if factor == 1.0 else f"x{factor:.3f}"))
