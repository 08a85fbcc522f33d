"""A small local speech corpus made with espeak-ng, with exact word timings.

Each word is synthesised on its own, trimmed of silence and concatenated with a fixed gap, so
every word's start and end sample is known exactly rather than estimated by an aligner.
Single utterances are mono files; dialogues are stereo: the user's question on channel 0, then
the bot's answer on channel 1, as a duplex model hears and speaks them.
"""

from __future__ import annotations

import io
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field

from pipecat_michi.train.manifest import ManifestEntry, WordTiming, write_manifest

SENTENCES = (
    "the cat sat on the warm mat",
    "please call me back after lunch",
    "the train leaves at seven tonight",
    "we need more milk and bread",
    "it is raining in the city today",
    "my phone battery is almost empty",
    "turn left at the next corner",
    "the meeting moved to friday morning",
    "she plays the piano very well",
    "open the window it is hot",
    "the blue car is parked outside",
    "can you hear me now",
    "dinner will be ready at eight",
    "the river runs past the old mill",
    "he forgot his keys at home",
    "the store closes in ten minutes",
    "i would like a cup of tea",
    "the children are playing in the garden",
    "send the report before noon",
    "the sun is shining over the hills",
)

DIALOGUES = (
    ("what time is it", "it is half past three"),
    ("how is the weather today", "it is sunny and warm"),
    ("where is the station", "go straight and turn right"),
    ("can you help me please", "of course what do you need"),
    ("what is your name", "my name is michi"),
    ("do you like music", "yes i love music"),
    ("is the shop open", "yes until nine tonight"),
    ("what should i cook tonight", "try a simple pasta"),
    ("how far is the airport", "about twenty minutes by car"),
    ("did you sleep well", "i slept very well thanks"),
    ("what day is it", "today is tuesday"),
    ("can we meet tomorrow", "yes tomorrow at ten works"),
)

VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb-scotland", "en-us+m3", "en-gb+f2")
SPEEDS_WPM = (140, 170, 200)


