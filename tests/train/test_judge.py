import shutil

import numpy as np
import pytest
import torch

from pipecat_michi.train.features import mel_cepstra, mel_cepstral_distance, white_noise_mcd
from pipecat_michi.train.judge import (
    POCKETSPHINX_DATA,
    fluent_speech,
    human_clips,
    mu_law_round_trip,
    normalise_text,
    twilio_path,
    wer,
)


def test_normalise_text_makes_whisper_style_and_reference_style_agree():
    assert normalise_text("Mr. Dashwood had 10 of clubs, 21 cards!") == "mister dashwood had ten of clubs twenty one cards"
    assert normalise_text("It's 1,250 percent") == "its one thousand two hundred fifty percent"
    assert wer(["4. Queen of clubs"], ["four queen of clubs"]) == 0.0
    assert wer(["ten of spades"], ["ten of clubs"]) == pytest.approx(1 / 3)


def test_mu_law_round_trip_is_telephone_grade():
    t = np.arange(8000) / 8000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    error = mu_law_round_trip(tone) - tone
    snr_db = 10 * np.log10(np.mean(tone ** 2) / np.mean(error ** 2))
    assert 30 < snr_db < 45  # 8-bit companding: ~38 dB on a loud tone
    wide = (0.3 * np.sin(2 * np.pi * 6000 * np.arange(24000) / 24000)).astype(np.float32)
    assert np.abs(twilio_path(wide, 24000)[2000:-2000]).max() < 0.05  # 6 kHz is gone at 8 kHz


def mel_cepstra_of_log_mel(log_mel_frame: torch.Tensor) -> torch.Tensor:
    from unittest import mock

    with mock.patch("pipecat_michi.train.features.log_mel", return_value=log_mel_frame[None]):
        return mel_cepstra(torch.zeros(1), 24000)[0]


def test_mcd_uses_the_standard_scale():
    g = torch.Generator().manual_seed(0)
    wav = torch.randn(1, 24000, generator=g) * 0.1
    assert mel_cepstral_distance(wav, wav, 24000) == 0.0
    # A gain change only moves c0, which MCD excludes.
    assert mel_cepstral_distance(wav * 0.5, wav, 24000) < 1e-3
    # The convention: log|M_n| = c_0 + 2 sum_k c_k cos(pi k (n + 1/2) / N), so a log-mel that is
    # one cosine of index 3 and amplitude a gives c_3 = a / 2 and nothing else.
    from pipecat_michi.train import features

    n = features.MEL_BANDS
    shape = 0.8 * torch.cos(torch.pi * 3 * (torch.arange(n) + 0.5) / n)
    cepstra = mel_cepstra_of_log_mel(shape)
    assert torch.allclose(cepstra, torch.eye(13)[3] * 0.4, atol=1e-5)
    # Noise fills the valleys of a harmonic spectrum (white noise on white noise would not count).
    t = torch.arange(24000) / 24000
    voiced = sum(torch.sin(2 * torch.pi * 150 * h * t) / h for h in range(1, 20))[None] * 0.1
    assert 1.0 < white_noise_mcd(voiced, 24000) < 20.0


@pytest.mark.skipif(not (POCKETSPHINX_DATA / "cards").is_dir(), reason="apt-get install pocketsphinx-testdata")
def test_human_clips_come_with_their_transcripts():
    clips = human_clips()
    assert len(clips) == 10
    cards = {c.name: c.text for c in clips}
    assert cards["cards/001"] == "ten of clubs"
    assert all(c.sample_rate_hz == 16000 and c.audio.dtype == np.float32 for c in clips)


@pytest.mark.skipif(shutil.which("flite") is None, reason="apt-get install flite")
def test_fluent_speech_from_flite():
    audio, rate = fluent_speech("Hello there.", "kal16")
    assert rate == 16000 and 0.3 < audio.size / rate < 3.0
