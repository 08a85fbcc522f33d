"""The start-up calibration: a machine too slow for real time is said before the first call."""

import pytest
from loguru import logger

from pipecat_michi.engine.calibration import StepCalibration, report_calibration
from pipecat_michi.engine.config import EngineConfig
from pipecat_michi.engine.engine import DuplexEngine
from tests.engine.test_engine import _audio, _call, _same


def _logged(calibration: StepCalibration, **kwargs: object) -> list[tuple[str, str]]:
    records: list[tuple[str, str]] = []
    sink = logger.add(lambda m: records.append((m.record["level"].name, m.record["message"])), level="INFO")
    try:
        report_calibration(calibration, **kwargs)  # type: ignore[arg-type]
    finally:
        logger.remove(sink)
    return records


def test_the_verdict_follows_the_step_time_against_the_frame() -> None:
    fast = StepCalibration.from_timings([20.0, 25.0, 90.0], frame_ms=80.0)
    assert fast.step_ms_p50 == 25.0 and fast.step_ms_max == 90.0 and fast.steps == 3
    assert fast.real_time and not fast.tight
    assert StepCalibration.from_timings([70.0], 80.0).tight
    slow = StepCalibration.from_timings([101.0, 99.0, 118.0], frame_ms=80.0)
    assert not slow.real_time and not slow.tight
    with pytest.raises(ValueError):
        StepCalibration.from_timings([], 80.0)

    assert [level for level, _ in _logged(fast, compiled=False, device="cpu")] == ["INFO"]
    [(level, message)] = _logged(slow, compiled=False, device="cpu")
    assert level == "WARNING" and "NOT real time" in message and "101.0 ms" in message
    assert "compile: true" in message and "--device cuda" in message
    # Compiled already: compiling is not offered again; on a GPU, CPU threads are no remedy.
    [(_, message)] = _logged(slow, compiled=True, device="cuda")
    assert "compile" not in message.replace("--device cuda", "") and "torch_threads" not in message
    [(level, message)] = _logged(StepCalibration.from_timings([70.0], 80.0), compiled=False, device="cpu")
    assert level == "WARNING" and "Barely real time" in message


def _config(**overrides: object) -> EngineConfig:
    settings = {"preset": "tiny", "device": "cpu", "slot_capacity": 2, "fill_after_ms": 5000.0} | overrides
    return EngineConfig(**settings)


async def test_the_engine_calibrates_at_start_and_calls_are_as_they_would_be_without() -> None:
    audio = _audio(3, 8)
    async with DuplexEngine(_config(calibration_steps=4)) as engine:
        calibration = engine.calibration
        assert calibration is not None and calibration.steps == 4 and calibration.frame_ms == engine.frame_ms
        assert calibration.step_ms_p50 > 0
        calibrated = await _call(engine, audio, seed=5, prompt="You are Michi.")
        assert engine.stats.ticks == len(audio)  # the idle steps are not ticks
    async with DuplexEngine(_config(calibration_steps=0)) as engine:
        assert engine.calibration is None
        plain = await _call(engine, audio, seed=5, prompt="You are Michi.")
    _same(calibrated, plain)
