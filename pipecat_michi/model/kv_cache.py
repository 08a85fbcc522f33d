"""Slot-based KV cache: one row per call, many calls stepped in one batch.

Keys are stored *after* RoPE at their absolute positions. Attention with RoPE depends only on
relative distances, so dropping old entries (ring eviction) leaves every remaining pair's
distance intact: a call can run for hours in a fixed ``capacity``.
"""

from __future__ import annotations

import torch


class KVCacheFullError(RuntimeError):
    """A write would pass a slot's capacity; the caller must evict first."""


class SlotKVCache:
    """Keys/values for every layer and slot.

    ``keys``/``values``: ``[layers, slots, capacity, kv_heads, head_dim]``.
    ``lengths[s]``: valid entries of slot ``s`` (entries ``[0, lengths[s])``), on the device.
    ``host_lengths[s]``: the same, mirrored as Python ints. Every decision a step makes on the
    host (room left, eviction, how many keys to read) uses the mirror, so a GPU step never
    waits for the device to report a length.
    ``positions[s]``: the next absolute RoPE position of slot ``s`` (never decreases).
    ``pinned[s]``: how many leading entries eviction must keep (system prompt, voice prompt);
    host-side only, nothing on the device reads it.
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        capacity: int,
        kv_heads: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (num_layers, num_slots, capacity, kv_heads, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.positions = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.host_lengths = [0] * num_slots
        self.pinned = [0] * num_slots
        self.capacity = capacity

    @property
    def num_slots(self) -> int:
        return self.keys.shape[1]

    def free_space(self, slot: int) -> int:
        return self.capacity - self.host_lengths[slot]

    def reset(self, slot: int) -> None:
        """Forget a slot's history (entries beyond ``lengths`` are never read)."""
        self.lengths[slot] = 0
        self.positions[slot] = 0
        self.host_lengths[slot] = 0
        self.pinned[slot] = 0

    def max_length(self, rows: slice) -> int:
        return max(self.host_lengths[rows])

    def check_room(self, rows: slice, new_tokens: int) -> None:
        if self.max_length(rows) + new_tokens > self.capacity:
            raise KVCacheFullError(
                f"KV cache of capacity {self.capacity} cannot take {new_tokens} more entries "
                f"for slots {rows.start}..{rows.stop - 1}; evict old frames first"
            )

    def evict(self, slot: int, count: int) -> int:
        """Drop the ``count`` oldest unpinned entries of ``slot``; return how many were dropped."""
        length, pinned = self.host_lengths[slot], self.pinned[slot]
        count = max(0, min(count, length - pinned))
        if count == 0:
            return 0
        keep = slice(pinned + count, length)
        dest = slice(pinned, length - count)
        # clone(): source and destination overlap.
        self.keys[:, slot, dest] = self.keys[:, slot, keep].clone()
        self.values[:, slot, dest] = self.values[:, slot, keep].clone()
        self.lengths[slot] = length - count
        self.host_lengths[slot] = length - count
        return count

    def advance(self, rows: slice, steps: int, active: list[bool] | None, active_mask: torch.Tensor | None) -> None:
        """Count ``steps`` new entries for rows ``rows``; rows with ``active`` False stay put.

        ``active_mask`` is ``active`` already on the device (one copy per step, made by the caller).
        """
        advance = steps if active_mask is None else active_mask.long() * steps
        self.lengths[rows] += advance
        self.positions[rows] += advance
        for offset, slot in enumerate(range(rows.start, rows.stop)):
            if active is None or active[offset]:
                self.host_lengths[slot] += steps

    def copy_slot(self, source: SlotKVCache, source_slot: int, slot: int) -> None:
        """Make ``slot`` a copy of ``source``'s ``source_slot`` (benchmarks start calls mid-way)."""
        length = source.host_lengths[source_slot]
        self.keys[:, slot, :length] = source.keys[:, source_slot, :length]
        self.values[:, slot, :length] = source.values[:, source_slot, :length]
        self.lengths[slot] = length
        self.positions[slot] = source.positions[source_slot]
        self.host_lengths[slot] = length
        self.pinned[slot] = source.pinned[source_slot]
