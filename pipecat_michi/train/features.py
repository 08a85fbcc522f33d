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


def mel_cepstra(wav: torch.Tensor, sample_rate_hz: int) -> torch.Tensor:
    """Mel cepstra ``c_0..c_12`` per frame: ``c_k = (1/N) sum_n log|M_n| cos(pi k (n + 1/2) / N)``.

    That is the DCT-II without normalisation (scipy's ``dct(x, type=2, norm=None)``) divided by
    ``2N``: the real-cepstrum convention ``log|M| ~ c_0 + 2 sum_k c_k cos(...)`` that the usual
    MCD formula assumes. (An orthonormal DCT scales c_k by sqrt(2N), ~12.6x for 80 bands.)
    """
    n = MEL_BANDS
    k = torch.arange(CEPSTRAL_COEFFS, dtype=torch.float32)[:, None]
    dct = torch.cos(math.pi / n * (torch.arange(n, dtype=torch.float32)[None, :] + 0.5) * k) / n
    return log_mel(wav, sample_rate_hz) @ dct.T.to(wav.device)


def mel_cepstral_distance(pred: torch.Tensor, target: torch.Tensor, sample_rate_hz: int) -> float:
    """Mean mel-cepstral distance in dB over frames, the standard definition:
    ``10 sqrt(2) / ln(10) * sqrt(sum_{k=1..12} (c_k - c'_k)^2)`` (c_0, the energy, excluded),
    on :func:`mel_cepstra`."""
    diff = (mel_cepstra(pred, sample_rate_hz) - mel_cepstra(target, sample_rate_hz))[..., 1:]
    return float((10.0 * math.sqrt(2.0) / math.log(10.0) * torch.sqrt(diff.square().sum(-1))).mean())


def white_noise_mcd(target: torch.Tensor, sample_rate_hz: int, snr_db: float = 20.0, seed: int = 0) -> float:
    """MCD of ``target`` plus white noise at ``snr_db``: a calibration point printed beside MCD."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(target.shape, generator=generator, dtype=torch.float32).to(target.device)
    signal_power = target.float().square().mean()
    noise = noise * torch.sqrt(signal_power / (10.0 ** (snr_db / 10.0)) / noise.square().mean())
    return mel_cepstral_distance(target.float() + noise, target, sample_rate_hz)
