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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from pipecat_michi.model.backbone import Backbone
from pipecat_michi.model.codec import Codec
from pipecat_michi.model.config import MichiConfig
from pipecat_michi.model.flow_head import FlowHead
from pipecat_michi.model.kv_cache import SlotKVCache
from pipecat_michi.model.listening_head import ListeningHead
from pipecat_michi.model.monologue import MonologueContext, advance_history, empty_history
from pipecat_michi.model.streaming import StreamingState, prefixed, unprefixed
from pipecat_michi.model.whisper.encoder import WhisperListeningHead

_LISTEN = "listening"
_DECODER = "decoder"


@dataclass
class Sampling:
    """Per-call sampling controls, one row per call in the batch."""

    temperature: torch.Tensor  # [B] float; 0 = greedy
    top_k: torch.Tensor  # [B] long; 0 = no limit
    speak_threshold: torch.Tensor  # [B] float in (0, 1)
    flow_steps: int | torch.Tensor = 1  # one count, or [B] long
    # Frames in a row the speak probability must stay above the threshold before the model
    # takes the floor: one count, or [B] long. 1 takes it on the first such frame; more let
    # the short pauses inside a caller's sentence ("Hello! ... I would like", "tonight, please")
    # pass, at 80 ms of floor delay each (see ``speak_decision``).
    speak_onset_frames: int | torch.Tensor = 1
    # The largest of ``flow_steps`` when it is a tensor, known on the host: the flow loop's
    # length, without reading it back from the device every step.
    max_flow_steps: int | None = None
    # The largest ``top_k`` when every row has one (> 0), known on the host; None when some
    # row samples the whole vocabulary. Lets sampling take the top few instead of sorting all.
    max_top_k: int | None = None

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
    # [B, S] the user's transcript: S tokens per frame (1, or 4 characters for a CTC head), PAD
    # where nothing new was heard.
    transcript_tokens: torch.Tensor
    transcript_logprobs: torch.Tensor | None  # [B, S, C] a CTC head's per-token log-probabilities
    speak_prob: torch.Tensor  # [B]
    speaking: torch.Tensor  # [B] bool: audio is emitted this frame
    latents: torch.Tensor  # [B, latent_dim]
    audio: torch.Tensor  # [B, frame_samples] float in [-1, 1]; zeros while holding


