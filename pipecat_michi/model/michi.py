"""MichiAI: the duplex model, one 80 ms frame per step, many calls per batch.

Per frame and per call, the backbone's input embedding is the sum of
  - the listening head's embedding of the user's frame,
  - a projection of the model's own previous audio latent (what it just said),
  - the embedding of its own previous text token (inner monologue; PAD when silent),
and its outputs are the next text token (LM head), the next audio latent (flow head, decoded to
``frame_samples`` of audio by the causal vocoder), the user's transcript token and a speak/hold
probability (listening head).

Randomness is an *input* (``StepNoise``): the engine draws it per call from the call's own
generator, so a call's output never depends on which other calls share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipecat_michi.model.backbone import Backbone
from pipecat_michi.model.codec import Codec
from pipecat_michi.model.config import MichiConfig
from pipecat_michi.model.flow_head import FlowHead
from pipecat_michi.model.kv_cache import SlotKVCache
from pipecat_michi.model.listening_head import ListeningHead
from pipecat_michi.model.whisper.encoder import WhisperListeningHead

StreamState = dict[str, torch.Tensor]

_LISTEN = "listening."
_DECODER = "decoder."


@dataclass
class Sampling:
    """Per-call sampling controls, one row per call in the batch."""

    temperature: torch.Tensor  # [B] float; 0 = greedy
    top_k: torch.Tensor  # [B] long; 0 = no limit
    speak_threshold: torch.Tensor  # [B] float in (0, 1)
    flow_steps: int | torch.Tensor = 1  # one count, or [B] long

    @classmethod
    def greedy(cls, batch_size: int, speak_threshold: float = 0.5, device=None) -> Sampling:  # noqa: ANN001
        return cls(
            temperature=torch.zeros(batch_size, device=device),
            top_k=torch.zeros(batch_size, dtype=torch.long, device=device),
            speak_threshold=torch.full((batch_size,), speak_threshold, device=device),
        )


@dataclass
class StepNoise:
    """The randomness of one step: flow starting noise and a uniform draw for the text token."""

    latent_noise: torch.Tensor  # [B, latent_dim] standard normal
    text_uniform: torch.Tensor  # [B] in [0, 1)

    @classmethod
    def draw(cls, generators: list[torch.Generator], latent_dim: int, device=None) -> StepNoise:  # noqa: ANN001
        """One draw per call, each from that call's generator (CPU generators, moved after)."""
        noise = torch.stack([torch.randn(latent_dim, generator=g) for g in generators])
        uniform = torch.stack([torch.rand((), generator=g) for g in generators])
        return cls(noise.to(device), uniform.to(device))


@dataclass
class StepOutput:
    """What one duplex step produced for each call (rows of the batch)."""

    text_tokens: torch.Tensor  # [B] the model's own text (inner monologue)
    transcript_tokens: torch.Tensor  # [B] the user's transcript
    speak_prob: torch.Tensor  # [B]
    speaking: torch.Tensor  # [B] bool: audio is emitted this frame
    latents: torch.Tensor  # [B, latent_dim]
    audio: torch.Tensor  # [B, frame_samples] float in [-1, 1]; zeros while holding


