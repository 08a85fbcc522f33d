"""Llama GGUF files (llama.cpp's format) read straight into Hugging Face ``LlamaForCausalLM`` tensors.

Why our own reader: going through transformers (``from_pretrained(gguf_file=...)``) took 30-45 s
for SmolLM2-135M on a 2-core CPU, most of it the ``gguf`` package's pure-Python parse of the
tokenizer arrays (12.7 s) and its NumPy dequantisation (4.3 s), paid by every user's first run
and by the test suite. This reader parses the header with ``struct`` (the ~100k tokenizer strings
are skipped, not decoded), maps the tensors from the file (``numpy.memmap``) and dequantises the
common block types in torch with the same float32 arithmetic as ``gguf.dequantize`` (so the
result is bit for bit what transformers produced: tested). Other block types (the k-quants)
fall back to the ``gguf`` package when it is installed.

Format (GGUF v2/v3, little-endian): magic ``GGUF``, version, tensor count, key/value count, the
key/values, one info per tensor (name, dims innermost first, ggml type, offset), padding to
``general.alignment`` (32), then the tensor data. llama.cpp's converter permutes the rows of
``attn_q``/``attn_k`` for its RoPE layout; :func:`unpermute_rows` undoes it as transformers does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types -> struct format (scalars); 8 = string, 9 = array.
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9

# ggml tensor types this module dequantises itself: type id -> (name, block elements, block bytes).
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
_BLOCKS = {
    F32: ("F32", 1, 4),
    F16: ("F16", 1, 2),
    BF16: ("BF16", 1, 2),
    Q4_0: ("Q4_0", 32, 18),
    Q4_1: ("Q4_1", 32, 20),
    Q8_0: ("Q8_0", 32, 34),
}


class GGUFError(ValueError):
    """A file that is not a GGUF this reader understands (named, never a raw struct error)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # row-major (PyTorch) order: GGUF's dims reversed
    ggml_type: int
    offset: int  # from the start of the data section


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]  # scalars, strings and numeric arrays; string arrays as their length
    tensors: dict[str, TensorInfo]
    data_offset: int


