"""Adversarial training of the codec's HiFi-GAN decoder (``michi-train codec --adversarial``).

HiFi-GAN's recipe, scaled down: a multi-period discriminator (each sub-discriminator folds the
waveform into ``period`` columns, so it judges periodic structure such as pitch) and a
multi-scale discriminator (1-D convolutions on the waveform at full, half and quarter rate: the
spectral envelope and longer structure), least-squares GAN losses, and feature matching (L1 between the discriminator's activations on real and
reconstructed audio), on top of the stage's STFT and mel reconstruction losses. Reconstruction
alone gives muffled, over-smoothed speech; the discriminator is what makes it crisp.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Losses = dict[str, torch.Tensor]
DEFAULT_PERIODS = (2, 3, 5, 7, 11)  # HiFi-GAN's: primes, so the sub-discriminators overlap little


class PeriodDiscriminator(nn.Module):
    """Judges a waveform folded into ``period`` columns, with 2-D convolutions along time."""

    def __init__(self, period: int, channels: int) -> None:
        super().__init__()
        self.period = period
        widths = [1, channels, 2 * channels, 4 * channels, 4 * channels]
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, kernel_size=(5, 1), stride=(3, 1) if i < len(widths) - 2 else (1, 1), padding=(2, 0))
            for i, (a, b) in enumerate(zip(widths, widths[1:]))
        )
        self.out = nn.Conv2d(widths[-1], 1, kernel_size=(3, 1), padding=(1, 0))

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``wav`` [B, T] -> (logits [B, N], feature maps)."""
        batch, length = wav.shape
        pad = -length % self.period
        x = F.pad(wav, (0, pad), mode="reflect" if pad < length else "constant")
        x = x.view(batch, 1, -1, self.period)
        features = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
            features.append(x)
        x = self.out(x)
        features.append(x)
        return x.flatten(1), features


class MultiPeriodDiscriminator(nn.Module):
    """One ``PeriodDiscriminator`` per period."""

    def __init__(self, periods: tuple[int, ...] = DEFAULT_PERIODS, channels: int = 16) -> None:
        super().__init__()
        self.discriminators = nn.ModuleList(PeriodDiscriminator(p, channels) for p in periods)

    def forward(self, wav: torch.Tensor) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        return [d(wav) for d in self.discriminators]


