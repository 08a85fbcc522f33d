"""The inner monologue as the speaking head's direct context: its last tokens and their ages.

Why. The flow head predicts the next audio latent from the backbone's state alone, so what a
frame sounds like (which word, how far into it) must pass through the whole backbone, and LoRA
adapters on a frozen 135M backbone learn that slowly: after 2,500 steps the state carried ~90% of
the loudness band but 20-49% of the finer ones, and one-step speech was not understood (83% WER
teacher-forced). A word's sound is mostly a function of the word and of the frames since its
text came (a lookup table of exactly that explains R^2 0.66 of the log-mel of held-out frames,
``benchmarks/word_timing_error.py --probe``). So the head also sees that directly: the last
``K`` monologue tokens the model has said and how many frames ago each came, embedded and added
to its condition, as Moshi's depth transformer sees the step's text token. Causal and cheap: the
tokens are the model's own inputs (``prev_text``), carried in the streaming state.

``benchmarks/speak_context_probe.py`` measures what this context alone (no backbone) makes
intelligible.
"""

from __future__ import annotations

import torch
from torch import nn


# The history is ``[B, K]`` token ids, newest first, and ``[B, K]`` ages in frames.


def empty_history(batch: int, tokens: int, max_age: int, pad_id: int,
                  device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """No token said yet: PAD in every place, each at the oldest age."""
    return (torch.full((batch, tokens), pad_id, dtype=torch.long, device=device),
            torch.full((batch, tokens), max_age, dtype=torch.long, device=device))


def advance_history(history: torch.Tensor, ages: torch.Tensor, token: torch.Tensor, pad_id: int,
                    max_age: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One frame later, after ``token [B]`` went into the monologue (PAD: nothing was said).

    Every age grows by one frame (capped at ``max_age``); a said token enters at age 0 in front
    and the oldest leaves. Branch-free, so it compiles and batches rows that did and did not speak.
    """
    said = (token != pad_id)[:, None]
    older = (ages + 1).clamp(max=max_age)
    shifted_tokens = torch.cat([token[:, None], history[:, :-1]], dim=1)
    shifted_ages = torch.cat([torch.zeros_like(ages[:, :1]), older[:, :-1]], dim=1)
    return torch.where(said, shifted_tokens, history), torch.where(said, shifted_ages, older)


def history_over_frames(inputs: torch.Tensor, tokens: int, max_age: int,
                        pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The history each frame's step holds, for a whole sequence of monologue inputs ``[B, F]``
    (frame ``t``'s input is the token said at ``t - 1``): ``([B, F, K], [B, F, K])``.

    Built by :func:`advance_history` frame by frame, so training sees exactly what the step holds.
    """
    history, ages = empty_history(inputs.shape[0], tokens, max_age, pad_id, inputs.device)
    out_tokens, out_ages = [], []
    for t in range(inputs.shape[1]):
        history, ages = advance_history(history, ages, inputs[:, t], pad_id, max_age)
        out_tokens.append(history)
        out_ages.append(ages)
    return torch.stack(out_tokens, dim=1), torch.stack(out_ages, dim=1)


class MonologueContext(nn.Module):
    """``K`` tokens (through the backbone's own, frozen, token embedding) and their ages ->
    a vector added to the flow head's condition. Its last layer starts at zero, so a model that
    gains it speaks exactly as before until training moves it."""

    def __init__(self, tokens: int, max_age: int, embed_dim: int, out_dim: int, width: int = 128,
                 hidden: int = 512) -> None:
        super().__init__()
        self.tokens, self.max_age = tokens, max_age
        self.token_proj = nn.Linear(embed_dim, width)
        self.age = nn.Embedding(max_age + 1, width)
        self.place = nn.Parameter(torch.zeros(tokens, width))
        self.mix = nn.Sequential(nn.Linear(tokens * width, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))
        nn.init.zeros_(self.mix[-1].weight)
        nn.init.zeros_(self.mix[-1].bias)

    def forward(self, token_embeddings: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
        """``token_embeddings [..., K, E]`` (the backbone's embeddings of the history's tokens),
        ``ages [..., K]`` -> ``[..., out_dim]``."""
        x = self.token_proj(token_embeddings) + self.age(ages).to(token_embeddings.dtype) + self.place
        return self.mix(x.flatten(-2))
