"""Llama/SmolLM decoder with a slot KV cache.

Module names match Hugging Face's ``LlamaForCausalLM`` without the leading ``model.``, so a
SmolLM checkpoint loads by name (see ``checkpoint.load_hf_backbone``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pipecat_michi.model.config import BackboneConfig
from pipecat_michi.model.kv_cache import SlotKVCache


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 as Llama does."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel where there are five (the decode step runs 65 norms).
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class Float32Buffers(nn.Module):
    """A module whose buffers stay float32 when the model is cast to bf16/fp16 (``.to(dtype)``).

    They are derived constants (RoPE frequencies, mel filters, windows) that set the numbers of
    every later layer: rounded to bf16, RoPE at position 2000 would drift by radians. A cast
    still moves them to the new device, from the float32 originals.
    """

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - nn.Module's signature
        originals = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, original in originals.items():
            if original is not None and original.is_floating_point():
                self._buffers[name] = original.to(self._buffers[name].device)
        return self


class RotaryEmbedding(Float32Buffers):
    """Llama's default RoPE (rotate-half layout)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions [B, T]`` -> ``cos, sin [B, T, head_dim]`` (float32)."""
        freqs = positions.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, T, heads, head_dim]`` by per-position ``cos/sin [B, T, head_dim]``."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class LayerCache(NamedTuple):
    """One layer's part of a ``SlotKVCache`` for a forward pass over cache rows ``row_start`` on.

    The write goes into the whole cache tensor (``index_put_`` with the layer as an index), not
    into a view of the layer: ``torch.compile`` functionalizes a write into a view by rebuilding
    the view's base, which copied the whole cache (every layer) once per layer per step; the
    compiled michi-530m step went from 68 to 179 ms between 100 and 1,000 cached entries.
    """

    keys: torch.Tensor  # [layers, slots, capacity, kv_heads, head_dim]
    values: torch.Tensor
    layer: int
    row_start: int
    write_index: torch.Tensor  # [B, T] entry of each new key

    def write_and_read(self, k: torch.Tensor, v: torch.Tensor, key_count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v [B, T, kvh, hd]``; return the first ``key_count`` entries of the rows."""
        batch = k.shape[0]
        rows = torch.arange(self.row_start, self.row_start + batch, device=k.device)[:, None]
        layer = torch.full_like(rows, self.layer)
        self.keys.index_put_((layer, rows, self.write_index), k.to(self.keys.dtype))
        self.values.index_put_((layer, rows, self.write_index), v.to(self.values.dtype))
        span = slice(self.row_start, self.row_start + batch)
        return self.keys[self.layer, span, :key_count], self.values[self.layer, span, :key_count]


class Attention(nn.Module):
    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        # Set by ``quantize.fuse_projections`` in place of q/k/v_proj: one matmul, one read.
        self.qkv_proj: nn.Module | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        cache: LayerCache | None,
    ) -> torch.Tensor:
        """``x [B, T, H]``; ``mask [B, T, K]`` (True = may attend).

        Without a cache, keys are this call's own T positions (K == T). With a ``LayerCache``
        the new keys are written at ``write_index`` of this layer's rows and attention reads
        the first K cache entries.
        """
        batch, steps, _ = x.shape
        if self.qkv_proj is not None:
            # The fused projection's q and k columns are adjacent: rotate them in one pass.
            qkv = self.qkv_proj(x).view(batch, steps, self.num_heads + 2 * self.kv_heads, self.head_dim)
            qk = apply_rotary(qkv[:, :, : self.num_heads + self.kv_heads], cos, sin)
            q, k = qk.split([self.num_heads, self.kv_heads], dim=2)
            v = qkv[:, :, self.num_heads + self.kv_heads :]
        else:
            q = self.q_proj(x).view(batch, steps, self.num_heads, self.head_dim)
            k = self.k_proj(x).view(batch, steps, self.kv_heads, self.head_dim)
            v = self.v_proj(x).view(batch, steps, self.kv_heads, self.head_dim)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.write_and_read(k, v, mask.shape[-1])
            return self.o_proj(grouped_attention(q, k.to(q.dtype), v.to(q.dtype), mask))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask[:, None],
            enable_gqa=self.kv_heads != self.num_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, steps, -1))


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of ``q [B, T, H, hd]`` over ``k, v [B, K, kvh, hd]`` -> ``[B, T, H * hd]``.

    The decode step's form (few queries, many cached keys): each KV head's query group is one
    matmul, softmax in float32. On the CPU, PyTorch's fused SDPA took 0.36 ms per layer for one
    bf16 query over 300 keys (SmolLM-360M heads), this 0.17 ms; 32 layers per step.
    """
    batch, steps, heads, head_dim = q.shape
    kv_heads, keys = k.shape[2], k.shape[1]
    group = heads // kv_heads
    # Query head h reads KV head h // group, as SDPA's enable_gqa and Llama's repeat_kv do.
    q = q.view(batch, steps, kv_heads, group, head_dim).permute(0, 2, 1, 3, 4).reshape(batch, kv_heads, -1, head_dim)
    scores = (q @ k.permute(0, 2, 3, 1)).float() * head_dim**-0.5
    mask = mask[:, None, :, None, :].expand(batch, 1, steps, group, keys).reshape(batch, 1, steps * group, keys)
    weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(v.dtype)
    out = weights @ v.transpose(1, 2)
    return out.view(batch, kv_heads, steps, group, head_dim).permute(0, 2, 1, 3, 4).reshape(batch, steps, -1)


class MLP(nn.Module):
    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        # Set by ``quantize.fuse_projections`` in place of gate/up_proj: one matmul, one read.
        self.gate_up_proj: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None) -> torch.Tensor:  # noqa: ANN001 - see Attention
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """The text/audio decoder. Takes input *embeddings* (the duplex step sums several)."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(
            cfg.hidden_size, cfg.vocab_size, bias=False
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Hugging Face's Llama init (initializer_range 0.02). PyTorch's default unit-variance
        # embedding, tied to the LM head, makes a random model repeat its previous token forever.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-norm'd hidden states -> vocabulary logits (tied to the embedding by default).

        A quantized model has an ``lm_head`` even when tied: an int8 copy of the embedding for
        the head's matmul, while the embedding lookup keeps the full-precision table.
        """
        if self.lm_head is None:
            return F.linear(hidden, self.embed_tokens.weight)
        return self.lm_head(hidden)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """Offline causal pass over ``embeds [B, T, H]`` from position 0 -> normed hidden."""
        batch, steps, _ = embeds.shape
        positions = torch.arange(steps, device=embeds.device).expand(batch, steps)
        cos, sin = self.rotary(positions)
        mask = torch.ones(steps, steps, dtype=torch.bool, device=embeds.device).tril()
        mask = mask.expand(batch, steps, steps)
        x = embeds
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)

    def forward_cached(
        self,
        embeds: torch.Tensor,
        cache: SlotKVCache,
        rows: slice,
        active: Sequence[bool] | None = None,
        active_mask: torch.Tensor | None = None,
        key_count: int | None = None,
    ) -> torch.Tensor:
        """Append ``embeds [B, T, H]`` to cache slots ``rows`` (B of them); return normed hidden.

        Each slot continues from its own length and position. Rows with ``active`` False (a
        host-side list; ``active_mask`` is the same on the device, if the caller has it) are
        computed (keeping the batch dense) but their lengths and positions do not advance, so
        what was written beyond their length is never read. Attention reads the first
        ``key_count`` cache entries: by default just enough for the longest row (known on the
        host, no device sync); a compiled step passes the capacity so every step has one shape.
        """
        batch, steps, _ = embeds.shape
        if rows.stop - rows.start != batch:
            raise ValueError(f"rows {rows} do not match a batch of {batch}")
        cache.check_room(rows, steps)
        if active is not None and active_mask is None:
            active_mask = torch.tensor(list(active), dtype=torch.bool, device=embeds.device)
        hidden = self.forward_kv(embeds, cache, rows, key_count or cache.max_length(rows) + steps)
        cache.advance(rows, steps, None if active is None else list(active), active_mask)
        return hidden

    def forward_kv(self, embeds: torch.Tensor, cache: SlotKVCache, rows: slice, key_count: int) -> torch.Tensor:
        """The device half of ``forward_cached``: write the new keys at each row's length, attend
        over the first ``key_count`` entries. No host bookkeeping and no device sync, so a
        compiled step can contain it; the caller checks room and advances the lengths."""
        steps = embeds.shape[1]
        lengths, positions = cache.lengths[rows], cache.positions[rows]
        offsets = torch.arange(steps, device=embeds.device)
        write_index = lengths[:, None] + offsets
        cos, sin = self.rotary(positions[:, None] + offsets)
        key_index = torch.arange(key_count, device=embeds.device)
        mask = key_index[None, None, :] <= write_index[:, :, None]
        x = embeds
        for layer_index, layer in enumerate(self.layers):
            layer_cache = LayerCache(cache.keys, cache.values, layer_index, rows.start or 0, write_index)
            x = layer(x, cos, sin, mask, layer_cache)
        return self.norm(x)

    def new_cache(
        self,
        num_slots: int,
        capacity: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> SlotKVCache:
        cfg = self.config
        return SlotKVCache(
            cfg.num_hidden_layers,
            num_slots,
            capacity,
            cfg.num_key_value_heads,
            cfg.head_dim,
            device=device or self.embed_tokens.weight.device,
            dtype=dtype or self.embed_tokens.weight.dtype,
        )
