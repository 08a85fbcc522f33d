"""int8 weight-only quantization for serving: every big linear reads one byte per weight.

A batch-1 step reads every weight once, so on a CPU (and a GPU at small batches) its time is
bytes of weights over memory bandwidth; int8 weights read 4x fewer bytes than float32.

Why our own module and not torchao: torchao 0.18's ``Int8WeightOnlyConfig`` computes
``x @ qdata.to(dtype).T`` in eager mode, which writes and re-reads a full-precision copy of
every weight per call (on this project's 2-core CPU a SmolLM-360M-sized stack ran 9.6 ms int8
vs 11.6 ms float32 vs 2.3 ms for the kernel below); its dynamic-activation config was slower
still, and its fast path needs ``torch.compile``. PyTorch core ships the CPU kernel,
``torch._weight_int8pack_mm`` (bf16/fp16 activations, int8 weights, per-row scales), so on the
CPU we call it directly; elsewhere the dequantize-then-matmul form is used, which
``torch.compile`` fuses into one int8 read, as torchao does on CUDA.

``int8-dynamic`` (``Int8DynamicLinear``) keeps the same weights and also quantizes each input
per call, for fbgemm's int8 x int8 GEMM: at batch 1 ``_weight_int8pack_mm`` is compute-bound
(~5 GMAC/s per core here), fbgemm ran one 960x5120 matmul ~3x faster. Its cost is the
activations' rounding (see benchmarks/quantize_quality.py and the README).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from loguru import logger
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

QuantizeMode = Literal["none", "int8", "int8-dynamic"]
QUANTIZE_MODES: tuple[str, ...] = ("none", "int8", "int8-dynamic")

# Smaller linears (the speak head, the latent projections of the tiny preset) are not worth
# a kernel switch; their bytes are noise next to the backbone's.
MIN_QUANTIZED_WEIGHTS = 4096
# torch._weight_int8pack_mm crashed (SIGSEGV) on bf16 inputs with in_features 33 and 40 in
# torch 2.13; multiples of 16 ran. Every linear of our presets has a multiple of 32.
_CPU_KERNEL_ALIGNMENT = 32


@torch.library.custom_op("pipecat_michi::int8_weight_mm", mutates_args=())
def int8_weight_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x [N, in] @ (qweight * scales).T`` by torch's CPU int8 kernel, ``x``'s dtype (bf16/fp16).

    An op of our own so that ``torch.compile`` calls the kernel as it is: inductor 2.13's
    lowering of ``aten._weight_int8pack_mm`` fails when its input is a fused pointwise result
    (``LoweringException: AssertionError: Pointwise``), as the listening head's GELU output is.
    """
    return torch._weight_int8pack_mm(x.contiguous(), qweight, scales)


@int8_weight_mm.register_fake
def _int8_weight_mm_shape(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], qweight.shape[0])


# fbgemm's packed weights, by the tensors they were packed from (weakly: a freed weight's entry
# is dropped). The packed weight is an opaque object dynamo cannot trace, so a compiled step
# passes the int8 tensors and ``int8_dynamic_mm`` finds (or makes) the pack here.
# (Keyed by identity: a tensor's == is elementwise, so weakref.WeakKeyDictionary cannot hold it.)
_FBGEMM_PACKS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _tensor_key(tensor: torch.Tensor | None) -> tuple | None:
    """What identifies a tensor's contents: its storage and, outside inference mode, its version."""
    if tensor is None:
        return None
    return tensor.data_ptr(), 0 if tensor.is_inference() else tensor._version  # inference tensors have none