def sample_tokens(logits: torch.Tensor, sampling: Sampling, uniform: torch.Tensor) -> torch.Tensor:
    """Temperature + top-k sampling by inverse CDF of a given uniform draw (row-wise)."""
    greedy = logits.argmax(dim=-1)
    temperature = sampling.temperature.clamp(min=1e-5)[:, None]
    sorted_logits, order = torch.sort(logits.float() / temperature, dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    k = torch.where(sampling.top_k > 0, sampling.top_k, logits.shape[-1])[:, None]
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    cdf = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    picked = torch.searchsorted(cdf, uniform.float()[:, None].clamp(max=1 - 1e-6)).clamp(max=logits.shape[-1] - 1)
    sampled = order.gather(-1, picked).squeeze(-1)
    return torch.where(sampling.temperature > 0, sampled, greedy)


class MichiModel(nn.Module):
    """Backbone + listening head + speaking (flow) head + codec, stepped in lockstep."""

    def __init__(self, config: MichiConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.backbone.hidden_size
        self.backbone = Backbone(config.backbone)
        listening_cls = WhisperListeningHead if config.listening.kind == "whisper" else ListeningHead
        self.listening = listening_cls(
            config.listening, config.frame_samples, config.sample_rate_hz, hidden, config.backbone.vocab_size
        )
        self.latent_in = nn.Linear(config.codec.latent_dim, hidden)
        self.flow = FlowHead(config.flow, config.codec.latent_dim, hidden)
        self.codec = Codec(config.codec)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return self.latent_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.latent_in.weight.dtype

    def new_cache(self, num_slots: int, capacity: int | None = None) -> SlotKVCache:
        return self.backbone.new_cache(num_slots, capacity or self.config.kv_capacity)

    def init_state(self, batch_size: int) -> StreamState:
        """Fresh per-call streaming state (everything but the KV cache), batch as dim 0."""
        device, dtype = self.device, self.dtype
        state: StreamState = {
            "prev_latent": torch.zeros(batch_size, self.config.codec.latent_dim, device=device, dtype=dtype),
            "prev_text": torch.full((batch_size,), self.config.tokens.pad_id, dtype=torch.long, device=device),
        }
        state.update({_LISTEN + k: v for k, v in self.listening.init_state(batch_size, device, dtype).items()})
        state.update({_DECODER + k: v for k, v in self.codec.decoder.init_state(batch_size, device, dtype).items()})
        return state

    @torch.no_grad()
    def step(
        self,
        user_audio: torch.Tensor,
        state: StreamState,
        cache: SlotKVCache,
        sampling: Sampling,
        noise: StepNoise,
        active: torch.Tensor | None = None,
    ) -> tuple[StepOutput, StreamState]:
        """One frame for cache slots ``0..B-1``: ``user_audio [B, frame_samples]`` in [-1, 1].

        ``state`` rows are those ``B`` calls; it is not modified, the new state is returned.
        Rows with ``active`` False keep their old state and KV length (their outputs are junk).
        """
        batch = user_audio.shape[0]
        (listen_embedding, transcript_logits, speak_logit), listen_state = self.listening.step(
            user_audio.to(self.dtype), _sub(state, _LISTEN)
        )
        embeds = (
            listen_embedding
            + self.latent_in(state["prev_latent"])
            + self.backbone.embed_tokens(state["prev_text"])
        )
        hidden = self.backbone.forward_cached(embeds[:, None], cache, slice(0, batch), active)[:, 0]
        text_tokens = sample_tokens(self.backbone.logits(hidden), sampling, noise.text_uniform)
        latents = self.flow.sample(hidden, noise.latent_noise, sampling.flow_steps)
        speak_prob = torch.sigmoid(speak_logit.float())
        speaking = speak_prob > sampling.speak_threshold
        # What the model hears of itself is what it actually played: silence while holding.
        played = latents * speaking[:, None].to(latents.dtype)
        audio, decoder_state = self.codec.decoder.step(played, _sub(state, _DECODER))
        audio = audio.float() * speaking[:, None]
        new_state: StreamState = {"prev_latent": played, "prev_text": text_tokens}
        new_state.update({_LISTEN + k: v for k, v in listen_state.items()})
        new_state.update({_DECODER + k: v for k, v in decoder_state.items()})
        if active is not None:
            new_state = {k: _keep_inactive(v, state[k], active) for k, v in new_state.items()}
        output = StepOutput(
            text_tokens=text_tokens,
            transcript_tokens=transcript_logits.argmax(dim=-1),
            speak_prob=speak_prob,
            speaking=speaking,
            latents=latents,
            audio=audio,
        )
        return output, new_state

    @torch.no_grad()
    def prefill_text(self, token_ids: list[int], cache: SlotKVCache, slot: int, pinned: bool = False) -> int:
        """Append text tokens to one call's context between frames; return the new KV length.

        ``pinned`` text (the system prompt) survives ring eviction; it must come before any
        unpinned entry so the pinned region stays a prefix.
        """
        if not token_ids:
            return int(cache.lengths[slot])
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        self._prefill(self.backbone.embed_tokens(ids), cache, slot, pinned)
        return int(cache.lengths[slot])

    @torch.no_grad()
    def prefill_voice(self, wav: torch.Tensor, cache: SlotKVCache, slot: int) -> int:
        """Zero-shot voice prompt: encode a reference clip (24 kHz, [-1, 1]) and prefill its
        latents, pinned, so the model continues in that voice. Returns the frames used."""
        frames = wav.shape[-1] // self.config.frame_samples
        if frames == 0:
            raise ValueError(f"voice prompt shorter than one frame ({self.config.frame_samples} samples)")
        clip = wav[..., : frames * self.config.frame_samples].reshape(1, -1).to(self.device, self.dtype)
        latents = self.codec.encoder(clip)
        self._prefill(self.latent_in(latents), cache, slot, pinned=True)
        return frames

    def _prefill(self, embeds: torch.Tensor, cache: SlotKVCache, slot: int, pinned: bool) -> None:
        if pinned and int(cache.pinned[slot]) != int(cache.lengths[slot]):
            raise ValueError("pinned context must be prefilled before any frame or unpinned text")
        self.backbone.forward_cached(embeds, cache, slice(slot, slot + 1))
        if pinned:
            cache.pinned[slot] = cache.lengths[slot]


def _sub(state: StreamState, prefix: str) -> StreamState:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _keep_inactive(new: torch.Tensor, old: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    mask = active.view(-1, *([1] * (new.dim() - 1)))
    return torch.where(mask, new, old)