class CorpusConfig(BaseModel):
    """What to synthesise."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out_dir: Path
    utterances: int = Field(default=40, ge=0)
    dialogues: int = Field(default=24, ge=0)
    sample_rate_hz: int = 24000
    word_gap_ms: float = 60.0
    lead_ms: float = 200.0
    # Silence after a mono utterance: frames where the speaker has stopped, i.e. where a duplex
    # model should take its turn (the listening head's "speak" label).
    tail_ms: float = 800.0
    # Pause between the user's last word and the bot's first in a dialogue.
    response_gap_ms: float = 400.0
    seed: int = 0


class EspeakSynth:
    """espeak-ng (resampled by sox) for one word at a time; caches words already made."""

    def __init__(self, sample_rate_hz: int) -> None:
        for tool in ("espeak-ng", "sox"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is not installed; apt-get install espeak-ng sox")
        self.sample_rate_hz = sample_rate_hz
        self._cache: dict[tuple[str, int, str], np.ndarray] = {}

    def word(self, word: str, voice: str, speed_wpm: int) -> np.ndarray:
        key = (voice, speed_wpm, word)
        if key not in self._cache:
            self._cache[key] = _trim(self._synthesise(word, voice, speed_wpm))
        return self._cache[key]

    def _synthesise(self, word: str, voice: str, speed_wpm: int) -> np.ndarray:
        espeak = subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(speed_wpm), "--stdout", word],
            check=True, capture_output=True,
        )
        sox = subprocess.run(
            ["sox", "-t", "wav", "-", "-t", "wav", "-r", str(self.sample_rate_hz), "-e", "float", "-b", "32", "-"],
            input=espeak.stdout, check=True, capture_output=True,
        )
        wav, _ = sf.read(io.BytesIO(sox.stdout), dtype="float32")
        return wav if wav.ndim == 1 else wav[:, 0]


def _trim(wav: np.ndarray, threshold: float = 0.02) -> np.ndarray:
    """Cut leading/trailing silence (below ``threshold`` of the peak): word edges become exact."""
    loud = np.flatnonzero(np.abs(wav) > threshold * max(float(np.abs(wav).max()), 1e-6))
    return wav[loud[0]: loud[-1] + 1] if loud.size else wav


def speak_words(
    synth: EspeakSynth, text: str, voice: str, speed_wpm: int, start_sample: int, gap_samples: int
) -> tuple[np.ndarray, list[WordTiming]]:
    """Audio of ``text`` starting at ``start_sample`` (silence before it) and its word timings."""
    pieces = [np.zeros(start_sample, dtype=np.float32)]
    timings = []
    cursor = start_sample
    for i, word in enumerate(text.split()):
        if i:
            pieces.append(np.zeros(gap_samples, dtype=np.float32))
            cursor += gap_samples
        audio = synth.word(word, voice, speed_wpm)
        timings.append(WordTiming(word=word, start_sample=cursor, end_sample=cursor + len(audio)))
        pieces.append(audio)
        cursor += len(audio)
    return np.concatenate(pieces), timings


def generate_corpus(config: CorpusConfig) -> Path:
    """Write ``audio/*.wav`` and ``manifest.jsonl`` under ``config.out_dir``; return the manifest."""
    rng = random.Random(config.seed)
    synth = EspeakSynth(config.sample_rate_hz)
    audio_dir = config.out_dir / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    rate = config.sample_rate_hz
    gap, lead = _samples(config.word_gap_ms, rate), _samples(config.lead_ms, rate)
    entries: list[ManifestEntry] = []

    for i in range(config.utterances):
        text, voice, speed = rng.choice(SENTENCES), rng.choice(VOICES), rng.choice(SPEEDS_WPM)
        wav, words = speak_words(synth, text, voice, speed, lead, gap)
        wav = np.concatenate([wav, np.zeros(_samples(config.tail_ms, rate), dtype=np.float32)])
        name = f"utt{i:04d}.wav"
        sf.write(audio_dir / name, wav, rate, subtype="FLOAT")
        entries.append(ManifestEntry(id=f"utt{i:04d}", audio=f"audio/{name}", sample_rate_hz=rate,
                                     text=text, words=words, speaker=f"{voice}@{speed}"))

    for i in range(config.dialogues):
        question, answer = rng.choice(DIALOGUES)
        user_voice, bot_voice = rng.sample(VOICES, 2)
        user_wav, user_words = speak_words(synth, question, user_voice, rng.choice(SPEEDS_WPM), lead, gap)
        bot_start = len(user_wav) + _samples(config.response_gap_ms, rate)
        bot_wav, bot_words = speak_words(synth, answer, bot_voice, SPEEDS_WPM[1], bot_start, gap)
        stereo = np.zeros((len(bot_wav) + lead, 2), dtype=np.float32)
        stereo[: len(user_wav), 0] = user_wav
        stereo[: len(bot_wav), 1] = bot_wav
        name = f"dlg{i:04d}.wav"
        sf.write(audio_dir / name, stereo, rate, subtype="FLOAT")
        for channel, (role, text, words, voice) in enumerate(
            (("user", question, user_words, user_voice), ("bot", answer, bot_words, bot_voice))
        ):
            entries.append(ManifestEntry(
                id=f"dlg{i:04d}.{role}", audio=f"audio/{name}", sample_rate_hz=rate, channel=channel,
                text=text, words=words, speaker=voice, role=role, dialogue=f"dlg{i:04d}",
            ))

    manifest = write_manifest(config.out_dir / "manifest.jsonl", entries)
    logger.info(f"corpus: {config.utterances} utterances, {config.dialogues} dialogues -> {manifest}")
    return manifest


def _samples(ms: float, rate_hz: int) -> int:
    return round(ms * rate_hz / 1000.0)
