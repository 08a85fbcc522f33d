"""Causal convolutions that run offline on a whole signal or online, chunk by chunk.

Streaming state is explicit and functional. Moshi's ``modules/streaming.py`` keeps it on the
module; here it is passed in and handed back, so an engine can batch many independent streams:

- ``init_state(batch_size)`` returns the zero state, a flat ``dict[str, Tensor]`` in which every
  tensor has the batch as dim 0. Zero state is a fresh stream: silence before its first sample.
- ``step(x, state)`` returns ``(output, new_state)`` and never writes into ``state``, so a caller
  can keep inactive rows with ``torch.where`` or restart a row by zeroing it.
- ``forward(x)`` steps the whole signal from the zero state. Chunked stepping gives the same
  output because each state carries exactly the context the next chunk needs.

A parent module's state is the union of its children's, each key prefixed with the child's
path (``"blocks.2.downsample.history"``), the way ``state_dict`` names parameters.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

StreamingState = dict[str, torch.Tensor]


def prefixed(prefix: str, state: StreamingState) -> StreamingState:
    """A child's state as part of its parent's: every key under ``prefix.``."""
    return {f"{prefix}.{key}": value for key, value in state.items()}


def unprefixed(prefix: str, state: StreamingState) -> StreamingState:
    """The child's part of a parent's state (the keys under ``prefix.``, without it)."""
    # The trailing dot keeps "blocks.1." from matching "blocks.10.".
    head = f"{prefix}."
    return {key[len(head):]: value for key, value in state.items() if key.startswith(head)}


def _streaming_children(module: nn.Module, path: str = "") -> Iterator[tuple[str, StreamingModule]]:
    """The nearest ``StreamingModule`` descendants, looking through plain containers."""
    for name, child in module.named_children():
        child_path = f"{path}{name}"
        if isinstance(child, StreamingModule):
            yield child_path, child
        else:
            yield from _streaming_children(child, f"{child_path}.")


class StreamingModule(nn.Module):
    """A module with explicit, functional streaming state (see this file's docstring).

    Leaves override ``init_state`` and ``step``; a composite only overrides ``step``, calling
    ``_step_child`` for each streaming submodule, and inherits ``init_state``.
    """

    def init_state(
        self,
        batch_size: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> StreamingState:
        """Zero state: the union of the streaming submodules' states, keyed by their paths."""
        state: StreamingState = {}
        for path, child in _streaming_children(self):
            state.update(prefixed(path, child.init_state(batch_size, device, dtype)))
        return state

    def step(self, x: torch.Tensor, state: StreamingState) -> tuple[torch.Tensor, StreamingState]:
        """Process the next chunk ``x``; return its output and the state after it."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Offline: the whole signal ``x`` as one chunk of a fresh stream."""
        return self.step(x, self.init_state(x.shape[0], x.device, x.dtype))[0]

    def _step_child(
        self, path: str, x: torch.Tensor, state: StreamingState, new_state: StreamingState
    ) -> torch.Tensor:
        """Step the submodule at ``path`` on its part of ``state``; put its new state in
        ``new_state``."""
        child = self.get_submodule(path)
        y, child_state = child.step(x, unprefixed(path, state))
        new_state.update(prefixed(path, child_state))
        return y


def _zeros_like_param(
    param: torch.Tensor,
    shape: tuple[int, ...],
    device: torch.device | None,
    dtype: torch.dtype | None,
) -> torch.Tensor:
    return torch.zeros(shape, device=device or param.device, dtype=dtype or param.dtype)


class StreamingConv1d(StreamingModule):
    """Causal 1-D convolution over ``[batch, channels, time]``.

    Offline and streaming alike, ``T`` inputs (a multiple of ``stride``) give ``T // stride``
    outputs. The state ``history`` holds the last ``(kernel_size - 1) * dilation + 1 - stride``
    input samples, the left context the next chunk's first output needs.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.stride = stride
        self.history_samples = (kernel_size - 1) * dilation + 1 - stride
        if self.history_samples < 0:
            raise ValueError(
                f"StreamingConv1d: stride {stride} exceeds the dilated kernel span "
                f"{(kernel_size - 1) * dilation + 1}; inputs would be skipped"
            )
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation)

    def init_state(
        self,
        batch_size: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> StreamingState:
        shape = (batch_size, self.conv.in_channels, self.history_samples)
        return {"history": _zeros_like_param(self.conv.weight, shape, device, dtype)}

    def step(self, x: torch.Tensor, state: StreamingState) -> tuple[torch.Tensor, StreamingState]:
        if x.shape[-1] % self.stride:
            raise ValueError(
                f"StreamingConv1d: chunk of {x.shape[-1]} samples is not a multiple of "
                f"stride {self.stride}"
            )
        x = torch.cat([state["history"], x], dim=-1)
        history = x[..., x.shape[-1] - self.history_samples :]
        return _conv1d(self.conv, x), {"history": history}


# conv -> its weight reordered once into oneDNN's blocked layout, with the key it was made from.
_PACKED: weakref.WeakKeyDictionary[nn.Conv1d, tuple[tuple, torch.Tensor | None]] = weakref.WeakKeyDictionary()
_PACK_FAILED = object()


def _conv1d(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``; on the CPU at inference, through a weight prepacked for oneDNN.

    An eager ``nn.Conv1d`` reorders its weight into oneDNN's blocked layout on every call: the
    vocoder's ~90 convs per frame re-read and re-write all their weights each step. Packed once
    (as ``torch.compile``'s CPU backend does), a bf16 conv at the vocoder's shapes ran 1.2-2.5x
    faster. The pack is cached per conv and rebuilt when the weight changes (dtype, storage,
    in-place update); training, autograd and other devices take the plain path.
    """
    weight = conv.weight
    if (
        x.device.type != "cpu"
        or torch.is_grad_enabled()
        or torch.compiler.is_compiling()  # inductor packs its own
        or x.dtype != weight.dtype
        or x.dtype not in (torch.float32, torch.bfloat16)
        or conv.groups != 1
        or conv.padding != (0,)
    ):
        return conv(x)
    version = 0 if weight.is_inference() else weight._version  # inference tensors have none
    key = (weight.data_ptr(), version, weight.dtype, conv.bias is None or conv.bias.data_ptr())
    entry = _PACKED.get(conv)
    if entry is None or entry[0] != key:
        try:
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                weight.detach().unsqueeze(2).to_mkldnn(),
                [0, 0],
                [1, conv.stride[0]],
                [1, conv.dilation[0]],
                1,
                [x.shape[0], conv.in_channels, 1, x.shape[-1]],
            )
        except (RuntimeError, NotImplementedError):  # a build without oneDNN
            packed = _PACK_FAILED
        entry = (key, packed)
        _PACKED[conv] = entry
    packed = entry[1]
    if packed is _PACK_FAILED:
        return conv(x)
    y = torch.ops.mkldnn._convolution_pointwise(
        x.unsqueeze(2), packed, conv.bias, [0, 0], [1, conv.stride[0]], [1, conv.dilation[0]], 1, "none", [], ""
    )
    return y.squeeze(2)


