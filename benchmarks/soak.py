"""Soak: K concurrent real-time calls for M minutes through the Ray Serve application.

Starts a local Ray cluster and the MichiAI Serve app (``pipecat_michi.worker.serve``, CPU
replicas of the ``tiny`` model unless told otherwise) behind Serve's proxy on a loopback port.
K caller loops then run for M minutes; each places a call of a random length
(``--call-seconds``), streams noise one 80 ms frame at a time on an absolute schedule, hangs
up and calls again, so slots are taken and freed all along. It prints:

- calls placed, completed, refused (every replica full) and failed (lost mid-call);
- round trip p50/p99 (frame sent -> its STEP back, through proxy and replica), late % (steps
  whose tick overran the 80 ms frame), filled % (stepped as silence: the frame came too late),
  and STEPs the client dropped for not reading fast enough;
- leaked slots: slots still in use on the replicas once every call has hung up (must be 0);
- memory: each replica's resident set (RSS) after a warm-up, every ``--sample-s`` during the
  soak, and after it: flat means no per-call leak (a leak grows with the calls placed).

    .venv/bin/python benchmarks/soak.py                          # 8 calls, 2 minutes, 2 replicas
    .venv/bin/python benchmarks/soak.py --calls 16 --minutes 10 --replicas 2 --slots 8
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from loguru import logger

sys.path.insert(0, str(Path(__file__).parent))
from worker_load import FRAME_S, CallTrace, drive_call, free_port  # noqa: E402 - benchmarks are scripts, not a package

from pipecat_michi.engine.settings import SessionSettingsUpdate  # noqa: E402
from pipecat_michi.worker.client import RemoteWorker, WorkerError, WorkerUnavailableError  # noqa: E402
from pipecat_michi.worker.retry import RetryPolicy  # noqa: E402
from pipecat_michi.worker.serve import ReplicaStats, replica_stats, serving  # noqa: E402

FRAME_SAMPLES = 1920


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=8, help="concurrent caller loops (K)")
    parser.add_argument("--minutes", type=float, default=2.0, help="how long the callers keep calling (M)")
    parser.add_argument("--replicas", type=int, default=2, help="Serve replicas")
    parser.add_argument("--slots", type=int, help="slots per replica (default: enough for every call)")
    parser.add_argument("--call-seconds", type=float, nargs=2, default=(4.0, 12.0), metavar=("MIN", "MAX"),
                        help="length of each call, drawn uniformly")
    parser.add_argument("--preset", default="tiny", help="model preset of the replicas")
    parser.add_argument("--device", default="cpu", help="replicas' device (cuda: one GPU per replica)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per CPU replica")
    parser.add_argument("--sample-s", type=float, default=30.0, help="RSS sampling period")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.calls < 1 or args.replicas < 1 or args.minutes <= 0:
        parser.error("--calls and --replicas must be >= 1, --minutes > 0")
    if args.slots is None:
        args.slots = math.ceil(args.calls / args.replicas)
    return args


@dataclass
class SoakTotals:
    placed: int = 0
    completed: int = 0
    refused: int = 0
    failed: int = 0
    steps: int = 0
    expected_steps: int = 0
    late: int = 0
    filled: int = 0
    dropped_steps: int = 0
    round_trips_ms: list[float] = field(default_factory=list)

    def add(self, trace: CallTrace, frames: int, dropped_steps: int) -> None:
        self.steps += trace.steps
        self.expected_steps += frames
        self.late += len(trace.late)
        self.filled += len(trace.filled)
        self.dropped_steps += dropped_steps
        self.round_trips_ms.extend(trace.round_trips_ms())


def _rss_mb(pid: int) -> float:
    """Resident set of a local process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def _caller(backend: RemoteWorker, loop_id: int, end_s: float, args: argparse.Namespace,
                  totals: SoakTotals) -> None:
    rng = random.Random(args.seed * 1000 + loop_id)
    noise = np.random.default_rng(args.seed * 1000 + loop_id)
    while time.perf_counter() < end_s:
        frames = max(2, round(rng.uniform(*args.call_seconds) / FRAME_S))
        totals.placed += 1
        try:
            call = await backend.open_call(SessionSettingsUpdate(seed=rng.randrange(2**31), speak_threshold=0.3))
        except WorkerUnavailableError:
            totals.refused += 1
            await asyncio.sleep(0.5)  # every replica full: a real dialer would back off too
            continue
        audio = (noise.standard_normal((frames, FRAME_SAMPLES)) * 1000).astype(np.int16)
        try:
            trace = await drive_call(call, audio, time.perf_counter() + rng.uniform(0, FRAME_S))
        except WorkerError as exc:
            totals.failed += 1
            logger.warning(f"call lost mid-stream: {exc}")
            continue
        finally:
            await call.close()
        totals.completed += trace.steps == frames
        totals.failed += trace.steps != frames
        totals.add(trace, frames, call.dropped_steps)


