"""A tiny synthetic corpus that needs no espeak-ng: each "word" is a tone burst of its own
pitch, so transcripts are learnable and word timings exact by construction."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipecat_michi.train.manifest import ManifestEntry, WordTiming, write_manifest

RATE = 24000
FRAME = 1920
PITCH_HZ = {"do": 220.0, "re": 330.0, "mi": 440.0, "fa": 550.0}


def _speak(words: list[str], start: int, length: int) -> tuple[np.ndarray, list[WordTiming]]:
    wav = np.zeros(length, dtype=np.float32)
    timings, cursor = [], start
    for word in words:
        n = 2 * FRAME
        t = np.arange(n) / RATE
        wav[cursor: cursor + n] = 0.5 * np.sin(2 * np.pi * PITCH_HZ[word] * t) * np.hanning(n)
        timings.append(WordTiming(word=word, start_sample=cursor, end_sample=cursor + n))
        cursor += n + FRAME // 2
    return wav, timings


@pytest.fixture(scope="session")
def tone_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tones")
    length = 16 * FRAME
    entries = []
    for i, words in enumerate((["do", "re"], ["mi", "fa"], ["re", "mi"])):
        wav, timings = _speak(words, FRAME, length)
        sf.write(root / f"u{i}.wav", wav, RATE, subtype="FLOAT")
        entries.append(ManifestEntry(id=f"u{i}", audio=f"u{i}.wav", sample_rate_hz=RATE,
                                     text=" ".join(words), words=timings))
    for i, (question, answer) in enumerate(((["do"], ["fa", "mi"]), (["mi"], ["re", "do"]))):
        user, user_words = _speak(question, FRAME, length)
        bot, bot_words = _speak(answer, user_words[-1].end_sample + FRAME, length)
        sf.write(root / f"d{i}.wav", np.stack([user, bot], axis=1), RATE, subtype="FLOAT")
        for channel, (role, words, timings) in enumerate((("user", question, user_words), ("bot", answer, bot_words))):
            entries.append(ManifestEntry(id=f"d{i}.{role}", audio=f"d{i}.wav", sample_rate_hz=RATE, channel=channel,
                                         text=" ".join(words), words=timings, role=role, dialogue=f"d{i}"))
    return write_manifest(root / "manifest.jsonl", entries)
