"""The GPU path (bf16, int8, CUDA graphs) against float32 on the CPU. Skipped without CUDA;
benchmarks/gpu_check.sh runs them on a GPU machine."""

import copy

import numpy as np
import pytest
import torch

from pipecat_michi.engine.config import EngineConfig
from pipecat_michi.engine.engine import DuplexEngine
from pipecat_michi.engine.settings import SessionSettingsUpdate
from pipecat_michi.model.config import MichiConfig
from pipecat_michi.model.michi import MichiModel
from pipecat_michi.model.parity import compare, run_call, seeded_call_audio
from pipecat_michi.model.quantize import quantize_model
from pipecat_michi.model.runtime import resolve_dtype

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def reference() -> MichiModel:
    torch.manual_seed(0)
    return MichiModel(MichiConfig.preset("tiny")).eval()


def test_auto_dtype_on_cuda_is_bf16() -> None:
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_cuda_bf16_follows_cpu_float32_on_a_seeded_call(reference: MichiModel, quantize: str) -> None:
    audio = seeded_call_audio(reference, frames=25, seed=0)
    expected = run_call(reference, audio, seed=0)
    candidate = quantize_model(copy.deepcopy(reference).to("cuda", torch.bfloat16), quantize)
    agreement = compare(expected, run_call(candidate, audio, seed=0))
    # The bars of the CPU bf16 parity test (tests/model/test_dtypes.py).
    assert agreement.text_agreement >= 0.9 and agreement.latent_cosine >= 0.999, agreement


async def test_a_cuda_graph_engine_gives_the_eager_engines_results() -> None:
    audio = (np.random.default_rng(0).standard_normal((6, 1920)) * 3000).astype(np.int16)

    async def one_call(compile_step: bool) -> list[tuple[str, bool]]:
        config = EngineConfig(preset="tiny", device="cuda", slot_capacity=4, kv_capacity=128,
                              fill_after_ms=5000.0, compile=compile_step)
        async with DuplexEngine(config) as engine:
            session = await engine.open_session(SessionSettingsUpdate(seed=3, speak_threshold=0.3))
            results = []
            for index, frame in enumerate(audio):
                session.push_audio(frame, index)
                result = await session.receive(timeout=60)
                results.append((result.bot_text, result.speaking))
            await session.close()
        return results

    assert await one_call(True) == await one_call(False)