def fbgemm_pack(qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> object:
    """fbgemm's prepacked form of an int8 weight with per-row ``scales`` (cached per tensor)."""
    key = (_tensor_key(qweight), _tensor_key(scales), _tensor_key(bias))
    entry = _FBGEMM_PACKS.get(qweight)
    if entry is not None and entry[0] == key:
        return entry[1]
    # torch 2.13 warns here (quantized tensor creation is deprecated, pytorch#184982): the
    # prepack op still takes a per-channel qint8 tensor; the GEMM op itself does not warn.
    zero_points = torch.zeros(qweight.shape[0], dtype=torch.long)
    w = torch._make_per_channel_quantized_tensor(qweight, scales.double(), zero_points, 0)
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        packed = torch.ops.quantized.linear_prepack(w, None if bias is None else bias.detach().float())
    finally:
        torch.backends.quantized.engine = previous
    _FBGEMM_PACKS[qweight] = (key, packed)
    return packed


@functools.cache
def activations_reduce_range() -> bool:
    """Whether fbgemm's dynamic int8 linears must quantize activations to 7 bits: on an x86 CPU
    without VNNI (AVX2 only, e.g. AMD EPYC before Zen 4) fbgemm multiplies u8 x s8 pairs with
    ``vpmaddubsw``, whose int16 pair sums saturate on full-range activations (255 * 127 * 2):
    measured 2026-12-04 on such a machine, 19-22% relative error per linear instead of < 3%, and
    text agreement 0.68-0.72 for a whole model. 7-bit activations cannot overflow. With VNNI
    (``avx512_vnni``/``avx_vnni``) or where the flags cannot be read as x86's, full range."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    if " avx2" not in flags:  # not x86 with AVX2 (fbgemm's kernels are x86)
        return False
    return " avx512_vnni" not in flags and " avx_vnni" not in flags


@torch.library.custom_op("pipecat_michi::int8_dynamic_mm", mutates_args=())
def int8_dynamic_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fbgemm's ``quantized.linear_dynamic`` of float32 ``x [N, in]``: int8 activations (one
    scale per call) x int8 weights with per-row ``scales``, float32 out. An op of our own so a
    compiled step calls it as it is."""
    return torch.ops.quantized.linear_dynamic(x.contiguous(), fbgemm_pack(qweight, scales, bias),
                                              activations_reduce_range())


@int8_dynamic_mm.register_fake
def _int8_dynamic_mm_shape(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return x.new_empty(x.shape[0], qweight.shape[0])


class Int8WeightOnlyLinear(nn.Module):
    """``y = x @ (qweight * scales).T + bias``: symmetric int8 per output row, any input dtype.

    The output has the input's dtype. On the CPU a float32 input meets the int8 kernel in bf16
    (the kernel has no fast float32 path), so float32 models keep float32 everywhere else.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)  # float32 [out]; cast per call (a few KB)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8WeightOnlyLinear:
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        qweight = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(qweight, scales, None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if x.device.type == "cpu" and self.in_features % _CPU_KERNEL_ALIGNMENT == 0:
            compute = torch.bfloat16 if x.dtype == torch.float32 else x.dtype
            # Compiled, through our op (see int8_weight_mm); eager, straight to the kernel: a
            # custom op's Python dispatch costs ~30 us a call, 230 calls a michi-530m step.
            kernel = int8_weight_mm if torch.compiler.is_compiling() else torch._weight_int8pack_mm
            y = kernel(flat.to(compute), self.qweight, self.scales.to(compute)).to(x.dtype)
        else:
            y = F.linear(flat, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _has_fbgemm_linear() -> bool:
    return hasattr(torch.ops.quantized, "linear_prepack") and "fbgemm" in torch.backends.quantized.supported_engines


class Int8DynamicLinear(Int8WeightOnlyLinear):
    """int8 weights (per output row) x int8 activations quantized per call (``int8-dynamic``).

    On the CPU the weight is prepacked once for fbgemm's ``quantized.linear_dynamic``, which
    quantizes the float32 input per call (one scale per tensor), runs an int8 x int8 GEMM
    with int32 accumulation and returns float32: about 3x the MACs/s of
    ``_weight_int8pack_mm``, which is compute-bound at batch 1 on this project's CPU. Inputs
    of another dtype are cast to float32 and back. Off the CPU (or without fbgemm) it falls
    back to the weight-only dequantize-then-matmul form of its parent.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(qweight, scales, bias)
        # The eager path's copy of the pack and the storages it came from: a step checks three
        # pointers instead of fbgemm_pack's keyed lookup (230 linears a michi-530m step).
        self._packed: object | None = None
        self._packed_key: tuple | None = None

    def __getstate__(self) -> dict:
        # The packed weight is a cache (and not copyable): copies and pickles pack again.
        return {**super().__getstate__(), "_packed": None, "_packed_key": None}

    def _cpu_packed(self) -> object:
        key = (self.qweight.data_ptr(), self.scales.data_ptr(), None if self.bias is None else self.bias.data_ptr())
        if self._packed is None or self._packed_key != key:
            self._packed, self._packed_key = fbgemm_pack(self.qweight, self.scales, self.bias), key
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or not _has_fbgemm_linear():
            return super().forward(x)
        flat = x.reshape(-1, self.in_features).float()
        if torch.compiler.is_compiling():
            y = int8_dynamic_mm(flat, self.qweight, self.scales, self.bias).to(x.dtype)
        else:  # the op's Python dispatch would cost ~30 us a call
            y = torch.ops.quantized.linear_dynamic(flat, self._cpu_packed(), activations_reduce_range()).to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Quantize ``model``'s big linears in place (``mode`` ``"none"`` leaves it as it is).

    Convolutions (the vocoder) and embeddings stay as they are. A tied LM head gets its own
    int8 copy of the embedding (``backbone.lm_head``), the lookup keeps the full table.
    Call after moving the model to its device and dtype.
    """
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantize mode {mode!r}: use one of {', '.join(QUANTIZE_MODES)}")
    if mode == "none":
        return model
    linear_type = Int8DynamicLinear if mode == "int8-dynamic" else Int8WeightOnlyLinear
    replaced, weights = fuse_projections(model, linear_type)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.numel() >= MIN_QUANTIZED_WEIGHTS:
                setattr(parent, name, linear_type.from_weight(child.weight, child.bias))
                replaced, weights = replaced + 1, weights + child.weight.numel()
    backbone = getattr(model, "backbone", None)
    if backbone is not None and backbone.lm_head is None:
        backbone.lm_head = linear_type.from_weight(backbone.embed_tokens.weight)
        replaced, weights = replaced + 1, weights + backbone.embed_tokens.weight.numel()
    if mode == "int8-dynamic" and _has_fbgemm_linear():
        # Pack every CPU weight now: lazily, the first step of the first call paid ~1 s for it.
        for module in model.modules():
            if isinstance(module, Int8DynamicLinear) and module.qweight.device.type == "cpu":
                module._cpu_packed()
    logger.info(f"{mode}: {replaced} linears, {weights / 1e6:.1f}M weights")
    return model


# (module type, fused attribute, the linears it replaces, in output order)
def _fusable() -> list[tuple[type, str, tuple[str, ...]]]:
    from pipecat_michi.model.backbone import MLP, Attention

    return [(Attention, "qkv_proj", ("q_proj", "k_proj", "v_proj")), (MLP, "gate_up_proj", ("gate_proj", "up_proj"))]


def fuse_projections(
    model: nn.Module, linear_type: type[Int8WeightOnlyLinear] = Int8WeightOnlyLinear
) -> tuple[int, int]:
    """Replace each attention's q/k/v_proj and each MLP's gate/up_proj by one int8 linear.

    Per-row scales make the fused weight quantize exactly as the separate ones would; the
    win is one kernel call (and one pass of threads) instead of three or two, 96 fewer calls
    per step in a 32-layer backbone. The checkpoint keeps the separate names: fusing
    happens here, after loading. Returns (linears replaced, weights quantized).
    """
    replaced, weights = 0, 0
    fusable = _fusable()
    for module in list(model.modules()):
        for module_type, fused_name, names in fusable:
            if not isinstance(module, module_type):
                continue
            parts = [getattr(module, name, None) for name in names]
            if not all(isinstance(p, nn.Linear) and p.bias is None for p in parts):
                continue
            weight = torch.cat([p.weight.detach() for p in parts])
            if weight.numel() < MIN_QUANTIZED_WEIGHTS:
                continue
            setattr(module, fused_name, linear_type.from_weight(weight))
            for name in names:
                delattr(module, name)
            replaced, weights = replaced + len(parts), weights + weight.numel()
    return replaced, weights


def weight_bytes(model: nn.Module) -> int:
    """Bytes a batch-1 step must read at least once: parameters and buffers (int8: one byte).

    The embedding table counts only when the head reads it whole (tied, unquantized): a
    lookup reads one row per step.
    """
    backbone = getattr(model, "backbone", None)
    lookup_only = None if backbone is None or backbone.lm_head is None else backbone.embed_tokens.weight
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t is not lookup_only)
