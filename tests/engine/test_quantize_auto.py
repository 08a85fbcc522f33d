"""quantize="auto": int8-dynamic where a CPU step is bandwidth bound, nothing elsewhere."""

import torch

from pipecat_michi.engine.config import EngineConfig, load_model, resolve_quantize
from pipecat_michi.model.config import MichiConfig
from pipecat_michi.model.michi import MichiModel
from pipecat_michi.model.quantize import Int8DynamicLinear


def test_auto_picks_int8_dynamic_only_for_a_big_backbone_on_the_cpu() -> None:
    tiny, nano = MichiModel(MichiConfig.preset("tiny")), MichiModel(MichiConfig.preset("michi-nano"))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_quantize("auto", cpu, tiny) == "none"
    assert resolve_quantize("auto", cpu, nano) == "int8-dynamic"
    assert resolve_quantize("auto", cuda, nano) == "none"  # bf16 on a GPU
    assert resolve_quantize("int8", cpu, tiny) == "int8"  # an explicit mode always wins


def test_the_default_engine_config_leaves_the_tiny_model_in_float() -> None:
    model, _ = load_model(EngineConfig(preset="tiny", device="cpu"))
    assert EngineConfig().quantize == "auto"
    assert not any(isinstance(m, Int8DynamicLinear) for m in model.modules())