class StreamingConvTranspose1d(StreamingModule):
    """Causal transposed 1-D convolution over ``[batch, channels, time]``, as in Moshi.

    ``T`` inputs give ``T * stride`` outputs. The last ``kernel_size - stride`` samples of each
    chunk's raw output still await the next chunk's contribution: they are kept as the state
    ``tail`` and overlap-added into the next chunk (offline, the final tail is dropped).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        if kernel_size < stride:
            raise ValueError(
                f"StreamingConvTranspose1d: kernel_size {kernel_size} < stride {stride} "
                "would leave gaps in the output"
            )
        self.stride = stride
        self.tail_samples = kernel_size - stride
        self.conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride)

    def init_state(
        self,
        batch_size: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> StreamingState:
        shape = (batch_size, self.conv.out_channels, self.tail_samples)
        return {"tail": _zeros_like_param(self.conv.weight, shape, device, dtype)}

    def step(self, x: torch.Tensor, state: StreamingState) -> tuple[torch.Tensor, StreamingState]:
        y = self.conv(x)
        y = y + F.pad(state["tail"], (0, y.shape[-1] - self.tail_samples))
        length = x.shape[-1] * self.stride
        # The chunk that emits a sample adds its bias; the carried tail must not add it twice.
        tail = y[..., length:] - self.conv.bias[:, None]
        return y[..., :length], {"tail": tail}
