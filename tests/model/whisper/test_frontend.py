import math

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor

from pipecat_michi.model.whisper.frontend import (
    PolyphaseResampler,
    StreamingWhisperFrontEnd,
    log_mel_spectrogram,
    running_max_floor,
    slaney_mel_filters,
)


def _speechlike(seconds: float, rate: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * rate), dtype=torch.float32) / rate
    tone = 0.3 * torch.sin(2 * math.pi * 220 * t) * (1 + torch.sin(2 * math.pi * 3 * t))
    audio = tone + 0.05 * torch.randn(t.shape, generator=g)
    audio[: rate // 2] *= 1e-4  # a quiet lead-in, where the streaming floor differs
    return audio[None]


def test_mel_filters_match_whisper_reference():
    ref = WhisperFeatureExtractor(feature_size=80).mel_filters  # librosa slaney, as mel_filters.npz
    ours = slaney_mel_filters(400, 80, 16000).numpy()
    assert np.abs(ref - ours).max() < 1e-7
    # Band 10 peaks at 400 Hz on Whisper's scale (the old HTK filters put it at 280 Hz).
    assert ours[:, 10].argmax() * 40 == 400


def test_offline_features_match_whisper_feature_extractor():
    audio = _speechlike(3.0, 16000)
    ref = WhisperFeatureExtractor(feature_size=80)(
        audio[0].numpy(), sampling_rate=16000, return_tensors="np", padding="longest"
    ).input_features[0].T
    ours = log_mel_spectrogram(audio)[0].numpy()
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-5


def test_resampler_streams_exactly_and_passes_speech_band():
    resampler = PolyphaseResampler(24000, 16000)
    t = torch.arange(24000, dtype=torch.float32) / 24000
    audio = torch.sin(2 * math.pi * 1000 * t)[None]
    whole, _ = resampler(audio, resampler.init_history(1, torch.device("cpu")))
    history, parts = resampler.init_history(1, torch.device("cpu")), []
    for chunk in audio.split(1920, dim=1):
        out, history = resampler(chunk, history)
        parts.append(out)
    assert whole.shape == (1, 16000)
    assert torch.allclose(torch.cat(parts, dim=1), whole, atol=1e-6)
    expected = torch.sin(2 * math.pi * 1000 * (torch.arange(16000) / 16000 - resampler.delay_ms / 1000))
    assert (whole[0, 400:] - expected[400:]).abs().max() < 2e-2
    # 10 kHz (above the new Nyquist) is stopped.
    alias, _ = resampler(torch.sin(2 * math.pi * 10000 * t)[None], resampler.init_history(1, torch.device("cpu")))
    assert alias[0, 400:].abs().max() < 1e-2


def test_streaming_front_end_equals_offline_with_running_max():
    front = StreamingWhisperFrontEnd(80, 16000)
    audio = _speechlike(2.0, 16000, seed=1)
    state = front.init_state(1, torch.device("cpu"))
    parts = []
    for chunk in audio.split(1280, dim=1):
        features, state = front(chunk, state)
        parts.append(features)
    streamed = torch.cat(parts, dim=1)
    # Offline: Whisper's math on the left-zero-padded signal, uncentred windows, cumulative max.
    padded = torch.nn.functional.pad(audio, (240, 0))
    spec = torch.stft(padded, 400, 160, window=torch.hann_window(400), center=False, return_complex=True)
    log_spec = torch.log10(((spec.abs() ** 2).transpose(1, 2) @ slaney_mel_filters(400, 80, 16000)).clamp(min=1e-10))
    offline, _ = running_max_floor(log_spec, torch.full((1,), -10.0))
    assert torch.allclose(streamed, offline, atol=1e-5)
    # After the loud part starts, the running floor is Whisper's global floor (this clip's
    # level is steady), so only the lead-in may differ from offline Whisper.
    whisper = log_mel_spectrogram(torch.nn.functional.pad(audio, (40, 0))[:, :-40])
    # (the last frames differ too: offline Whisper reflect-pads the clip end)
    assert torch.allclose(streamed[:, 60:-2], whisper[:, 60:-2], atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_front_end_accepts_low_precision_audio(dtype):
    front = StreamingWhisperFrontEnd(80, 24000)
    features, state = front(_speechlike(0.08, 24000).to(dtype), front.init_state(1, torch.device("cpu")))
    assert features.dtype == torch.float32 and features.shape == (1, 8, 80)
    assert all(v.dtype == torch.float32 for v in state.values())