class ScaleDiscriminator(nn.Module):
    """HiFi-GAN's scale discriminator, narrower: strided, grouped 1-D convolutions on a waveform."""

    def __init__(self, channels: int, spectral: bool = False) -> None:
        super().__init__()
        norm = nn.utils.parametrizations.spectral_norm if spectral else nn.utils.parametrizations.weight_norm
        c = channels
        layers = [
            (1, c, 15, 1, 1), (c, 2 * c, 41, 2, 4), (2 * c, 4 * c, 41, 2, 16), (4 * c, 8 * c, 41, 4, 16),
            (8 * c, 8 * c, 41, 4, 16), (8 * c, 8 * c, 5, 1, 1),
        ]
        self.convs = nn.ModuleList(
            norm(nn.Conv1d(a, b, k, stride=st, groups=min(g, a), padding=k // 2)) for a, b, k, st, g in layers
        )
        self.out = norm(nn.Conv1d(8 * c, 1, 3, padding=1))

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``wav`` [B, T] -> (logits [B, N], feature maps)."""
        x, features = wav[:, None], []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
            features.append(x)
        x = self.out(x)
        features.append(x)
        return x.flatten(1), features


class MultiScaleDiscriminator(nn.Module):
    """``scales`` scale discriminators on the waveform average-pooled 1x, 2x, 4x ...; the first,
    on raw audio, spectrally normalised as in HiFi-GAN."""

    def __init__(self, scales: int = 3, channels: int = 16) -> None:
        super().__init__()
        self.discriminators = nn.ModuleList(ScaleDiscriminator(channels, spectral=i == 0) for i in range(scales))

    def forward(self, wav: torch.Tensor) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        outputs = []
        for i, discriminator in enumerate(self.discriminators):
            if i:
                wav = F.avg_pool1d(wav[:, None], 4, 2, padding=2)[:, 0]
            outputs.append(discriminator(wav))
        return outputs


class HifiGanDiscriminator(nn.Module):
    """The multi-period and multi-scale discriminators side by side (``scales=0``: MPD only)."""

    def __init__(self, periods: tuple[int, ...] = DEFAULT_PERIODS, channels: int = 16, scales: int = 3) -> None:
        super().__init__()
        self.periods = MultiPeriodDiscriminator(periods, channels)
        self.scales = MultiScaleDiscriminator(scales, channels) if scales else None

    def forward(self, wav: torch.Tensor) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        return self.periods(wav) + (self.scales(wav) if self.scales is not None else [])


class Adversary:
    """The discriminator, its optimiser, and the losses the codec stage adds.

    Each step first trains the discriminator on the batch (real vs. the detached
    reconstruction), then scores the reconstruction for the codec: HiFi-GAN's order. Before
    ``start_step`` only the discriminator learns, so the codec first learns to reconstruct at
    all and is not pushed around by a discriminator that knows nothing yet; and only for the
    last ``warmup_steps`` of those (None: all of them), since a discriminator step costs more
    than a spectral codec's step and one that far behind the codec learns nothing useful.
    """

    def __init__(
        self,
        lr: float,
        start_step: int = 0,
        weight: float = 1.0,
        feature_weight: float = 2.0,
        channels: int = 16,
        periods: tuple[int, ...] = DEFAULT_PERIODS,
        scales: int = 3,
        warmup_steps: int | None = None,
    ) -> None:
        self.warmup_steps = warmup_steps
        self.discriminator = HifiGanDiscriminator(periods, channels, scales)
        # HiFi-GAN's betas: a short momentum memory suits the moving target of a GAN.
        self.optimizer = torch.optim.AdamW(self.discriminator.parameters(), lr=lr, betas=(0.8, 0.99))
        self.start_step = start_step
        self.weight = weight
        self.feature_weight = feature_weight

    def to(self, device: torch.device) -> Adversary:
        self.discriminator.to(device)
        return self

    def train_discriminator(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """One optimiser step of the discriminator; returns its least-squares loss."""
        self.discriminator.train()
        real_out = self.discriminator(real)
        fake_out = self.discriminator(fake.detach())
        loss = sum(
            (r - 1.0).square().mean() + f.square().mean() for (r, _), (f, _) in zip(real_out, fake_out)
        ) / len(real_out)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def codec_losses(self, real: torch.Tensor, fake: torch.Tensor, step: int) -> Losses:
        """The discriminator's step on this batch, then the codec's adversarial and
        feature-matching terms (weighted into ``adversarial``; zero before ``start_step``).
        Nothing at all before the discriminator's warm-up."""
        if self.warmup_steps is not None and step < self.start_step - self.warmup_steps:
            return {}
        losses = {"disc": self.train_discriminator(real, fake)}
        if step < self.start_step:
            return losses
        self.discriminator.requires_grad_(False)  # the codec's gradient must not train it
        try:
            fake_out = self.discriminator(fake)
            with torch.no_grad():
                real_out = self.discriminator(real)
        finally:
            self.discriminator.requires_grad_(True)
        adv = sum((f - 1.0).square().mean() for f, _ in fake_out) / len(fake_out)
        feature = sum(
            F.l1_loss(f, r) for (_, fs), (_, rs) in zip(fake_out, real_out) for f, r in zip(fs, rs)
        ) / len(fake_out)
        losses["gen_adv"] = adv
        losses["feature_match"] = feature
        losses["adversarial"] = self.weight * adv + self.feature_weight * feature
        return losses

    def state_dict(self) -> dict[str, Any]:
        return {"discriminator": self.discriminator.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.discriminator.load_state_dict(state["discriminator"])
        self.optimizer.load_state_dict(state["optimizer"])
