"""Latency through MichiLLMService: what the Pipecat plugin adds to a model step, and TTFA.

Three figures, each over real-time paced caller audio:

1. **bare call**: ``send_audio`` -> ``receive`` on a ``DuplexCall`` directly (engine queueing,
   model step, result delivery; no Pipecat), next to the model step alone (``step_ms``);
2. **service step**: an ``InputAudioRawFrame`` entering the service -> the ``TTSAudioRawFrame``
   for that step leaving it (matched by the frame index the service stamps on its output);
   service minus bare call is what the plugin adds (framing, resampling, frames, locks);
3. **TTFA**: 1 s of tone, then silence; from the end of the tone to the first bot audio frame.
   With random weights the model takes no real turns; the run says what it did.

    .venv/bin/python benchmarks/service_latency.py
    .venv/bin/python benchmarks/service_latency.py --input-rate 8000 --chunk-ms 20 --seconds 20
    .venv/bin/python benchmarks/service_latency.py --worker-url ws://127.0.0.1:8765/v1/call --token T
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Callable

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from loguru import logger  # noqa: E402
from pipecat.frames.frames import EndFrame, Frame, InputAudioRawFrame, TTSAudioRawFrame  # noqa: E402
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineParams, PipelineWorker  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

from pipecat_michi.engine.call import DuplexBackend, LocalEngine  # noqa: E402
from pipecat_michi.engine.config import EngineConfig  # noqa: E402
from pipecat_michi.engine.settings import SessionSettingsUpdate  # noqa: E402
from pipecat_michi.worker.protocol import SAMPLE_RATE_HZ  # noqa: E402
from pipecat_michi.service import FRAME_INDEX_METADATA_KEY, MichiLLMService, MichiSettings  # noqa: E402

MODEL_RATE = SAMPLE_RATE_HZ
FRAME_SAMPLES = 1920
FRAME_S = FRAME_SAMPLES / MODEL_RATE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="local engine preset (random weights)")
    parser.add_argument("--checkpoint", default=None,
                        help="local engine checkpoint (wins over --preset), e.g. pipecat_michi/assets/michi-tiny-demo")
    parser.add_argument("--device", default="auto", help="local engine device")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of the local engine (default: torch's choice)")
    parser.add_argument("--seconds", type=float, default=10.0, help="caller audio per latency run")
    parser.add_argument("--input-rate", type=int, default=24000, help="caller audio sample rate (Hz)")
    parser.add_argument("--chunk-ms", type=int, default=80, help="caller audio chunk (transports: 20)")
    parser.add_argument("--speak-threshold", type=float, default=0.1,
                        help="latency runs: low, so the random model speaks every step")
    parser.add_argument("--worker-url", default=None, help="time a RemoteWorker instead of the local engine")
    parser.add_argument("--token", default=None, help="bearer token for --worker-url")
    parser.add_argument("--warmup", type=int, default=5, help="untimed frames at the start of each run")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def percentiles(values: list[float]) -> str:
    if not values:
        return "no samples"
    p50, p99 = np.percentile(values, [50, 99])
    return f"p50 {p50:6.1f} ms  p99 {p99:6.1f} ms  (n={len(values)})"


def make_backend(args: argparse.Namespace) -> DuplexBackend:
    if args.worker_url:
        from pipecat_michi.worker.client import RemoteWorker  # the remote path, when present

        return RemoteWorker(args.worker_url, args.token)
    return LocalEngine(
        EngineConfig(preset=args.preset, checkpoint=args.checkpoint, device=args.device, seed=args.seed,
                     torch_threads=args.threads)
    )


def step_ms_since(backend: DuplexBackend, start: int) -> list[float]:
    if isinstance(backend, LocalEngine):
        return list(backend.engine.stats.step_ms)[start:]
    return []


def step_count(backend: DuplexBackend) -> int:
    return len(backend.engine.stats.step_ms) if isinstance(backend, LocalEngine) else 0


def noise(samples: int, rate: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(samples) * 3000).astype(np.int16)


def tone_then_silence(rate: int, tone_s: float, silence_s: float) -> np.ndarray:
    t = np.arange(int(rate * tone_s)) / rate
    tone = (np.sin(2 * np.pi * 220 * t) * 8000).astype(np.int16)
    return np.concatenate([tone, np.zeros(int(rate * silence_s), dtype=np.int16)])


async def paced(count: int, period_s: float):
    """Yield 0..count-1 on a real-time schedule (absolute deadlines: no drift)."""
    start = time.perf_counter()
    for i in range(count):
        delay = start + i * period_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        yield i


async def bare_call(backend: DuplexBackend, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """send_audio -> receive round trips on a call, paced at one frame per 80 ms."""
    call = await backend.open_call(SessionSettingsUpdate(seed=args.seed, speak_threshold=args.speak_threshold))
    audio = noise(int(args.seconds * MODEL_RATE), MODEL_RATE, args.seed)
    first_step = step_count(backend)
    latencies = []
    try:
        async for i in paced(len(audio) // FRAME_SAMPLES, FRAME_S):
            sent = time.perf_counter()
            await call.send_audio(audio[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES], i)
            result = await call.receive(timeout=10)
            assert result.frame_index == i, "a frame was filled or dropped: the machine is too slow"
            latencies.append((time.perf_counter() - sent) * 1000)
    finally:
        await call.close()
    return latencies[args.warmup :], step_ms_since(backend, first_step)[args.warmup :]


class Probe(FrameProcessor):
    """Calls ``on_frame(frame, now)`` for every frame passing, then passes it on."""

    def __init__(self, on_frame: Callable[[Frame, float], None]) -> None:
        super().__init__(enable_direct_mode=True)  # no queue: the timestamp is the push time
        self._on_frame = on_frame

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            self._on_frame(frame, time.perf_counter())
        await self.push_frame(frame, direction)


class ServiceRun:
    """Caller audio through ``[probe, MichiLLMService, probe]`` in real time; records timings."""

    def __init__(self, service: MichiLLMService, audio: np.ndarray, rate: int, chunk_ms: int) -> None:
        self.service, self.audio, self.rate = service, audio, rate
        self.chunk = rate * chunk_ms // 1000
        self.chunk_s = chunk_ms / 1000
        self.frame_done_at: dict[int, float] = {}  # model frame index -> when its last chunk came in
        self.chunk_in_at: list[float] = []
        self.audio_out: list[tuple[int, float]] = []  # (frame index, when it left the service)
        self._input_s = 0.0

    def _on_input(self, frame: Frame, now: float) -> None:
        if not isinstance(frame, InputAudioRawFrame):
            return
        self.chunk_in_at.append(now)
        self._input_s += frame.num_frames / frame.sample_rate
        # The model frame k is complete once (k + 1) * 80 ms of caller audio is in.
        k = len(self.frame_done_at)
        while (k + 1) * FRAME_S <= self._input_s + 1e-9:
            self.frame_done_at[k] = now
            k += 1

    def _on_output(self, frame: Frame, now: float) -> None:
        if isinstance(frame, TTSAudioRawFrame):
            self.audio_out.append((frame.metadata.get(FRAME_INDEX_METADATA_KEY, -1), now))

    async def run(self, tail_s: float = 1.0) -> None:
        pipeline = Pipeline([Probe(self._on_input), self.service, Probe(self._on_output)])
        params = PipelineParams(audio_in_sample_rate=self.rate, audio_out_sample_rate=MODEL_RATE)
        worker = PipelineWorker(pipeline, params=params, cancel_on_idle_timeout=False)
        started = asyncio.Event()

        @worker.event_handler("on_pipeline_started")
        async def _on_started(worker: PipelineWorker, frame: Frame) -> None:
            started.set()

        runner = WorkerRunner()
        await runner.add_workers(worker)
        running = asyncio.create_task(runner.run())
        try:
            await asyncio.wait_for(started.wait(), timeout=120)
            chunks = len(self.audio) // self.chunk
            async for i in paced(chunks, self.chunk_s):
                pcm = self.audio[i * self.chunk : (i + 1) * self.chunk]
                await worker.queue_frame(InputAudioRawFrame(audio=pcm.tobytes(), sample_rate=self.rate, num_channels=1))
            await asyncio.sleep(tail_s)
            await worker.queue_frame(EndFrame())
            await asyncio.wait_for(running, timeout=30)
        finally:
            if not running.done():
                running.cancel()

    def step_latencies_ms(self) -> list[tuple[int, float]]:
        """(frame index, ms from its last caller chunk in to its bot audio out)."""
        return [(k, (out - self.frame_done_at[k]) * 1000) for k, out in self.audio_out if k in self.frame_done_at]


async def service_steps(backend: DuplexBackend, args: argparse.Namespace) -> tuple[list[float], list[float], int]:
    settings = MichiSettings(seed=args.seed, speak_threshold=args.speak_threshold)
    service = MichiLLMService(backend, settings=settings)
    audio = noise(int(args.seconds * args.input_rate), args.input_rate, args.seed + 1)
    first_step = step_count(backend)
    run = ServiceRun(service, audio, args.input_rate, args.chunk_ms)
    await run.run()
    timed = [ms for k, ms in run.step_latencies_ms() if k >= args.warmup]
    return timed, step_ms_since(backend, first_step)[args.warmup :], len(run.frame_done_at) - args.warmup


async def ttfa(backend: DuplexBackend, args: argparse.Namespace) -> None:
    tone_s, silence_s = 1.0, 3.0
    service = MichiLLMService(backend, settings=MichiSettings(seed=args.seed))  # default threshold
    run = ServiceRun(service, tone_then_silence(args.input_rate, tone_s, silence_s), args.input_rate, args.chunk_ms)
    await run.run(tail_s=0.5)
    tone_chunks = int(tone_s * 1000) // args.chunk_ms
    utterance_end = run.chunk_in_at[tone_chunks - 1]
    spoke = {k for k, _ in run.audio_out}
    tone_frames = int(tone_s / FRAME_S)
    total = len(run.frame_done_at)
    print(f"TTFA run: {tone_s:.0f} s tone + {silence_s:.0f} s silence at speak_threshold 0.5, {total} model frames")
    print(f"  bot audio in {len([k for k in spoke if k < tone_frames])}/{tone_frames} frames of the tone and "
          f"{len([k for k in spoke if tone_frames <= k < total])}/{total - tone_frames} frames of the silence")
    # A turn start after the utterance: an audio frame whose previous frame had none.
    starts = [t for k, t in run.audio_out if t > utterance_end and k - 1 not in spoke]
    if starts:
        print(f"  TTFA (end of tone -> first audio of a bot turn starting after it): "
              f"{(starts[0] - utterance_end) * 1000:.1f} ms")
    elif any(t > utterance_end for _, t in run.audio_out):
        print("  no bot turn started after the tone: the random model was already speaking and spoke through "
              "it, so TTFA is undefined here. Its floor with a trained model is the decision delay (frames "
              "the model waits) x 80 ms + one service step (p50 above).")
    else:
        print("  the random model stayed silent after the tone: no TTFA to report.")


async def main(args: argparse.Namespace) -> None:
    logger.remove()
    logger.add(lambda m: print(m, end=""), level="WARNING")
    backend = make_backend(args)
    if isinstance(backend, LocalEngine):
        await backend.engine.start()
        threads = args.threads or "default"
        device = backend.engine.model.device
        model = f"checkpoint {args.checkpoint}" if args.checkpoint else f"preset {args.preset} (random weights)"
        where = f"local engine, {model} on {device}, {threads} threads"
    else:
        where = f"remote worker {args.worker_url}"
    print(f"MichiLLMService latency: {where}; caller audio {args.input_rate} Hz in {args.chunk_ms} ms chunks, "
          f"real-time paced, {args.seconds:.0f} s per run\n")
    try:
        call_ms, call_steps = await bare_call(backend, args)
        service_ms, service_steps_ms, frames = await service_steps(backend, args)
        print(f"model step (engine step_ms)       {percentiles(call_steps + service_steps_ms)}")
        print(f"bare call send->receive           {percentiles(call_ms)}")
        print(f"service InputAudio->TTSAudio      {percentiles(service_ms)}   "
              f"[{len(service_ms)} of {frames} frames spoke]")
        if call_ms and service_ms:
            added = np.percentile(service_ms, 50) - np.percentile(call_ms, 50)
            added99 = np.percentile(service_ms, 99) - np.percentile(call_ms, 99)
            print(f"plugin overhead over the bare call: p50 {added:+.1f} ms, p99 {added99:+.1f} ms")
        if args.input_rate != MODEL_RATE:
            print("  (service figures count from the chunk that completes 80 ms of caller audio, so they "
                  "include the input resampler's buffering)")
        print()
        await ttfa(backend, args)
    finally:
        await backend.close()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