class _Cursor:
    def __init__(self, buffer: memoryview) -> None:
        self.buffer, self.pos = buffer, 0

    def unpack(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from("<" + fmt, self.buffer, self.pos)
        except struct.error as exc:
            raise GGUFError(f"truncated header at byte {self.pos}") from exc
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("Q")
        if self.pos + length > len(self.buffer):
            raise GGUFError(f"truncated string at byte {self.pos}")
        raw = bytes(self.buffer[self.pos: self.pos + length])
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        for _ in range(count):
            length = self.unpack("Q")  # advances past the length first
            self.pos += length
        if self.pos > len(self.buffer):
            raise GGUFError("truncated string array")

    def value(self, kind: int) -> Any:
        if kind in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.unpack("I"), self.unpack("Q")
            if item_kind == _STRING:
                # The tokenizer's vocabulary and merges: not needed for weights, and decoding
                # ~100k strings is what made the gguf package's reader slow.
                self.skip_strings(count)
                return count
            if item_kind not in _SCALAR_FORMATS:
                raise GGUFError(f"unsupported array element type {item_kind}")
            fmt = _SCALAR_FORMATS[item_kind]
            size = struct.calcsize(fmt) * count
            if self.pos + size > len(self.buffer):
                raise GGUFError("truncated array")
            values = list(struct.unpack_from(f"<{count}{fmt}", self.buffer, self.pos))
            self.pos += size
            return values
        raise GGUFError(f"unknown metadata value type {kind}")


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header (metadata and tensor infos); tensor data stays on disk."""
    path = Path(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cursor = _Cursor(memoryview(data))
    if bytes(data[:4]) != GGUF_MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (magic {bytes(data[:4])!r})")
    cursor.pos = 4
    version = cursor.unpack("I")
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    tensor_count, kv_count = cursor.unpack("Q"), cursor.unpack("Q")
    metadata = {}
    for _ in range(kv_count):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.unpack("I"))
    tensors = {}
    for _ in range(tensor_count):
        name = cursor.string()
        dims = [cursor.unpack("Q") for _ in range(cursor.unpack("I"))]
        ggml_type, offset = cursor.unpack("I"), cursor.unpack("Q")
        tensors[name] = TensorInfo(name, tuple(reversed(dims)), ggml_type, offset)
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_offset = -(-cursor.pos // alignment) * alignment
    return GGUFFile(path, version, metadata, tensors, data_offset)


def dequantize(file: GGUFFile, info: TensorInfo) -> torch.Tensor:
    """One tensor of ``file`` as float32 ``info.shape``."""
    count = int(np.prod(info.shape))
    if info.ggml_type not in _BLOCKS:
        return _dequantize_with_gguf_package(file, info, count)
    name, block_elements, block_bytes = _BLOCKS[info.ggml_type]
    if count % block_elements:
        raise GGUFError(f"{info.name}: {count} elements is not a whole number of {name} blocks")
    size = count // block_elements * block_bytes
    start = file.data_offset + info.offset
    raw = np.memmap(file.path, dtype=np.uint8, mode="r", offset=start, shape=(size,))
    blocks = torch.from_numpy(np.array(raw)).view(-1, block_bytes)
    return _dequantize_blocks(info.ggml_type, blocks).reshape(info.shape)


def _dequantize_blocks(ggml_type: int, blocks: torch.Tensor) -> torch.Tensor:
    # The same float32 operations, in the same order, as gguf.quants (d * q + m), so the
    # results are bit for bit equal (tested against the gguf package).
    if ggml_type == F32:
        return blocks.contiguous().view(torch.float32).flatten()
    if ggml_type == F16:
        return blocks.contiguous().view(torch.float16).flatten().float()
    if ggml_type == BF16:
        return blocks.contiguous().view(torch.bfloat16).flatten().float()
    scale = blocks[:, :2].contiguous().view(torch.float16).float()
    if ggml_type == Q8_0:
        return (scale * blocks[:, 2:].contiguous().view(torch.int8).float()).flatten()
    if ggml_type == Q4_0:
        return (scale * (_nibbles(blocks[:, 2:]).to(torch.int8) - 8).float()).flatten()
    if ggml_type == Q4_1:
        low = blocks[:, 2:4].contiguous().view(torch.float16).float()
        return (scale * _nibbles(blocks[:, 4:]).float() + low).flatten()
    raise GGUFError(f"ggml type {ggml_type} has no dequantiser here")


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """``[N, 16]`` bytes -> ``[N, 32]``: the low nibbles are elements 0-15, the high ones 16-31."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=1)


def _dequantize_with_gguf_package(file: GGUFFile, info: TensorInfo, count: int) -> torch.Tensor:
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf import dequantize as gguf_dequantize
    except ImportError:
        raise GGUFError(
            f"{info.name}: ggml type {info.ggml_type} needs the gguf package (pip install gguf)"
        ) from None
    kind = GGMLQuantizationType(info.ggml_type)
    block_elements, block_bytes = GGML_QUANT_SIZES[kind]
    size = count // block_elements * block_bytes
    raw = np.memmap(file.path, dtype=np.uint8, mode="r", offset=file.data_offset + info.offset, shape=(size,))
    values = gguf_dequantize(np.array(raw), kind)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(info.shape)


def unpermute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (its RoPE pairs (i, i + d/2) stored as (2i, 2i+1))."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(2, 1).reshape(weight.shape)


_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def llama_hf_config(file: GGUFFile) -> dict[str, Any]:
    """The file's metadata as a Hugging Face ``LlamaConfig`` dict (the fields our backbone reads)."""
    meta = file.metadata
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"{file.path}: architecture {arch!r} is not llama")
    try:
        heads = int(meta["llama.attention.head_count"])
        config = {
            "model_type": "llama",
            "hidden_size": int(meta["llama.embedding_length"]),
            "intermediate_size": int(meta["llama.feed_forward_length"]),
            "num_hidden_layers": int(meta["llama.block_count"]),
            "num_attention_heads": heads,
            "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
            "rms_norm_eps": float(meta["llama.attention.layer_norm_rms_epsilon"]),
            "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
            "max_position_embeddings": int(meta["llama.context_length"]),
        }
    except KeyError as exc:
        raise GGUFError(f"{file.path}: metadata {exc.args[0]!r} is missing") from None
    vocab = meta.get("llama.vocab_size", meta.get("tokenizer.ggml.tokens"))
    if vocab is None:
        vocab = file.tensors["token_embd.weight"].shape[0]
    config["vocab_size"] = int(vocab)
    config["tie_word_embeddings"] = "output.weight" not in file.tensors
    if meta.get("llama.rope.scaling.type", "none") not in ("none", None) or "rope_freqs.weight" in file.tensors:
        raise GGUFError(f"{file.path}: RoPE scaling is not supported (default RoPE only)")
    return config


def read_llama_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A llama GGUF as (HF config dict, ``LlamaForCausalLM`` state dict in float32)."""
    file = read_gguf(path)
    config = llama_hf_config(file)
    state = {}
    for name, info in file.tensors.items():
        if name in _GLOBAL_NAMES:
            hf_name = _GLOBAL_NAMES[name]
        else:
            prefix, _, layer_part = name.partition(".")
            block, _, rest = layer_part.partition(".")
            if prefix != "blk" or not block.isdigit() or rest not in _LAYER_NAMES:
                raise GGUFError(f"{file.path}: unexpected tensor {name!r} for a llama model")
            hf_name = f"model.layers.{int(block)}.{_LAYER_NAMES[rest]}"
        tensor = dequantize(file, info)
        if name.endswith("attn_q.weight"):
            tensor = unpermute_rows(tensor, config["num_attention_heads"])
        elif name.endswith("attn_k.weight"):
            tensor = unpermute_rows(tensor, config["num_key_value_heads"])
        state[hf_name] = tensor
    return config, state