async def _sample_rss(replicas: dict[str, tuple[int, float]], samples: dict[str, list[float]], period_s: float) -> None:
    while True:
        await asyncio.sleep(period_s)
        for name, (pid, _) in replicas.items():
            try:
                samples[name].append(_rss_mb(pid))
            except (OSError, RuntimeError):
                pass  # the replica went away; its series just stops


async def _replicas(app_name: str, expected: int) -> list[ReplicaStats]:
    async with asyncio.timeout(60):
        while len(stats := await replica_stats(app_name)) < expected:
            await asyncio.sleep(0.5)
    return stats


async def _warm_up(backend: RemoteWorker, replicas: int) -> None:
    """One short call per replica, so the memory baseline is taken after first-use allocations."""
    calls = [await backend.open_call() for _ in range(replicas)]
    for index in range(10):
        for call in calls:
            await call.send_audio(np.zeros(FRAME_SAMPLES, dtype=np.int16), index)
        for call in calls:
            await call.receive(timeout=20)
    for call in calls:
        await call.close()


async def soak(url: str, token: str, args: argparse.Namespace) -> None:
    backend = RemoteWorker(url, token, connect_timeout_s=10, retry=RetryPolicy(first_delay_s=0.05, budget_s=2.0))
    await _replicas("michi", args.replicas)
    await _warm_up(backend, args.replicas)
    before = {s.actor_name: (s.pid, _rss_mb(s.pid)) for s in await replica_stats("michi")}
    totals = SoakTotals()
    started = time.perf_counter()
    end_s = started + args.minutes * 60.0
    samples: dict[str, list[float]] = {name: [rss] for name, (_, rss) in before.items()}
    sampler = asyncio.create_task(_sample_rss(before, samples, args.sample_s))
    try:
        await asyncio.gather(*(_caller(backend, k, end_s, args, totals) for k in range(args.calls)))
    finally:
        sampler.cancel()
    elapsed = time.perf_counter() - started
    await asyncio.sleep(1.0)  # hung-up calls reach their replicas within a tick; give them one second
    after = await replica_stats("michi")

    rtt = np.asarray(totals.round_trips_ms)
    p50, p99 = np.percentile(rtt, [50, 99]) if rtt.size else (float("nan"), float("nan"))
    steps = max(1, totals.steps)
    print(f"soak: {args.calls} caller loops for {elapsed / 60:.1f} min on {args.replicas} replica(s) x "
          f"{args.slots} slot(s), {args.preset} on {args.device}")
    print(f"calls: {totals.placed} placed, {totals.completed} completed, {totals.refused} refused (all full), "
          f"{totals.failed} failed")
    print(f"steps: {totals.steps}/{totals.expected_steps} received, round trip p50 {p50:.1f} ms / p99 {p99:.1f} ms, "
          f"late {100 * totals.late / steps:.2f}%, filled {100 * totals.filled / steps:.2f}%, "
          f"dropped by the client {totals.dropped_steps}")
    print(f"leaked slots after hang-up: {sum(s.slots_in_use for s in after)} "
          f"(open sockets: {sum(s.calls for s in after)})")
    for stats in after:
        pid, rss_before = before.get(stats.actor_name, (stats.pid, float("nan")))
        rss_after = _rss_mb(stats.pid)
        note = "" if pid == stats.pid else " (replica was replaced)"
        series = " ".join(f"{mb:.0f}" for mb in samples.get(stats.actor_name, []))
        print(f"replica {stats.actor_name.rsplit('#', 1)[-1]} pid {stats.pid}: RSS {rss_before:.1f} -> "
              f"{rss_after:.1f} MB ({rss_after - rss_before:+.1f} MB), {stats.ticks} ticks{note}; "
              f"every {args.sample_s:g} s: {series} MB")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    token = secrets.token_urlsafe(24)
    os.environ["MICHI_WORKER_TOKEN"] = token  # checked here by build_app; replicas get it from runtime_env
    engine = {"preset": args.preset, "device": args.device, "slot_capacity": args.slots}
    if args.device == "cpu":
        engine["torch_threads"] = args.threads
    app_args = {
        "min_replicas": args.replicas,
        "max_replicas": args.replicas,
        "graceful_shutdown_timeout_s": 5,
        "worker": {"engine": engine, "max_call_s": max(args.call_seconds) + 60},
    }
    ray_options = {
        "include_dashboard": False,
        "log_to_driver": False,
        "runtime_env": {"env_vars": {"MICHI_WORKER_TOKEN": token, "HF_HUB_OFFLINE": "1", "LOGURU_LEVEL": "WARNING"}},
    }
    if args.device == "cpu":
        ray_options["num_cpus"] = max(os.cpu_count() or 1, args.replicas)  # logical CPUs for the replicas
    with serving(app_args, port=free_port(), ray_options=ray_options) as url:
        asyncio.run(soak(url, token, args))


if __name__ == "__main__":
    main()
