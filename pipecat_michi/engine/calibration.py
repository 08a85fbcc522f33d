"""Whether this machine steps the model in real time: timed at start-up, before any call.

A duplex call needs one model step per 80 ms frame. A machine slower than that cannot keep up:
a call's frames queue, those past ``max_queued_frames`` are dropped, and the model hears
pieces of the caller (seen on a 2-core AVX2-only EPYC: michi-nano's step took ~100 ms where a
VNNI Xeon took 37 ms, and the simulated call heard half its sentence). Nothing in a call says
why, so the engine times a few idle steps when it starts and says it, loudly, once.
"""

from __future__ import annotations

import statistics
import time

from loguru import logger
from pydantic import BaseModel, ConfigDict, Field

from pipecat_michi.engine.batch import SlotBatch

# Untimed steps first: an eager step's first runs allocate (and a compiled one's were compiled
# by the warm-up already, so these cost it nothing new).
CALIBRATION_WARMUP_STEPS = 2
# A step over this share of the frame leaves no room for the event loop, the transports and
# jitter: calls run, but the first burst puts them behind.
TIGHT_SHARE_OF_FRAME = 0.8


class StepCalibration(BaseModel):
    """One batch-1 step's time on this machine, measured at start-up (all rows idle: every part
    of the model runs, nothing changes), against the frame it must fit in."""

    model_config = ConfigDict(frozen=True)

    step_ms_p50: float = Field(ge=0.0)
    step_ms_max: float = Field(ge=0.0)
    frame_ms: float = Field(gt=0.0)
    steps: int = Field(ge=1)

    @property
    def real_time(self) -> bool:
        """A typical step fits in a frame: calls keep up."""
        return self.step_ms_p50 <= self.frame_ms

    @property
    def tight(self) -> bool:
        """Real time, but with little room for anything else on the machine."""
        return self.real_time and self.step_ms_p50 > TIGHT_SHARE_OF_FRAME * self.frame_ms

    @classmethod
    def from_timings(cls, step_ms: list[float], frame_ms: float) -> StepCalibration:
        if not step_ms:
            raise ValueError("a calibration needs at least one timed step")
        return cls(step_ms_p50=statistics.median(step_ms), step_ms_max=max(step_ms), frame_ms=frame_ms,
                   steps=len(step_ms))

    def summary(self) -> str:
        return (f"a batch-1 step takes {self.step_ms_p50:.1f} ms (p50 of {self.steps}, max "
                f"{self.step_ms_max:.1f}) for each {self.frame_ms:.0f} ms frame")


def calibrate_step(batch: SlotBatch, steps: int, frame_ms: float) -> StepCalibration:
    """Time ``steps`` idle steps of the smallest batch (after untimed warm-up). Model thread only."""
    rows = batch.rows_for(1)
    for _ in range(CALIBRATION_WARMUP_STEPS):
        batch.idle_step(rows)
    timings = []
    for _ in range(steps):
        started = time.perf_counter()
        batch.idle_step(rows)  # ends with its outputs on the host: a GPU step is synchronised
        timings.append((time.perf_counter() - started) * 1000.0)
    return StepCalibration.from_timings(timings, frame_ms)


def report_calibration(calibration: StepCalibration, *, compiled: bool, device: str) -> None:
    """Log the verdict: INFO when calls keep up, WARNING (with what to do) when they cannot."""
    if calibration.real_time and not calibration.tight:
        logger.info(f"Real time: {calibration.summary()}")
        return
    remedies = ["a GPU worker (michi-worker --device cuda; the service's worker backend)"]
    if device == "cpu":
        if not compiled:
            remedies.append("compile: true (torch.compile of the step)")
        remedies.append("more torch_threads on a machine with spare cores")
    advice = "; ".join(remedies)
    if calibration.real_time:
        logger.warning(f"Barely real time: {calibration.summary()}; other load on this machine will put "
                       f"calls behind. Headroom: {advice}")
    else:
        logger.warning(f"NOT real time: {calibration.summary()}. Calls will fall behind: their frames queue, "
                       "frames past the queue's limit are dropped and the model misses what the caller said. "
                       f"Use {advice}")
