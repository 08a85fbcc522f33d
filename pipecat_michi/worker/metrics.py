"""A worker's numbers: Prometheus metrics for scraping, JSON stats for benchmarks and routers.

Each ``WorkerMetrics`` owns its own ``CollectorRegistry`` (never the global one), so one process
can hold many apps (tests). The engine's cumulative counters (``EngineStats``) are read at
scrape time by a custom collector rather than copied, so the two can never drift apart.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from typing import Final

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict

from pipecat_michi.engine.engine import DuplexEngine

METRIC_PREFIX: Final = "michi_worker"
# A tick must fit in one 80 ms frame; the buckets resolve 1-200 ms, finer where it matters.
STEP_MS_BUCKETS: Final = (1, 2, 3, 5, 7.5, 10, 15, 20, 25, 30, 40, 50, 60, 70, 80, 100, 125, 150, 200)
# A frame's time in the worker adds the lockstep wait (up to one frame) to the step.
RESIDENCE_MS_BUCKETS: Final = (1, 2, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 100, 120, 150, 200, 300, 500, 1000, 2000)
# Ticks kept for the per-batch-size percentiles of /v1/stats (the engine keeps as many).
TICK_WINDOW: Final = 4096


class StepMsSummary(BaseModel):
    """Percentiles of model step times (one batched step per tick), in milliseconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    count: int
    mean: float | None
    p50: float | None
    p99: float | None


