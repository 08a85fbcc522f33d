"""Speaking head: rectified flow from noise to the next audio latent, in one step by default.

Rectified flow learns a velocity ``v(x_t, t | h)`` along the straight path
``x_t = (1 - t) * noise + t * latent``; the target velocity is ``latent - noise``. Sampling
integrates from ``t=0`` to ``t=1`` with Euler steps; a well-trained straight flow needs one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipecat_michi.model.config import FlowHeadConfig


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of ``t`` in [0, 1] -> ``[B, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class AdaLNBlock(nn.Module):
    """Residual MLP block whose norm is shifted/scaled/gated by the conditioning (DiT-style)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.SiLU(), nn.Linear(4 * hidden, hidden))
        # Not zero-initialised as in DiT: an untrained head must still depend on its
        # conditioning, or random-weight models (tests, demos) would ignore the backbone.
        self.modulation = nn.Linear(hidden, 3 * hidden)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(F.silu(cond)).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class FlowHead(nn.Module):
    """Predicts the velocity field that carries noise to the next audio latent."""

    def __init__(self, cfg: FlowHeadConfig, latent_dim: int, cond_dim: int) -> None:
        super().__init__()
        self.config = cfg
        self.latent_dim = latent_dim
        hidden = cfg.hidden_size
        self.input_proj = nn.Linear(latent_dim, hidden)
        self.cond_proj = nn.Linear(cond_dim, hidden)
        self.time_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(AdaLNBlock(hidden) for _ in range(cfg.num_blocks))
        self.final_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.output_proj = nn.Linear(hidden, latent_dim)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``x_t [B, D]``, ``t [B]``, ``cond [B, cond_dim]`` -> velocity ``[B, D]``."""
        c = self.cond_proj(cond) + self.time_mlp(
            timestep_embedding(t, self.config.hidden_size).to(cond.dtype)
        )
        x = self.input_proj(x_t)
        for block in self.blocks:
            x = block(x, c)
        return self.output_proj(self.final_norm(x))

    def loss(
        self,
        cond: torch.Tensor,
        target: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Flow-matching loss for ``target`` latents ``[B, D]`` given ``cond [B, cond_dim]``."""
        # Drawn where the generator lives (training keeps one CPU generator for resumable
        # randomness), then moved to the target's device.
        where = generator.device if generator is not None else target.device
        noise = torch.randn(target.shape, generator=generator, device=where, dtype=target.dtype).to(target.device)
        t = torch.rand(target.shape[0], generator=generator, device=where, dtype=target.dtype).to(target.device)
        x_t = (1 - t[:, None]) * noise + t[:, None] * target
        return F.mse_loss(self.velocity(x_t, t, cond), target - noise)

    def sample(
        self,
        cond: torch.Tensor,
        noise: torch.Tensor,
        steps: int | torch.Tensor | None = None,
        max_steps: int | None = None,
    ) -> torch.Tensor:
        """Integrate ``noise [B, D]`` (standard normal) to a latent with Euler steps.

        ``steps`` is one count for all rows or a ``[B]`` tensor, so calls with different
        settings share a batch without changing each other's result; ``max_steps``, its
        largest value if the caller knows it, saves reading it back from the device. The noise
        is an input so the caller controls each row's randomness.
        """
        batch = cond.shape[0]
        steps = self.config.sampling_steps if steps is None else steps
        if max_steps is None:
            max_steps = steps if isinstance(steps, int) else int(steps.max())
        steps = torch.as_tensor(steps, device=cond.device).expand(batch).clamp(min=1)
        # float32 time: 1/3 in bf16 would put the last Euler step off t=1.
        dt = (1.0 / steps.float())[:, None]
        x = noise.to(cond.dtype) * self.config.noise_scale
        for i in range(max(1, max_steps)):
            t = i * dt[:, 0]
            moved = x + (dt * self.velocity(x, t, cond)).to(x.dtype)
            x = torch.where((i < steps)[:, None], moved, x)
        return x
