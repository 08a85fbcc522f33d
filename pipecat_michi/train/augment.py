"""Listening-stage augmentation on batches of model-rate audio (torch, on the batch's device).

Callers come through phones: Twilio carries 8 kHz G.711 mu-law, so half the batches (by
default) go through 8 kHz mu-law and back; noise at a random SNR covers rooms and lines.
Optionally (``room_prob``, ``colour_prob``; off by default, the shipped head's recipe) a room
and a microphone: reverberation from a synthetic impulse response (exponentially decaying
noise, RT60 0.15-0.7 s, the direct path kept) and a random spectral colour (a tilt of +-4 dB an
octave around 1 kHz and random low/high cut-offs): synthetic voices are dry, flat recordings;
people call from rooms, on headsets and handsets.
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
                 snr_db: tuple[float, float] = (10.0, 30.0), room_prob: float = 0.0, colour_prob: float = 0.0,
                 rt60_s: tuple[float, float] = (0.15, 0.7)) -> None:
        self.sample_rate_hz = sample_rate_hz
        self.down = PolyphaseResampler(sample_rate_hz, TELEPHONE_RATE_HZ)
        self.up = PolyphaseResampler(TELEPHONE_RATE_HZ, sample_rate_hz)
        self.telephone_prob, self.noise_prob, self.snr_db = telephone_prob, noise_prob, snr_db
        self.room_prob, self.colour_prob, self.rt60_s = room_prob, colour_prob, rt60_s

    def room(self, wav: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Each row convolved with its own synthetic room impulse response (same power out)."""
        batch, length = wav.shape
        taps = round(self.rt60_s[1] * self.sample_rate_hz)
        t = torch.arange(taps) / self.sample_rate_hz
        rt60 = torch.empty(batch).uniform_(*self.rt60_s, generator=generator)
        # -60 dB at RT60: amplitude exp(-6.91 t / RT60); the direct path is the first tap.
        response = torch.randn(batch, taps, generator=generator) * torch.exp(-6.91 * t[None] / rt60[:, None])
        response[:, 0] = 0.0
        response = response / response.square().sum(dim=-1, keepdim=True).sqrt() * 0.5
        response[:, 0] = 1.0
        size = length + taps
        wet = torch.fft.irfft(torch.fft.rfft(wav.cpu(), size) * torch.fft.rfft(response, size), size)[:, :length]
        gain = (wav.cpu().square().mean(-1, keepdim=True) / wet.square().mean(-1, keepdim=True).clamp(min=1e-10)).sqrt()
        return (wet * gain).to(wav.device)

    def colour(self, wav: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Each row through its own random spectral tilt and band limits (same power out)."""
        batch, length = wav.shape
        freqs = torch.fft.rfftfreq(length, 1.0 / self.sample_rate_hz)
        tilt_db = torch.empty(batch).uniform_(-4.0, 4.0, generator=generator)
        low_hz = torch.empty(batch).uniform_(50.0, 300.0, generator=generator)
        high_hz = torch.empty(batch).uniform_(3400.0, self.sample_rate_hz / 2, generator=generator)
        octaves = torch.log2(freqs.clamp(min=20.0) / 1000.0)[None]
        gain = 10.0 ** (tilt_db[:, None] * octaves / 20.0)
        # Second-order-like roll-offs outside the band.
        gain = gain / (1.0 + (low_hz[:, None] / freqs.clamp(min=1.0)[None]) ** 4).sqrt()
        gain = gain / (1.0 + (freqs[None] / high_hz[:, None]) ** 8).sqrt()
        out = torch.fft.irfft(torch.fft.rfft(wav.cpu()) * gain, length)
        power = (wav.cpu().square().mean(-1, keepdim=True) / out.square().mean(-1, keepdim=True).clamp(min=1e-10)).sqrt()
        return (out * power).to(wav.device)

    def telephone(self, wav: torch.Tensor) -> torch.Tensor:
        device = wav.device
        narrow, _ = self.down.to(device)(wav, self.down.init_history(wav.shape[0], device))
        wide, _ = self.up.to(device)(mu_law_round_trip(narrow), self.up.init_history(wav.shape[0], device))
        return wide

    def __call__(self, wav: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch = wav.shape[0]
        out = wav.to(torch.float32)
        # Room and microphone first (they happen before the phone line). Nothing is drawn when
        # they are off: the default recipe's random sequence, and its resumed runs, are unchanged.
        if self.room_prob > 0:
            roomy = (torch.rand(batch, generator=generator) < self.room_prob).to(wav.device)
            out = torch.where(roomy[:, None], self.room(out, generator), out)
        if self.colour_prob > 0:
            coloured = (torch.rand(batch, generator=generator) < self.colour_prob).to(wav.device)
            out = torch.where(coloured[:, None], self.colour(out, generator), out)
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
