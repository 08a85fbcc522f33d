"""Listening-stage augmentation on batches of model-rate audio (torch, on the batch's device).

Callers come through phones: Twilio carries 8 kHz G.711 mu-law, so half the batches (by
default) go through 8 kHz mu-law and back; noise at a random SNR covers rooms and lines.
"""

from __future__ import annotations

import torch

from pipecat_michi.model.whisper.frontend import PolyphaseResampler

TELEPHONE_RATE_HZ = 8000
MU = 255.0


def mu_law_round_trip(wav: torch.Tensor) -> torch.Tensor:
    """G.711 mu-law: compand, quantise to 8 bits, expand (float32)."""
    x = wav.to(torch.float32).clamp(-1.0, 1.0)
    encoded = torch.sign(x) * torch.log1p(MU * x.abs()) / torch.log1p(torch.tensor(MU))
    quantised = torch.round((encoded + 1.0) * 127.5) / 127.5 - 1.0
    return torch.sign(quantised) * torch.expm1(quantised.abs() * torch.log1p(torch.tensor(MU))) / MU


class Augmenter:
    """``wav [B, T]`` at ``sample_rate_hz`` -> augmented copy; randomness from the given generator."""

    def __init__(self, sample_rate_hz: int, telephone_prob: float = 0.5, noise_prob: float = 0.5,
                 snr_db: tuple[float, float] = (10.0, 30.0)) -> None:
        self.down = PolyphaseResampler(sample_rate_hz, TELEPHONE_RATE_HZ)
        self.up = PolyphaseResampler(TELEPHONE_RATE_HZ, sample_rate_hz)
        self.telephone_prob, self.noise_prob, self.snr_db = telephone_prob, noise_prob, snr_db

    def telephone(self, wav: torch.Tensor) -> torch.Tensor:
        device = wav.device
        narrow, _ = self.down.to(device)(wav, self.down.init_history(wav.shape[0], device))
        wide, _ = self.up.to(device)(mu_law_round_trip(narrow), self.up.init_history(wav.shape[0], device))
        return wide

    def __call__(self, wav: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch = wav.shape[0]
        out = wav.to(torch.float32)
        phone = (torch.rand(batch, generator=generator) < self.telephone_prob).to(wav.device)
        if phone.any():
            out = torch.where(phone[:, None], self.telephone(out), out)
        noisy = (torch.rand(batch, generator=generator) < self.noise_prob).to(wav.device)
        snr_db = torch.empty(batch).uniform_(*self.snr_db, generator=generator).to(wav.device)
        noise = torch.randn(out.shape, generator=generator).to(wav.device)
        power = out.square().mean(dim=-1, keepdim=True).clamp(min=1e-8)
        scale = torch.sqrt(power / 10.0 ** (snr_db[:, None] / 10.0))
        out = torch.where(noisy[:, None], out + scale * noise, out)
        return out.to(wav.dtype)
