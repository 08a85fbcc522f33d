"""Worker load: N concurrent real-time calls over the WebSocket protocol, per N.

Starts ``michi-worker`` as a subprocess on a free loopback port (or targets ``--url``), then for
each N opens N calls with ``RemoteWorker`` and streams ``--frames`` frames of noise on each, one
frame every 80 ms on an absolute schedule (real time, no drift). It prints, per N:

- round trip p50/p99: send of frame i -> its STEP back, over the steps that used their frame
  (a filled step did not wait for it);
- late %: ticks whose model step overran the 80 ms frame; filled %: steps stepped as silence
  because their frame had not arrived;
- engine step p50/p99 at batch N (``GET /v1/stats``, ticks that stepped exactly N calls);
- batching gain: N x (step at batch 1) / (step at batch N), the work a batched tick saves;
- protocol overhead: round trip - engine step (p50 - p50, p99 - p99);
- and, on means (which add up where percentiles do not), round trip = step + wait + wire, with
  the worker's residence histogram (frame in -> its STEP out, from ``/metrics``):
  - wait = residence - step: the frame waiting in the worker for its tick (lockstep batching:
    a call whose frames arrive just after a tick waits up to one frame) and STEP encoding;
  - wire = round trip - residence: codecs, sockets and both event loops.

The client runs on the same machine as the worker and shares its cores.

    .venv/bin/python benchmarks/worker_load.py
    .venv/bin/python benchmarks/worker_load.py --calls 1 8 --frames 100 --phases random
    .venv/bin/python benchmarks/worker_load.py --url ws://gpu-host:8765/v1/call --token "$TOKEN"
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import numpy as np
from loguru import logger
from prometheus_client.parser import text_string_to_metric_families

from pipecat_michi.engine.settings import SessionSettingsUpdate
from pipecat_michi.worker.client import RemoteCall, RemoteWorker
from pipecat_michi.worker.metrics import METRIC_PREFIX, StepMsSummary, WorkerStats
from pipecat_michi.worker.protocol import CALL_PATH
from pipecat_michi.worker.retry import RetryPolicy
from pipecat_michi.worker.app import STATS_PATH

FRAME_S = 0.080
DEFAULT_CALLS = (1, 4, 16, 64)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", nargs="+", type=int, default=list(DEFAULT_CALLS), help="concurrent calls, per run")
    parser.add_argument("--frames", type=int, default=50, help="80 ms frames per call")
    parser.add_argument(
        "--phases",
        choices=("aligned", "random"),
        default="aligned",
        help="aligned: every call sends at the same instants (isolates protocol cost); random: each "
        "call's frames start at a random point of the 80 ms period, as independent callers would "
        "(round trips then include the lockstep tick waiting for the latest frame)",
    )
    parser.add_argument("--url", help="target a running worker (ws://host:port/v1/call) instead of starting one")
    parser.add_argument("--token", default=os.environ.get("MICHI_WORKER_TOKEN"), help="its token (or MICHI_WORKER_TOKEN)")
    parser.add_argument("--preset", default="tiny", help="started worker: model preset")
    parser.add_argument("--device", default="cpu", help="started worker: device")
    parser.add_argument("--dtype", help="started worker: auto, float32, bfloat16, float16")
    parser.add_argument("--quantize", choices=("none", "int8", "int8-dynamic"), help="started worker: weight quantization")
    parser.add_argument("--compile", action="store_true", help="started worker: torch.compile the step")
    parser.add_argument("--ready-timeout-s", type=float, default=120.0,
                        help="started worker: how long loading (and compiling) may take before /readyz")
    parser.add_argument("--slots", type=int, help="started worker: slot capacity (default: the largest N)")
    parser.add_argument(
        "--threads",
        type=int,
        help="started worker: torch CPU threads (default on CPU: one core less than the machine's, "
        "which leaves a core to the event loops of worker and client)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads is None and args.device == "cpu" and not args.url:
        args.threads = max(1, (os.cpu_count() or 2) - 1)
    if args.url and not args.token:
        parser.error("--url needs --token (or MICHI_WORKER_TOKEN)")
    if min(args.calls) < 1 or args.frames < 2:
        parser.error("--calls must be >= 1 and --frames >= 2")
    return args


@dataclass
class CallTrace:
    """What one call saw: send and receive times per frame index, and the step flags."""

    sent_s: dict[int, float]
    received_s: dict[int, float]
    filled: set[int]
    late: set[int]  # steps whose tick overran the frame
    steps: int = 0

    def round_trips_ms(self) -> list[float]:
        """Send -> STEP back per frame, over the steps that used their frame (a filled step did
        not wait for it)."""
        return [
            (self.received_s[i] - sent) * 1000.0
            for i, sent in self.sent_s.items()
            if i in self.received_s and i not in self.filled
        ]


@dataclass(frozen=True)
class RunResult:
    calls: int
    steps: int
    expected_steps: int
    round_trip_ms: np.ndarray
    late_pct: float
    filled_pct: float
    step: StepMsSummary
    residence_mean_ms: float | None


def free_port() -> int:
    """A loopback TCP port free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def started_worker(args: argparse.Namespace, token: str) -> Iterator[str]:
    """``michi-worker`` in a subprocess on a free loopback port; yields its call URL."""
    port = free_port()
    slots = args.slots or max(args.calls)
    command = [
        sys.executable, "-m", "pipecat_michi.worker.cli", "--port", str(port), "--preset", args.preset,
        "--device", args.device, "--slots", str(slots), "--log-level", "warning",
        *(["--dtype", args.dtype] if args.dtype else []),
        *(["--quantize", args.quantize] if args.quantize else []),
        *(["--compile"] if args.compile else []),
    ]  # fmt: skip
    env = dict(os.environ, MICHI_WORKER_TOKEN=token, LOGURU_LEVEL="WARNING")
    if args.threads:
        env["MICHI_WORKER_ENGINE__TORCH_THREADS"] = str(args.threads)
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(f"http://127.0.0.1:{port}", process, log, args.ready_timeout_s)
            yield f"ws://127.0.0.1:{port}{CALL_PATH}"
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(http_url: str, process: subprocess.Popen, log, timeout_s: float) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise SystemExit(f"michi-worker exited with {process.returncode}:\n{log.read()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{http_url}/readyz", timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise SystemExit(f"michi-worker was not ready within {timeout_s:.0f} s (--ready-timeout-s)")


def _http_url(call_url: str) -> str:
    parts = urlsplit(call_url)
    return f"{'https' if parts.scheme == 'wss' else 'http'}://{parts.netloc}"


async def _stats(http: httpx.AsyncClient, token: str) -> WorkerStats:
    response = await http.get(STATS_PATH, headers={"Authorization": f"Bearer {token}"})
    response.raise_for_status()
    return WorkerStats.model_validate(response.json())


async def _residence_totals(http: httpx.AsyncClient) -> tuple[float, float]:
    """(sum in ms, count) of the worker's step residence histogram so far."""
    response = await http.get("/metrics")
    response.raise_for_status()
    totals = {"sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(response.text):
        if family.name == f"{METRIC_PREFIX}_step_residence_ms":
            for sample in family.samples:
                suffix = sample.name.rsplit("_", 1)[-1]
                if suffix in totals:
                    totals[suffix] = sample.value
    return totals["sum"], totals["count"]


async def drive_call(call: RemoteCall, frames: np.ndarray, start_s: float) -> CallTrace:
    """Stream ``frames`` on ``call`` in real time from ``start_s`` (perf_counter) on, one
    every 80 ms on an absolute schedule, and record when each STEP comes back."""
    trace = CallTrace(sent_s={}, received_s={}, filled=set(), late=set())

    async def send() -> None:
        for index, frame in enumerate(frames):
            await asyncio.sleep(max(0.0, start_s + index * FRAME_S - time.perf_counter()))
            trace.sent_s[index] = time.perf_counter()
            await call.send_audio(frame, index)

    async def receive() -> None:
        last = len(frames) - 1
        while True:
            step = await call.receive(timeout=5)
            trace.received_s[step.frame_index] = time.perf_counter()
            trace.steps += 1
            if step.filled:
                trace.filled.add(step.frame_index)
            if step.late:
                trace.late.add(step.frame_index)
            if step.frame_index >= last:
                return

    sender = asyncio.create_task(send())
    try:
        await receive()
    except TimeoutError:
        pass  # steps missing: counted below as steps < expected
    finally:
        await sender
    return trace


async def run_calls(
    backend: RemoteWorker, http: httpx.AsyncClient, token: str, calls: int, args: argparse.Namespace
) -> RunResult:
    rng = np.random.default_rng(args.seed)
    phases = random.Random(args.seed)
    audio = (rng.standard_normal((calls, args.frames, 1920)) * 1000).astype(np.int16)
    before, residence_before = await _stats(http, token), await _residence_totals(http)
    opened = await asyncio.gather(
        *(backend.open_call(SessionSettingsUpdate(seed=args.seed + k, speak_threshold=0.3)) for k in range(calls))
    )
    start_s = time.perf_counter() + 0.3
    offsets = [phases.uniform(0, FRAME_S) if args.phases == "random" else 0.0 for _ in range(calls)]
    traces = await asyncio.gather(*(drive_call(c, a, start_s + o) for c, a, o in zip(opened, audio, offsets)))
    await asyncio.gather(*(call.close() for call in opened))
    after, residence_after = await _stats(http, token), await _residence_totals(http)
    residence_ms, residence_count = (a - b for a, b in zip(residence_after, residence_before))

    round_trips = [ms for trace in traces for ms in trace.round_trips_ms()]
    steps = sum(trace.steps for trace in traces)
    ticks = after.ticks - before.ticks
    return RunResult(
        calls=calls,
        steps=steps,
        expected_steps=calls * args.frames,
        round_trip_ms=np.asarray(round_trips),
        late_pct=100.0 * (after.late_ticks - before.late_ticks) / max(1, ticks),
        filled_pct=100.0 * sum(len(trace.filled) for trace in traces) / max(1, steps),
        step=after.step_ms_by_batch.get(calls, StepMsSummary(count=0, mean=None, p50=None, p99=None)),
        residence_mean_ms=residence_ms / residence_count if residence_count else None,
    )


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or np.isnan(value) else f"{value:.{digits}f}"


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def print_table(results: list[RunResult]) -> None:
    single = next((r.step.p50 for r in results if r.calls == 1), None)
    columns = (
        ("N", 4), ("steps", 11), ("rtt p50", 8), ("rtt p99", 8), ("late%", 6), ("filled%", 8),
        ("step p50", 9), ("step p99", 9), ("gain", 6), ("ovh p50", 8), ("ovh p99", 8),
        ("| mean: rtt", 11), ("= step", 7), ("+ wait", 7), ("+ wire", 7),
    )  # fmt: skip
    header = " ".join(f"{name:>{width}}" for name, width in columns)
    print(header)
    print("-" * len(header))
    for r in results:
        rtt = r.round_trip_ms
        rtt50, rtt99 = np.percentile(rtt, [50, 99]) if rtt.size else (None, None)
        rtt_mean = float(rtt.mean()) if rtt.size else None
        cells = (
            str(r.calls), f"{r.steps}/{r.expected_steps}", _fmt(rtt50), _fmt(rtt99), _fmt(r.late_pct),
            _fmt(r.filled_pct), _fmt(r.step.p50), _fmt(r.step.p99),
            _fmt(r.calls * single / r.step.p50 if single and r.step.p50 else None, 2),
            _fmt(_minus(rtt50, r.step.p50)), _fmt(_minus(rtt99, r.step.p99)),
            _fmt(rtt_mean), _fmt(r.step.mean), _fmt(_minus(r.residence_mean_ms, r.step.mean)),
            _fmt(_minus(rtt_mean, r.residence_mean_ms)),
        )  # fmt: skip
        print(" ".join(f"{cell:>{width}}" for cell, (_, width) in zip(cells, columns)))
    print(
        "ms. step: engine step at batch N (/v1/stats). gain: N x step(1) / step(N) at p50. "
        "ovh: rtt - step. wait: time in the worker beyond the step (waiting for its tick, "
        "encoding). wire: time outside the worker (codecs, sockets, event loops)."
    )


async def bench(url: str, token: str, args: argparse.Namespace) -> list[RunResult]:
    backend = RemoteWorker(url, token, retry=RetryPolicy.once(), ready_timeout_s=60)
    results = []
    async with httpx.AsyncClient(base_url=_http_url(url), timeout=10) as http:
        for calls in args.calls:
            started = time.perf_counter()
            results.append(await run_calls(backend, http, token, calls, args))
            print(f"N={calls}: done in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    if args.url:
        target = f"worker at {args.url}"
        results = asyncio.run(bench(args.url, args.token, args))
    else:
        token = secrets.token_urlsafe(24)
        threads = f", {args.threads} torch threads" if args.threads else ""
        target = f"michi-worker subprocess, preset {args.preset} on {args.device}{threads}, {args.slots or max(args.calls)} slots"
        with started_worker(args, token) as url:
            results = asyncio.run(bench(url, token, args))
    print(f"worker load: {target}; {args.frames} frames of 80 ms per call, real time, {args.phases} phases; "
          f"{os.cpu_count()} CPU cores shared by client and worker")  # fmt: skip
    print_table(results)


if __name__ == "__main__":
    main()
