"""The compiled step: padded to fixed batch sizes, compiled before the first call, equal to eager."""

import asyncio

import numpy as np
import pytest
from torch._dynamo.utils import counters

from pipecat_michi.engine.batch import SlotBatch
from pipecat_michi.engine.config import EngineConfig, load_model
from pipecat_michi.engine.engine import DuplexEngine, StepResult
from pipecat_michi.engine.settings import SessionSettingsUpdate

FRAME = 1920


def _config(**overrides: object) -> EngineConfig:
    settings: dict[str, object] = {"preset": "tiny", "device": "cpu", "slot_capacity": 4, "kv_capacity": 128,
                                   "fill_after_ms": 5000.0}
    return EngineConfig(**(settings | overrides))


def _audio(seed: int, frames: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((frames, FRAME)) * 3000).astype(np.int16)


async def _calls(engine: DuplexEngine, count: int, frames: int) -> list[list[StepResult]]:
    sessions = [await engine.open_session(SessionSettingsUpdate(seed=i, speak_threshold=0.3)) for i in range(count)]

    async def stream(session, audio: np.ndarray) -> list[StepResult]:  # noqa: ANN001
        results = []
        for index, frame in enumerate(audio):
            session.push_audio(frame, index)
            results.append(await session.receive(timeout=30))
        await session.close()
        return results

    return list(await asyncio.gather(*(stream(s, _audio(i, frames)) for i, s in enumerate(sessions))))


def _assert_same(got: list[list[StepResult]], expected: list[list[StepResult]]) -> None:
    for got_call, expected_call in zip(got, expected, strict=True):
        assert [(r.bot_text, r.transcript, r.speaking) for r in got_call] == [
            (r.bot_text, r.transcript, r.speaking) for r in expected_call
        ]
        for x, y in zip(got_call, expected_call):
            assert x.speak_prob == pytest.approx(y.speak_prob, abs=1e-4)
            if x.audio is not None:
                assert np.abs(x.audio.astype(int) - y.audio.astype(int)).max() <= 4


async def test_slot_churn_within_a_batch_size_never_recompiles_and_results_equal_eager() -> None:
    # Dynamo's graph capture with the eager backend: the same guards and recompiles as inductor,
    # without inductor's minute of code generation on a small CI machine.
    config = _config(compile=True)
    model, tokenizer = load_model(config)
    model.compile_step(backend="eager")
    counters.clear()
    async with DuplexEngine(config, model, tokenizer) as engine:
        assert engine._batch.batch_sizes == [1, 2, 4]
        warmed = counters["stats"]["unique_graphs"]
        assert warmed >= 3  # one graph per batch size, before any call
        # The start-up calibration stepped the compiled step too (the batch-1 graph the warm-up built).
        assert engine.calibration is not None and engine.calibration.steps == config.calibration_steps
        three = await _calls(engine, 3, frames=4)  # rows 0-2, padded to 4
        two = await _calls(engine, 2, frames=3)  # rows 0-1: batch size 2
        four = await _calls(engine, 4, frames=3)  # rows 0-3
        assert counters["stats"]["unique_graphs"] == warmed
    async with DuplexEngine(_config()) as eager:
        _assert_same(three, await _calls(eager, 3, frames=4))
        _assert_same(two, await _calls(eager, 2, frames=3))
        _assert_same(four, await _calls(eager, 4, frames=3))


def test_batches_pad_to_the_next_size_up_to_the_slot_capacity() -> None:
    model, _ = load_model(_config())
    batch = SlotBatch(model, slot_capacity=5, kv_capacity=64, evict_fraction=0.125, compiled=True)
    assert batch.batch_sizes == [1, 2, 4, 5]
    assert [batch.rows_for(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 4, 5]
    eager = SlotBatch(model, slot_capacity=5, kv_capacity=64, evict_fraction=0.125)
    assert eager.rows_for(3) == 3


@pytest.mark.slow
@pytest.mark.timeout(600)  # inductor compiles two batch sizes: about a minute each on 2 busy cores
async def test_the_inductor_compiled_step_equals_eager() -> None:
    config = _config(compile=True, slot_capacity=2)
    async with DuplexEngine(config) as engine:
        assert engine.model.step_is_compiled
        compiled = await _calls(engine, 2, frames=4)
    async with DuplexEngine(_config(slot_capacity=2)) as eager:
        _assert_same(compiled, await _calls(eager, 2, frames=4))
