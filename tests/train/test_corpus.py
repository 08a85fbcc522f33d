"""The espeak-ng corpus has exact word timings; text lands on the frames where it is spoken."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipecat_michi.model.tokenizer import ByteTokenizer
from pipecat_michi.train.corpus import CorpusConfig, generate_corpus
from pipecat_michi.train.data import frame_tokens
from pipecat_michi.train.manifest import read_manifest

FRAME = 1920


@pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("sox") is None,
                    reason="needs espeak-ng and sox")
def test_espeak_corpus_has_exact_word_timings(tmp_path: Path) -> None:
    manifest = generate_corpus(CorpusConfig(out_dir=tmp_path, utterances=2, dialogues=1))
    entries = read_manifest(manifest)
    assert [e.role for e in entries] == [None, None, "user", "bot"]
    assert entries[2].dialogue == entries[3].dialogue and entries[2].audio == entries[3].audio
    for entry in entries:
        wav = sf.read(entry.audio, dtype="float32", always_2d=True)[0][:, entry.channel]
        assert [w.word for w in entry.words] == entry.text.split()
        for word in entry.words:
            # Words are trimmed to their first and last loud sample and set in exact silence.
            span = np.abs(wav[word.start_sample: word.end_sample])
            assert span[0] > 0 and span[-1] > 0, word
            assert wav[word.start_sample - 1] == 0 and wav[word.end_sample] == 0, word
        assert entry.words[-1].end_sample < len(wav)
    user, bot = entries[2], entries[3]
    assert bot.words[0].start_sample > user.words[-1].end_sample  # the bot answers after the user


def test_frame_tokens_follow_the_words(tone_manifest: Path) -> None:
    entry = read_manifest(tone_manifest)[0]
    tokenizer = ByteTokenizer()
    tokens = frame_tokens(entry.words, tokenizer, 16, FRAME).tolist()
    assert tokenizer.decode([t for t in tokens if t != tokenizer.tokens.pad_id]) == entry.text
    for word in entry.words:
        first = tokens.index(ord(word.word[0]), word.start_sample // FRAME)
        assert first < -(-word.end_sample // FRAME)  # the word's first letter lies inside the word
    led = frame_tokens(entry.words, tokenizer, 16, FRAME, lead_frames=2).tolist()
    # The monologue keeps its tokens and order but says each no later (a lead before the clip
    # starts is clamped to its first frame).
    pad = tokenizer.tokens.pad_id
    assert [t for t in led if t != pad] == [t for t in tokens if t != pad]
    led_at = [i for i, t in enumerate(led) if t != pad]
    spoken_at = [i for i, t in enumerate(tokens) if t != pad]
    assert all(a <= b for a, b in zip(led_at, spoken_at)) and led_at[0] == 0 and led_at != spoken_at
