"""MichiAI in pure PyTorch: no asyncio, no Pipecat."""

from pipecat_michi.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pipecat_michi.model.config import MichiConfig
from pipecat_michi.model.michi import MichiModel, Sampling, StepNoise, StepOutput

__all__ = [
    "CheckpointError",
    "MichiConfig",
    "MichiModel",
    "Sampling",
    "StepNoise",
    "StepOutput",
    "load_checkpoint",
    "save_checkpoint",
]