class WorkerStats(BaseModel):
    """The body of ``GET /v1/stats``. Counters are totals since the worker started.

    Parameters:
        slots_in_use: Calls holding a slot now.
        slot_capacity: Slots of the worker.
        ticks: Batched model steps so far.
        step_ms: Step time over the engine's recent window, whatever the batch size.
        step_ms_by_batch: Step time over the recent window, keyed by batch size (calls stepped
            together), so a load test can read the cost of a batch of N.
        late_ticks: Ticks whose step took longer than one frame.
        filled_frames: Input frames that had not arrived in time and were stepped as silence.
        dropped_input_frames: Input frames dropped (too late, or too far ahead).
        unheard_frames_at_close: Input frames still queued when their call ended (it fell behind).
        dropped_outputs: Step results a slow reader lost.
        rejected_calls: Calls refused because the worker was full (close 1013).
        calls_total: Calls that got ``ready``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    slots_in_use: int
    slot_capacity: int
    ticks: int
    step_ms: StepMsSummary
    step_ms_by_batch: dict[int, StepMsSummary]
    late_ticks: int
    filled_frames: int
    dropped_input_frames: int
    unheard_frames_at_close: int
    dropped_outputs: int
    rejected_calls: int
    calls_total: int


def summarize_ms(values: Sequence[float]) -> StepMsSummary:
    """Count, mean, p50 and p99 of ``values`` (``None`` statistics when empty)."""
    if not values:
        return StepMsSummary(count=0, mean=None, p50=None, p99=None)
    array = np.asarray(values, dtype=np.float64)
    p50, p99 = np.percentile(array, [50, 99])
    return StepMsSummary(
        count=len(values), mean=round(float(array.mean()), 3), p50=round(float(p50), 3), p99=round(float(p99), 3)
    )


class _EngineCounters(Collector):
    """Exposes ``EngineStats`` totals as Prometheus counters, read at scrape time."""

    _COUNTERS: Final = {
        "ticks": "Batched model steps.",
        "late_ticks": "Ticks whose model step took longer than one frame.",
        "filled_frames": "Input frames stepped as silence because they had not arrived in time.",
        "dropped_input_frames": "Input frames dropped: after their tick, or too far ahead of it.",
        "unheard_frames_at_close": "Input frames still queued when their call ended: the engine was behind.",
        "dropped_outputs": "Step results dropped because a call's reader fell behind.",
    }

    def __init__(self, engine: DuplexEngine) -> None:
        self._engine = engine

    def collect(self) -> Iterable[Metric]:
        stats = self._engine.stats
        for name, documentation in self._COUNTERS.items():
            yield CounterMetricFamily(f"{METRIC_PREFIX}_{name}", documentation, value=getattr(stats, name))
        window = summarize_ms(list(stats.step_ms))
        for quantile in ("p50", "p99"):
            value = getattr(window, quantile)
            yield GaugeMetricFamily(
                f"{METRIC_PREFIX}_step_ms_{quantile}",
                f"{quantile} of model step time over the last {stats.step_ms.maxlen} ticks, in ms.",
                value=float("nan") if value is None else value,
            )


class WorkerMetrics:
    """The metrics of one worker app; ``observe_tick`` goes into ``engine.tick_observers``."""

    def __init__(self, engine: DuplexEngine) -> None:
        self._engine = engine
        self.registry = CollectorRegistry()
        self.step_ms = Histogram(
            f"{METRIC_PREFIX}_step_ms",
            "Time of one batched model step (one tick), in ms.",
            buckets=STEP_MS_BUCKETS,
            registry=self.registry,
        )
        self.residence_ms = Histogram(
            f"{METRIC_PREFIX}_step_residence_ms",
            "Time from a frame's arrival at the worker to its STEP leaving it, in ms: the wait "
            "for its tick, the model step, and encoding.",
            buckets=RESIDENCE_MS_BUCKETS,
            registry=self.registry,
        )
        self._rejected_calls = Counter(
            f"{METRIC_PREFIX}_rejected_calls",
            "Calls refused because every slot was taken (close 1013).",
            registry=self.registry,
        )
        self._calls = Counter(
            f"{METRIC_PREFIX}_calls", "Calls that were admitted (got ready).", registry=self.registry
        )
        # Prometheus counters cannot be read back through a public API; these can.
        self.rejected_calls_total = 0
        self.calls_total = 0
        Gauge(
            f"{METRIC_PREFIX}_slots_in_use", "Calls holding a slot now.", registry=self.registry
        ).set_function(lambda: engine.sessions_in_use)
        Gauge(
            f"{METRIC_PREFIX}_slot_capacity", "Slots of the worker.", registry=self.registry
        ).set_function(lambda: engine.capacity)
        self.registry.register(_EngineCounters(engine))
        self._ticks: collections.deque[tuple[float, int]] = collections.deque(maxlen=TICK_WINDOW)

    def count_rejected_call(self) -> None:
        self.rejected_calls_total += 1
        self._rejected_calls.inc()

    def count_call(self) -> None:
        self.calls_total += 1
        self._calls.inc()

    def observe_tick(self, step_ms: float, batch: int, late: bool) -> None:
        """Engine tick observer: one batched step of ``batch`` calls took ``step_ms``."""
        self.step_ms.observe(step_ms)
        self._ticks.append((step_ms, batch))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def stats(self) -> WorkerStats:
        """A snapshot for ``GET /v1/stats``."""
        engine_stats = self._engine.stats
        by_batch: dict[int, list[float]] = collections.defaultdict(list)
        for step_ms, batch in self._ticks:
            by_batch[batch].append(step_ms)
        return WorkerStats(
            slots_in_use=self._engine.sessions_in_use,
            slot_capacity=self._engine.capacity,
            ticks=engine_stats.ticks,
            step_ms=summarize_ms(list(engine_stats.step_ms)),
            step_ms_by_batch={batch: summarize_ms(values) for batch, values in sorted(by_batch.items())},
            late_ticks=engine_stats.late_ticks,
            filled_frames=engine_stats.filled_frames,
            dropped_input_frames=engine_stats.dropped_input_frames,
            unheard_frames_at_close=engine_stats.unheard_frames_at_close,
            dropped_outputs=engine_stats.dropped_outputs,
            rejected_calls=self.rejected_calls_total,
            calls_total=self.calls_total,
        )