def _clone(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.clone()


def sample_tokens(logits: torch.Tensor, sampling: Sampling, uniform: torch.Tensor) -> torch.Tensor:
    """Temperature + top-k sampling by inverse CDF of a given uniform draw (row-wise)."""
    greedy = logits.argmax(dim=-1)
    temperature = sampling.temperature.clamp(min=1e-5)[:, None]
    scaled = logits.float() / temperature
    if sampling.max_top_k:
        # Every row is limited to its top_k: only the best max_top_k can ever be drawn, and
        # topk over them costs a fraction of sorting the vocabulary (~4 ms of a CPU step at 49k).
        sorted_logits, order = torch.topk(scaled, min(sampling.max_top_k, logits.shape[-1]), dim=-1)
    else:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
    ranks = torch.arange(sorted_logits.shape[-1], device=logits.device)[None, :]
    k = torch.where(sampling.top_k > 0, sampling.top_k, logits.shape[-1])[:, None]
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    cdf = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    picked = torch.searchsorted(cdf, uniform.float()[:, None].clamp(max=1 - 1e-6)).clamp(max=sorted_logits.shape[-1] - 1)
    sampled = order.gather(-1, picked).squeeze(-1)
    return torch.where(sampling.temperature > 0, sampled, greedy)


def speak_decision(speak_prob: torch.Tensor, speak_run: torch.Tensor,
                   sampling: Sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether each row speaks this frame, and its new run of frames above the threshold.

    A row speaks while its speak probability stays above ``speak_threshold``, once the run has
    lasted ``speak_onset_frames`` frames: the floor is taken after that many frames in a row
    and held until the probability falls below the threshold again.
    """
    above = speak_prob > sampling.speak_threshold
    run = torch.where(above, speak_run + 1, torch.zeros_like(speak_run))
    return above & (run >= sampling.speak_onset_frames), run


def speaking_over_time(speak_prob: torch.Tensor, speak_threshold: float, speak_onset_frames: int) -> torch.Tensor:
    """``speak_decision`` stepped over one call's speak probabilities ``[F]``: ``[F]`` bool, the
    frames the model speaks in (what offline evaluation of a head's outputs uses)."""
    sampling = Sampling.greedy(1, speak_threshold, speak_prob.device)
    sampling.speak_onset_frames = speak_onset_frames
    run = torch.zeros(1, dtype=torch.long, device=speak_prob.device)
    speaking = torch.zeros(speak_prob.shape[0], dtype=torch.bool, device=speak_prob.device)
    for frame in range(speak_prob.shape[0]):
        now, run = speak_decision(speak_prob[frame: frame + 1], run, sampling)
        speaking[frame] = now[0]
    return speaking


class MichiModel(nn.Module):
    """Backbone + listening head + speaking (flow) head + codec, stepped in lockstep."""

    def __init__(self, config: MichiConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.backbone.hidden_size
        self.backbone = Backbone(config.backbone)
        listening_cls = WhisperListeningHead if config.listening.kind == "whisper" else ListeningHead
        self.listening = listening_cls(
            config.listening, config.frame_samples, config.sample_rate_hz, hidden, config.backbone.vocab_size,
            pad_id=config.tokens.pad_id,
        )
        self.latent_in = nn.Linear(config.codec.latent_dim, hidden)
        self.flow = FlowHead(config.flow, config.codec.latent_dim, hidden)
        self.monologue = self.new_monologue_context(config)
        self.codec = Codec(config.codec)
        self._compiled_step: Callable[..., tuple[StepOutput, StreamingState]] | None = None

    @staticmethod
    def new_monologue_context(config: MichiConfig) -> MonologueContext | None:
        """The flow head's monologue context (``config.flow.monologue_tokens``), or None when off."""
        flow = config.flow
        if not flow.monologue_tokens:
            return None
        hidden = config.backbone.hidden_size
        return MonologueContext(flow.monologue_tokens, flow.monologue_max_age, hidden, hidden)

    def flow_condition(self, hidden: torch.Tensor, history: torch.Tensor | None,
                       ages: torch.Tensor | None) -> torch.Tensor:
        """What the flow head is conditioned on: the backbone's state, plus the monologue context
        (``history``/``ages`` ``[..., K]``, see ``model/monologue.py``) when the model has one."""
        if self.monologue is None:
            return hidden
        return hidden + self.monologue(self.backbone.embed_tokens(history), ages).to(hidden.dtype)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # A norm's weight says where and in what dtype the model runs: linears may be quantized.
    @property
    def device(self) -> torch.device:
        return self.backbone.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.norm.weight.dtype

    def new_cache(self, num_slots: int, capacity: int | None = None) -> SlotKVCache:
        return self.backbone.new_cache(num_slots, capacity or self.config.kv_capacity)

    def init_state(self, batch_size: int) -> StreamingState:
        """Fresh per-call streaming state (everything but the KV cache), batch as dim 0."""
        device, dtype = self.device, self.dtype
        state: StreamingState = {
            "prev_latent": torch.zeros(batch_size, self.config.codec.latent_dim, device=device, dtype=dtype),
            "prev_text": torch.full((batch_size,), self.config.tokens.pad_id, dtype=torch.long, device=device),
            # Frames in a row the speak probability has been above the threshold (0: holding).
            "speak_run": torch.zeros(batch_size, dtype=torch.long, device=device),
        }
        if self.monologue is not None:
            flow = self.config.flow
            state["monologue_history"], state["monologue_ages"] = empty_history(
                batch_size, flow.monologue_tokens, flow.monologue_max_age, self.config.tokens.pad_id, device)
        state.update(prefixed(_LISTEN, self.listening.init_state(batch_size, device, dtype)))
        state.update(prefixed(_DECODER, self.codec.decoder.init_state(batch_size, device, dtype)))
        return state

    @torch.no_grad()
    def step(
        self,
        user_audio: torch.Tensor,
        state: StreamingState,
        cache: SlotKVCache,
        sampling: Sampling,
        noise: StepNoise,
        active: Sequence[bool] | None = None,
        key_count: int | None = None,
    ) -> tuple[StepOutput, StreamingState]:
        """One frame for cache slots ``0..B-1``: ``user_audio [B, frame_samples]`` in [-1, 1].

        ``state`` rows are those ``B`` calls; it is not modified, the new state is returned.
        Rows with ``active`` False (a host-side list) keep their old state and KV length (their
        outputs are junk). ``key_count``: see ``Backbone.forward_cached``.
        """
        batch = user_audio.shape[0]
        rows = slice(0, batch)
        cache.check_room(rows, 1)
        active_mask = None if active is None else torch.tensor(list(active), dtype=torch.bool, device=self.device)
        if sampling.max_flow_steps is None and isinstance(sampling.flow_steps, torch.Tensor):
            sampling = replace(sampling, max_flow_steps=int(sampling.flow_steps.max()))
        step = self._compiled_step or self._device_step
        if self._compiled_step is not None:
            torch.compiler.cudagraph_mark_step_begin()
        # The audio stays float32: the listening head's mel front-end runs in float32.
        output, new_state = step(
            user_audio.to(self.device, torch.float32), state, cache, sampling, noise, active_mask,
            key_count or cache.max_length(rows) + 1,
        )
        if self._compiled_step is not None and self.device.type == "cuda":
            # A CUDA graph's outputs live in its static memory, overwritten by the next replay:
            # hand out copies, so a caller may feed this state to the next step or keep it.
            output = StepOutput(**{f.name: _clone(getattr(output, f.name)) for f in fields(StepOutput)})
            new_state = {key: value.clone() for key, value in new_state.items()}
        cache.advance(rows, 1, None if active is None else list(active), active_mask)
        return output, new_state

    @property
    def step_is_compiled(self) -> bool:
        return self._compiled_step is not None

    def compile_step(self, mode: str | None = None, backend: str = "inductor") -> None:
        """Run ``step``'s device half through ``torch.compile`` from now on.

        Shapes are static (``dynamic=False``): one graph per batch size and ``key_count``, so a
        caller pads batches to a few sizes and passes a fixed ``key_count`` (the engine does
        both). ``mode="reduce-overhead"`` on CUDA replays the step as a CUDA graph.
        """
        # One graph per (batch bucket, flow step count) pair: more than the default limit of 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._compiled_step = torch.compile(self._device_step, mode=mode, backend=backend, dynamic=False)

    def _device_step(
        self,
        user_audio: torch.Tensor,
        state: StreamingState,
        cache: SlotKVCache,
        sampling: Sampling,
        noise: StepNoise,
        active_mask: torch.Tensor | None,
        key_count: int,
    ) -> tuple[StepOutput, StreamingState]:
        """The tensor work of ``step``: no host bookkeeping, no device sync (compilable)."""
        batch = user_audio.shape[0]
        heard, listen_state = self.listening.step(user_audio, unprefixed(_LISTEN, state))
        speak_logit = heard.speak_logit
        embeds = (
            heard.embedding
            + self.latent_in(state["prev_latent"])
            + self.backbone.embed_tokens(state["prev_text"])
        )
        hidden = self.backbone.forward_kv(embeds[:, None], cache, slice(0, batch), key_count)[:, 0]
        text_tokens = sample_tokens(self.backbone.logits(hidden), sampling, noise.text_uniform)
        history = ages = None
        if self.monologue is not None:  # this frame's input token joins the history
            history, ages = advance_history(state["monologue_history"], state["monologue_ages"], state["prev_text"],
                                            self.config.tokens.pad_id, self.config.flow.monologue_max_age)
        condition = self.flow_condition(hidden, history, ages)
        latents = self.flow.sample(condition, noise.latent_noise, sampling.flow_steps, sampling.max_flow_steps)
        speak_prob = torch.sigmoid(speak_logit.float())
        speaking, speak_run = speak_decision(speak_prob, state["speak_run"], sampling)
        # What the model hears of itself is what it actually played: silence while holding.
        played = latents * speaking[:, None].to(latents.dtype)
        audio, decoder_state = self.codec.decoder.step(played, unprefixed(_DECODER, state))
        audio = audio.float() * speaking[:, None]
        new_state: StreamingState = {"prev_latent": played, "prev_text": text_tokens, "speak_run": speak_run}
        if history is not None:
            new_state["monologue_history"], new_state["monologue_ages"] = history, ages
        new_state.update(prefixed(_LISTEN, listen_state))
        new_state.update(prefixed(_DECODER, decoder_state))
        if active_mask is not None:
            new_state = {k: _keep_inactive(v, state[k], active_mask) for k, v in new_state.items()}
        output = StepOutput(
            text_tokens=text_tokens,
            transcript_tokens=heard.transcript_tokens,
            transcript_logprobs=heard.transcript_logprobs,
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
            return cache.host_lengths[slot]
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        self._prefill(self.backbone.embed_tokens(ids), cache, slot, pinned)
        return cache.host_lengths[slot]

    @torch.no_grad()
    def prefill_voice(self, wav: torch.Tensor, cache: SlotKVCache, slot: int) -> int:
        """Zero-shot voice prompt: encode a reference clip (24 kHz, [-1, 1]) and prefill its
        latents, pinned, so the model continues in that voice. Returns the frames used."""
        embeds = self.encode_voice(wav)
        self.prefill_voice_embeds(embeds, cache, slot)
        return embeds.shape[1]

    def encode_voice(self, wav: torch.Tensor) -> torch.Tensor:
        """The backbone inputs ``[1, frames, hidden]`` of a voice prompt (24 kHz, [-1, 1]), to
        prefill whole or in chunks (``prefill_voice_embeds``)."""
        frames = wav.shape[-1] // self.config.frame_samples
        if frames == 0:
            raise ValueError(f"voice prompt shorter than one frame ({self.config.frame_samples} samples)")
        clip = wav[..., : frames * self.config.frame_samples].reshape(1, -1).to(self.device, self.dtype)
        return self.latent_in(self.codec.encoder(clip))

    def prefill_voice_embeds(self, embeds: torch.Tensor, cache: SlotKVCache, slot: int) -> None:
        """Prefill (pinned) consecutive frames of ``encode_voice``'s output."""
        self._prefill(embeds, cache, slot, pinned=True)

    def _prefill(self, embeds: torch.Tensor, cache: SlotKVCache, slot: int, pinned: bool) -> None:
        if pinned and cache.pinned[slot] != cache.host_lengths[slot]:
            raise ValueError("pinned context must be prefilled before any frame or unpinned text")
        self.backbone.forward_cached(embeds, cache, slice(slot, slot + 1))
        if pinned:
            cache.pinned[slot] = cache.host_lengths[slot]


def _keep_inactive(new: torch.Tensor, old: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    mask = active.view(-1, *([1] * (new.dim() - 1)))
    return torch.where(mask, new, old)
