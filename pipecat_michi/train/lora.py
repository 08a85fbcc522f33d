"""Backbone LoRA for the speaking stages, through peft.

peft wraps each target ``nn.Linear`` of the backbone in place (``inject_adapter_in_model``);
only the adapters learn. A checkpoint stores them under ``model/lora.py``'s names, and
``load_adapters`` puts them back into a wrapped backbone when a run resumes or continues.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

from pipecat_michi.model.config import BackboneLoraConfig
from pipecat_michi.model.lora import LORA_A, LORA_B, LoraError
from pipecat_michi.model.michi import MichiModel

_PREFIX = "backbone."


def attach_lora(model: MichiModel, cfg: BackboneLoraConfig, seed: int) -> list[torch.nn.Parameter]:
    """Wrap the backbone's ``cfg.targets`` projections with fresh adapters (``B`` = 0, so the
    model computes exactly what it did) and record ``cfg`` in the model's config; return the
    adapters' parameters."""
    if model.config.lora is not None and model.config.lora != cfg:
        raise LoraError(f"the model already has adapters {model.config.lora}, not {cfg}")
    torch.manual_seed(seed)  # peft draws A from the global generator
    peft_config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0,
                             target_modules=list(cfg.targets), bias="none")
    inject_adapter_in_model(peft_config, model.backbone)
    model.config = model.config.model_copy(update={"lora": cfg})
    params = [p for name, p in model.backbone.named_parameters() if ".lora_" in name]
    if not params:
        raise LoraError(f"no backbone module matches the LoRA targets {cfg.targets}")
    return params


def load_adapters(model: MichiModel, adapters: dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's adapter tensors into the wrapped backbone; every adapter must land."""
    state = {}
    for key, value in adapters.items():
        if not key.startswith(_PREFIX) or not key.endswith((LORA_A, LORA_B)):
            raise LoraError(f"{key!r} is not a backbone adapter tensor")
        state[key[len(_PREFIX):]] = value
    result = set_peft_model_state_dict(model.backbone, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise LoraError(f"adapter tensors for modules without adapters: {unexpected[:3]}")
    expected = {k for k in model.backbone.state_dict() if ".lora_" in k}
    if len(expected) != len(state):
        raise LoraError(f"the checkpoint has {len(state)} adapter tensors, the backbone {len(expected)}")


@contextmanager
def adapters_disabled(module: torch.nn.Module) -> Iterator[None]:
    """Inside, ``module`` computes with its pretrained weights alone (the teacher that keeps an
    adapted backbone's text ability, ``stages._text_terms``); the adapters and their
    ``requires_grad`` come back on exit."""
    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise LoraError("the module has no adapters to disable")
    learning = {name: p.requires_grad for name, p in module.named_parameters() if ".lora_" in name}
    for layer in layers:
        layer.enable_adapters(False)  # also clears the adapters' requires_grad
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for name, p in module.named_parameters():
            if name in learning:
                p.requires_grad_(learning[name])
