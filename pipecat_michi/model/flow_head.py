"""Speaking head: a flow from noise to the next audio latent, in one step by default.

Both objectives use the straight path ``x_t = (1 - t) * noise + t * latent`` (``t=0`` noise,
``t=1`` data), whose conditional velocity is ``v = latent - noise``.

``rectified`` (checkpoints from before ``FlowHeadConfig.objective``) learns the instantaneous
velocity ``v(x_t, t | h)``. One Euler step from ``t=0`` then returns ``E[latent | h]``: the
noise has no effect and a two-mode target gives the midpoint. It needs many steps to sample.

``mean_flow`` (MeanFlow, Geng et al. 2025) learns the average velocity over ``[t, t + d]``,
``u(x_t, t, d | h)``, so ``x_{t+d} = x_t + d * u``. It is trained on the MeanFlow identity
``u = v + d * du/dt`` (the total derivative along the path, one forward-mode JVP), with
``d = 0`` (plain flow matching) on most rows. One step ``x_1 = noise + u(noise, 0, 1)`` is a
sample of the distribution, not its mean; more steps cover ``[0, 1]`` in equal intervals.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipecat_michi.model.config import FlowHeadConfig


def timestep_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding of ``t`` in [0, 1] -> ``[B, dim]``; ``scale`` is the top frequency."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = scale * t.float()[:, None] * freqs[None]
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


# Share of MeanFlow rows trained on an interval (d > 0); the rest are plain flow matching
# (d = 0), which anchors the instantaneous velocity the identity differentiates. The paper's
# best ImageNet setting draws an interval on 25% of rows.
INTERVAL_FRACTION = 0.25
# The constant c of MeanFlow's adaptive loss weight 1 / (error + c) (the paper's 1e-3).
ADAPTIVE_WEIGHT_EPS = 1e-3
# Top frequency of a MeanFlow head's time embeddings. The JVP differentiates through them, and
# at 1000 (a rectified head's, kept for its checkpoints) du/dt is so large and noisy that the
# small heads trained here collapse to one mode or stall; at 10 they train alike on every seed.
MEAN_FLOW_TIME_SCALE = 10.0


class FlowHead(nn.Module):
    """Predicts the (average) velocity that carries noise to the next audio latent."""

    def __init__(self, cfg: FlowHeadConfig, latent_dim: int, cond_dim: int) -> None:
        super().__init__()
        self.config = cfg
        self.latent_dim = latent_dim
        self.time_scale = MEAN_FLOW_TIME_SCALE if cfg.objective == "mean_flow" else 1000.0
        hidden = cfg.hidden_size
        self.input_proj = nn.Linear(latent_dim, hidden)
        self.cond_proj = nn.Linear(cond_dim, hidden)
        self.time_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        # Only a MeanFlow head sees the interval: a rectified one keeps its old state dict.
        self.interval_mlp = (
            nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            if cfg.objective == "mean_flow" else None
        )
        self.blocks = nn.ModuleList(AdaLNBlock(hidden) for _ in range(cfg.num_blocks))
        self.final_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.output_proj = nn.Linear(hidden, latent_dim)

    def velocity(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, interval: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x_t [B, D]``, ``t [B]``, ``cond [B, cond_dim]`` -> velocity ``[B, D]``.

        A MeanFlow head returns the average velocity over ``[t, t + interval]`` (``interval
        [B]``, default 0: the instantaneous velocity); a rectified head has no interval input.
        """
        c = self.cond_proj(cond) + self.time_mlp(
            timestep_embedding(t, self.config.hidden_size, self.time_scale).to(cond.dtype)
        )
        if self.interval_mlp is not None:
            interval = torch.zeros_like(t) if interval is None else interval
            embedding = timestep_embedding(interval, self.config.hidden_size, self.time_scale)
            c = c + self.interval_mlp(embedding.to(cond.dtype))
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
        """The objective's loss for ``target`` latents ``[B, D]`` given ``cond [B, cond_dim]``.

        All randomness comes from ``generator`` (a resumed run draws the same noise and times).
        """
        # Drawn where the generator lives (training keeps one CPU generator for resumable
        # randomness), then moved to the target's device.
        where = generator.device if generator is not None else target.device

        def draw(fn: Callable[..., torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
            return fn(shape, generator=generator, device=where, dtype=target.dtype).to(target.device)

        batch = target.shape[0]
        noise = draw(torch.randn, target.shape)
        t = draw(torch.rand, (batch,))
        if self.interval_mlp is None:
            x_t = (1 - t[:, None]) * noise + t[:, None] * target
            return F.mse_loss(self.velocity(x_t, t, cond), target - noise)
        # An interval between two uniform times on INTERVAL_FRACTION of rows; elsewhere none.
        other = draw(torch.rand, (batch,))
        has_interval = draw(torch.rand, (batch,)) < INTERVAL_FRACTION
        start = torch.where(has_interval, torch.minimum(t, other), t)
        interval = torch.where(has_interval, (t - other).abs(), torch.zeros_like(t))
        x_t = (1 - start[:, None]) * noise + start[:, None] * target
        v = target - noise
        # d/dt of u(x_t, t, end - t) along the path: tangents dx/dt = v, dt/dt = 1, dd/dt = -1.
        u, du_dt = torch.func.jvp(
            lambda x, time, span: self.velocity(x, time, cond, span),
            (x_t, start, interval),
            (v, torch.ones_like(start), -torch.ones_like(interval)),
        )
        u_target = v + interval[:, None] * du_dt
        # MeanFlow's adaptive weighting (p=1): each row's squared error divided by its own
        # (stop-gradient) size plus a constant, whose gradient is exactly that of log(error + c).
        # It keeps the rare rows with a large JVP term from dominating early training, which a
        # plain MSE does not survive.
        error = (u - u_target.detach()).pow(2).sum(dim=-1)
        return torch.log(error + ADAPTIVE_WEIGHT_EPS).mean()

    def sample(
        self,
        cond: torch.Tensor,
        noise: torch.Tensor,
        steps: int | torch.Tensor | None = None,
        max_steps: int | None = None,
    ) -> torch.Tensor:
        """Carry ``noise [B, D]`` (standard normal) to a latent in ``steps`` equal steps.

        A MeanFlow head jumps each interval with its average velocity (one step samples the
        distribution); a rectified head takes Euler steps (one step gives the mean).
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
        # float32 time: 1/3 in bf16 would put the last step off t=1.
        dt = (1.0 / steps.float())[:, None]
        x = noise.to(cond.dtype) * self.config.noise_scale
        for i in range(max(1, max_steps)):
            t = i * dt[:, 0]
            moved = x + (dt * self.velocity(x, t, cond, dt[:, 0])).to(x.dtype)
            x = torch.where((i < steps)[:, None], moved, x)
        return x
