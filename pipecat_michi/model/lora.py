"""Backbone LoRA adapters in a checkpoint: how they are named, and merging them for inference.

A checkpoint stores each adapted projection's factors beside the model's own tensors, under
peft's names without the adapter name: ``backbone.layers.3.self_attn.q_proj.lora_A.weight``
(``[rank, in]``) and ``...lora_B.weight`` (``[out, rank]``). Loading for inference merges them
(``W += scale * B @ A``); training keeps them apart (``train/lora.py``).
"""

from __future__ import annotations

import re

import torch

from pipecat_michi.model.config import BackboneLoraConfig

LORA_A = ".lora_A.weight"
LORA_B = ".lora_B.weight"


class LoraError(ValueError):
    """Adapter tensors that do not match the model they are loaded into."""


# peft's module wrapper names: the frozen layer, and one factor per named adapter.
_PEFT_BASE = ".base_layer."
_PEFT_ADAPTER = re.compile(r"\.(lora_[AB])\.[^.]+\.weight$")


def peft_state_to_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``state_dict`` under the checkpoint's names: a peft-wrapped projection's frozen weight
    back under its own name (``q_proj.base_layer.weight`` -> ``q_proj.weight``), its factors
    without the adapter's name (``q_proj.lora_A.default.weight`` -> ``q_proj.lora_A.weight``).
    A model without adapters passes through unchanged."""
    renamed = {}
    for key, value in state.items():
        key = _PEFT_ADAPTER.sub(r".\1.weight", key.replace(_PEFT_BASE, "."))
        if key in renamed:
            raise LoraError(f"two tensors map to {key!r}: a model with more than one adapter")
        renamed[key] = value
    return renamed


def is_lora_key(key: str) -> bool:
    return key.endswith(LORA_A) or key.endswith(LORA_B)


def split_lora(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(model tensors, adapter tensors)`` of a checkpoint's tensors."""
    adapters = {k: v for k, v in tensors.items() if is_lora_key(k)}
    return {k: v for k, v in tensors.items() if k not in adapters}, adapters


def adapted_modules(adapters: dict[str, torch.Tensor]) -> list[str]:
    """The module paths (``backbone.layers.0.self_attn.q_proj``) the adapters belong to."""
    return sorted({k[: -len(LORA_A)] for k in adapters if k.endswith(LORA_A)})


@torch.no_grad()
def merge_lora(model: torch.nn.Module, adapters: dict[str, torch.Tensor], cfg: BackboneLoraConfig) -> int:
    """Add ``scale * B @ A`` into each adapted ``nn.Linear`` of ``model``; return how many.

    Checked before any weight changes: every ``A`` has its ``B``, the modules exist, the shapes
    and the rank match. The product runs in float32 whatever the weights' dtype.
    """
    modules = adapted_modules(adapters)
    if len(adapters) != 2 * len(modules):
        raise LoraError("LoRA tensors come in lora_A/lora_B pairs; some are missing their partner")
    updates = []
    for path in modules:
        try:
            linear = model.get_submodule(path)
        except AttributeError as exc:
            raise LoraError(f"LoRA adapter for {path}, which the model does not have") from exc
        a, b = adapters[path + LORA_A], adapters[path + LORA_B]
        out_features, in_features = linear.weight.shape
        if a.shape != (cfg.rank, in_features) or b.shape != (out_features, cfg.rank):
            raise LoraError(
                f"LoRA adapter for {path}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit "
                f"rank {cfg.rank} on a {in_features}->{out_features} projection"
            )
        updates.append((linear, cfg.scale * (b.float() @ a.float())))
    for linear, delta in updates:
        linear.weight.add_(delta.to(linear.weight.device, linear.weight.dtype))
    return len(updates)
