"""How far a cheaper way of running the model (bf16, fp16, int8 weights) strays from float32.

One seeded call is run twice with greedy text and the same flow noise, so numbers are the only
difference. The candidate runs either free-running (it feeds back its own text and latents) or
teacher-forced (it is fed the reference's, ``run_call(..., forced=reference)``). The serving bar
("text top-1 agreement") is the teacher-forced one: free-running, a single flipped near-tie at
frame k changes every later input, so the share of equal tokens measures when the two calls
diverged rather than how often the cheaper model picks the same token. Tests, the quality
benchmark and the choice of the embedded engine's default all use these measures.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipecat_michi.model.michi import MichiModel, Sampling, StepNoise


@dataclass(frozen=True)
class CallTrace:
    """What one call produced, frame by frame (on the CPU, float32)."""

    text_tokens: torch.Tensor  # [frames]
    latents: torch.Tensor  # [frames, latent_dim]
    audio: torch.Tensor  # [frames * frame_samples]


@dataclass(frozen=True)
class Agreement:
    """A candidate run against the float32 reference."""

    text_agreement: float  # share of frames with the same text token
    latent_cosine: float  # mean cosine similarity of the frames' latents
    audio_snr_db: float  # reference audio power over the difference's, in dB

    def passes(self, min_text_agreement: float = 0.95, min_latent_cosine: float = 0.99) -> bool:
        """The serving quality bar: text top-1 agreement and latent cosine against float32."""
        return self.text_agreement >= min_text_agreement and self.latent_cosine >= min_latent_cosine


def seeded_call_audio(model: MichiModel, frames: int, seed: int) -> torch.Tensor:
    """``[frames, frame_samples]`` of quiet noise, the same for every run with this seed."""
    generator = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(frames, model.config.frame_samples, generator=generator)


@torch.no_grad()
def run_call(
    model: MichiModel,
    audio: torch.Tensor,
    seed: int,
    speak_threshold: float = 0.0,
    forced: CallTrace | None = None,
) -> CallTrace:
    """Step one call through ``audio [frames, frame_samples]``: greedy text, seeded flow noise.

    ``speak_threshold`` 0 makes the model speak every frame, so every frame's audio counts.
    ``forced``: feed back that trace's text token and latent after each frame instead of this
    run's own (teacher forcing), so each frame's prediction has the reference's history.
    """
    if forced is not None and len(forced.text_tokens) != len(audio):
        raise ValueError(f"forced trace has {len(forced.text_tokens)} frames, the audio {len(audio)}")
    cache, state = model.new_cache(1), model.init_state(1)
    sampling = Sampling.greedy(1, speak_threshold=speak_threshold, device=model.device)
    generator = torch.Generator().manual_seed(seed)
    tokens, latents, wav = [], [], []
    for index, frame in enumerate(audio):
        noise = StepNoise.draw([generator], model.config.codec.latent_dim, model.device)
        out, state = model.step(frame[None].to(model.device), state, cache, sampling, noise)
        if forced is not None:
            # What the next step reads of this one (speak_threshold 0: the played latent is the latent).
            state["prev_text"] = forced.text_tokens[index : index + 1].to(state["prev_text"])
            state["prev_latent"] = forced.latents[index : index + 1].to(state["prev_latent"])
        tokens.append(out.text_tokens.cpu())
        latents.append(out.latents.float().cpu())
        wav.append(out.audio.float().cpu())
    return CallTrace(torch.cat(tokens), torch.cat(latents), torch.cat(wav, dim=1)[0])


def compare(reference: CallTrace, candidate: CallTrace) -> Agreement:
    text = (reference.text_tokens == candidate.text_tokens).float().mean().item()
    cosine = F.cosine_similarity(reference.latents, candidate.latents, dim=-1).mean().item()
    error = (reference.audio - candidate.audio).pow(2).sum().item()
    power = reference.audio.pow(2).sum().item()
    snr = float("inf") if error == 0 else 10.0 * torch.log10(torch.tensor(power / error)).item()
    return Agreement(text_agreement=text, latent_cosine=cosine, audio_snr_db=snr)


@contextmanager
def recorded_text_top2(model: MichiModel) -> Iterator[list[torch.Tensor]]:
    """While open, each step of ``model`` appends its text distribution's two largest
    probabilities (``[B, 2]``, on the CPU) to the yielded list: how decided each frame was, so a
    flipped token can be told from a flipped near-tie."""
    records: list[torch.Tensor] = []
    original = model.backbone.logits

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        out = original(hidden)
        records.append(out.float().softmax(dim=-1).topk(2, dim=-1).values.cpu())
        return out

    model.backbone.logits = logits  # an instance attribute, shadowing the method until removed
    try:
        yield records
    finally:
        del model.backbone.logits


def flips_at_near_ties(reference: CallTrace, candidate: CallTrace, top2: torch.Tensor, ratio: float = 2.0) -> tuple[int, int]:
    """(flipped frames whose reference runner-up had at least 1/``ratio`` of the top token's
    probability, all flipped frames); ``top2 [frames, 2]`` from ``recorded_text_top2``."""
    flipped = reference.text_tokens != candidate.text_tokens
    near_tie = top2[:, 1] * ratio >= top2[:, 0]
    return int((flipped & near_tie).sum()), int(flipped.sum())
