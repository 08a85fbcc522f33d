"""Spectral features shared by the codec loss and the quality benchmark."""

from __future__ import annotations

import math

import torch

from pipecat_michi.model.listening_head import mel_filterbank

MEL_FFT = 1024
MEL_HOP = 240
MEL_BANDS = 80
CEPSTRAL_COEFFS = 13


def log_mel(wav: torch.Tensor, sample_rate_hz: int) -> torch.Tensor:
    """``wav [..., T]`` -> natural-log mel spectrogram ``[..., frames, MEL_BANDS]``."""
    flat = wav.reshape(-1, wav.shape[-1]).float()
    window = torch.hann_window(MEL_FFT, device=wav.device)
    spec = torch.stft(flat, MEL_FFT, MEL_HOP, window=window, center=True, return_complex=True)
    filters = mel_filterbank(MEL_FFT, MEL_BANDS, sample_rate_hz).to(wav.device)
    mel = spec.abs().transpose(1, 2) @ filters
    return torch.log(mel.clamp(min=1e-5)).reshape(*wav.shape[:-1], -1, MEL_BANDS)


def mel_cepstral_distance(pred: torch.Tensor, target: torch.Tensor, sample_rate_hz: int) -> float:
    """Mean mel-cepstral distance in dB over frames (coefficients 1..12, c0 = energy excluded),
    from a DCT-II of the log-mel spectrum (the usual MCD on mel cepstra)."""
    n = MEL_BANDS
    k = torch.arange(CEPSTRAL_COEFFS)[:, None]
    dct = torch.cos(math.pi / n * (torch.arange(n)[None, :] + 0.5) * k) * math.sqrt(2.0 / n)
    cep_pred = log_mel(pred, sample_rate_hz) @ dct.T
    cep_target = log_mel(target, sample_rate_hz) @ dct.T
    diff = (cep_pred - cep_target)[..., 1:]
    return float((10.0 / math.log(10.0) * torch.sqrt(2.0 * diff.square().sum(-1))).mean())
