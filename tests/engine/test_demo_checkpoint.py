"""The demo checkpoint is package data, named "demo", and the embedded default."""

from pathlib import Path

from pipecat_michi.engine.call import LocalEngine
from pipecat_michi.engine.config import DEMO_CHECKPOINT, EngineConfig


def test_demo_names_the_packaged_checkpoint_and_local_engine_runs_it_by_default() -> None:
    assert (DEMO_CHECKPOINT / "model.safetensors").is_file() and (DEMO_CHECKPOINT / "config.json").is_file()
    assert EngineConfig(checkpoint="demo").checkpoint == EngineConfig(checkpoint=Path("demo")).checkpoint == DEMO_CHECKPOINT
    assert EngineConfig().checkpoint is None  # a bare config still means the preset
    assert LocalEngine().engine.config.checkpoint == DEMO_CHECKPOINT
