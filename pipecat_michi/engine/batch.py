"""The tensors of every slot, and the operations on them. Runs on the engine's model thread only.

Rows ``0..n-1`` of the cache and streaming state are stepped together, ``n`` being one past the
highest slot in use; slots are handed out lowest first so ``n`` stays small, and free rows inside
the range are masked inactive (computed, never advanced).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipecat_michi.model.michi import MichiModel, Sampling, StepNoise
from pipecat_michi.pcm import float_to_pcm16


# Batch sizes a compiled step is built for; a batch is padded (inactive rows) to the next one.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ContextTooLongError(ValueError):
    """Text or voice prompt that cannot fit in a slot's KV window."""


@dataclass(frozen=True)
class BatchStepOutput:
    """One step's outputs for rows ``0..n-1``, on the CPU, ready for the event loop."""

    text_tokens: list[int]
    transcript_tokens: list[list[int]]  # per row, the frame's transcript tokens (PAD = none)
    transcript_logprobs: np.ndarray | None  # [n, S, C] float32 a CTC head's log-probabilities
    speak_prob: list[float]
    speaking: list[bool]
    audio_pcm16: np.ndarray  # [n, frame_samples] int16; zero rows where not speaking
    kv_lengths: list[int]


class SlotBatch:
    """Per-slot KV cache + streaming state at full capacity, stepped as a dense prefix."""

    def __init__(
        self, model: MichiModel, slot_capacity: int, kv_capacity: int, evict_fraction: float, compiled: bool = False
    ) -> None:
        self.model = model
        self.cache = model.new_cache(slot_capacity, kv_capacity)
        self.state = model.init_state(slot_capacity)
        self._fresh = model.init_state(1)
        self._evict_fraction = evict_fraction
        self.compiled = compiled
        self.batch_sizes = [b for b in BATCH_BUCKETS if b < slot_capacity] + [slot_capacity]
        if compiled and self.model.device.type == "cuda":
            # CUDA graphs replay fixed addresses: the cache and state are written in place.
            for tensor in (self.cache.keys, self.cache.values, self.cache.lengths, self.cache.positions,
                           *self.state.values()):
                torch._dynamo.mark_static_address(tensor)

    def rows_for(self, live_rows: int) -> int:
        """Rows to step for ``live_rows``: a compiled step pads to the next batch size."""
        if not self.compiled:
            return live_rows
        return next(b for b in self.batch_sizes if b >= live_rows)

    @torch.no_grad()
    def warm_up(self) -> None:
        """Compile the step for every batch size now (all rows inactive: nothing changes), so
        the first call of each size never stalls live calls."""
        for batch in self.batch_sizes:
            self.idle_step(batch)

    @torch.no_grad()
    def idle_step(self, rows: int) -> None:
        """One full step of ``rows`` rows, all inactive: every part of the model runs, no slot's
        state or cache advances (the warm-up's and the start-up calibration's step)."""
        sampling = Sampling.greedy(rows, device=self.model.device)
        sampling.max_flow_steps = 1
        # Tensors where the engine's ticks pass tensors: the same graph, no recompile later.
        sampling.flow_steps = torch.ones(rows, dtype=torch.long, device=self.model.device)
        sampling.speak_onset_frames = torch.ones(rows, dtype=torch.long, device=self.model.device)
        noise = StepNoise(
            torch.zeros(rows, self.model.config.codec.latent_dim, device=self.model.device),
            torch.zeros(rows, device=self.model.device),
        )
        audio = np.zeros((rows, self.model.config.frame_samples), dtype=np.float32)
        self.step(audio, [False] * rows, sampling, noise)

    @property
    def kv_capacity(self) -> int:
        return self.cache.capacity

    def reset(self, slot: int) -> None:
        for key, value in self.state.items():
            value[slot] = self._fresh[key][0]
        self.cache.reset(slot)

    def kv_length(self, slot: int) -> int:
        return self.cache.host_lengths[slot]

    def _make_room(self, slot: int, needed: int) -> None:
        """Ring eviction: drop a block of the oldest unpinned entries when ``needed`` won't fit."""
        if self.cache.free_space(slot) >= needed:
            return
        unpinned = self.kv_length(slot) - self.cache.pinned[slot]
        block = max(needed - self.cache.free_space(slot), int(self._evict_fraction * self.kv_capacity))
        self.cache.evict(slot, min(block, unpinned))
        if self.cache.free_space(slot) < needed:
            raise ContextTooLongError(
                f"{needed} entries do not fit a KV window of {self.kv_capacity} "
                f"with {self.cache.pinned[slot]} pinned"
            )

    def check_injection(self, slot: int, token_count: int, pinned: bool) -> None:
        """Refuse text that cannot fit: pinned text may fill half the KV window; unpinned text
        half of what the pinned part leaves, so the call keeps room to hear and speak."""
        pinned_now = self.cache.pinned[slot]
        if pinned and pinned_now + token_count > self.kv_capacity // 2:
            raise ContextTooLongError(
                f"pinned context of {pinned_now + token_count} tokens exceeds half the KV window "
                f"({self.kv_capacity // 2}); inject it unpinned or shorten it"
            )
        if not pinned and token_count > (self.kv_capacity - pinned_now) // 2:
            raise ContextTooLongError(
                f"{token_count} tokens exceed the {(self.kv_capacity - pinned_now) // 2} an injection may take "
                f"(half the KV window left after {pinned_now} pinned); split or shorten it"
            )

    @torch.no_grad()
    def prefill_text(self, slot: int, token_ids: list[int], pinned: bool) -> int:
        self.check_injection(slot, len(token_ids), pinned)
        self._make_room(slot, len(token_ids))
        return self.model.prefill_text(token_ids, self.cache, slot, pinned=pinned)

    @torch.no_grad()
    def prefill_voice(self, slot: int, wav: np.ndarray) -> int:
        embeds = self.encode_voice(slot, wav)
        self.prefill_voice_embeds(slot, embeds)
        return embeds.shape[1]

    @torch.no_grad()
    def encode_voice(self, slot: int, wav: np.ndarray) -> torch.Tensor:
        """A voice prompt's backbone inputs, checked against the window; prefill them with
        ``prefill_voice_embeds``, in chunks between ticks."""
        frames = len(wav) // self.model.config.frame_samples
        if self.cache.pinned[slot] + frames > self.kv_capacity // 2:
            raise ContextTooLongError(f"a voice prompt of {frames} frames exceeds half the KV window")
        return self.model.encode_voice(torch.from_numpy(wav))

    @torch.no_grad()
    def prefill_voice_embeds(self, slot: int, embeds: torch.Tensor) -> int:
        self.model.prefill_voice_embeds(embeds, self.cache, slot)
        return self.kv_length(slot)

    @torch.no_grad()
    def step(
        self, audio: np.ndarray, active: list[bool], sampling: Sampling, noise: StepNoise
    ) -> BatchStepOutput:
        """Step rows ``0..len(active)-1``; ``audio [n, frame_samples]`` float32 in [-1, 1].

        All bookkeeping (room, eviction) reads host-side lengths: no device sync per slot.
        Inactive rows get room too: their junk key is written at their length as well, and a
        live call left full by its last step may sit out a catch-up tick.
        """
        n = len(active)
        for slot in range(n):
            self._make_room(slot, 1)
        rows = {key: value[:n] for key, value in self.state.items()}
        out, new_rows = self.model.step(
            torch.from_numpy(audio).to(self.model.device), rows, self.cache, sampling, noise, active=active,
            # A compiled step attends over the whole window: one shape, whatever the lengths.
            key_count=self.kv_capacity if self.compiled else None,
        )
        for key, value in new_rows.items():
            rows[key].copy_(value)
        pcm = float_to_pcm16(out.audio.float().cpu().numpy())
        return BatchStepOutput(
            text_tokens=out.text_tokens.tolist(),
            transcript_tokens=out.transcript_tokens.tolist(),
            transcript_logprobs=None if out.transcript_logprobs is None
            else out.transcript_logprobs[:n].float().cpu().numpy(),
            speak_prob=out.speak_prob.tolist(),
            speaking=out.speaking.tolist(),
            audio_pcm16=pcm,
            kv_lengths=self.cache.host_lengths[:n],
        )
