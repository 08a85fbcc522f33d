"""Shared by the examples: run a pipeline on synthetic caller audio, no transport needed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
from pipecat.frames.frames import EndFrame, InputAudioRawFrame, LLMRunFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.workers.runner import WorkerRunner

CHUNK_S = 0.02  # what a WebRTC transport delivers: 20 ms chunks...
RATE_HZ = 16000  # ...at 16 kHz
CHUNK_SAMPLES = int(CHUNK_S * RATE_HZ)


def tone(i: int) -> np.ndarray:
    """Chunk ``i`` of a warbling tone, int16."""
    t = np.arange(CHUNK_SAMPLES) / RATE_HZ + i * CHUNK_S
    return (np.sin(2 * np.pi * (220 + 40 * np.sin(i / 10)) * t) * 6000).astype(np.int16)


async def run_smoke_call(
    pipeline: Pipeline,
    seconds: float,
    chunk: Callable[[int], np.ndarray] = tone,
    audio_out_sample_rate: int | None = None,
) -> None:
    """Start ``pipeline``, feed ``seconds`` of caller audio in real time, then end it cleanly."""
    params = PipelineParams(audio_in_sample_rate=RATE_HZ)
    if audio_out_sample_rate:
        params.audio_out_sample_rate = audio_out_sample_rate
    worker = PipelineWorker(pipeline, params=params, cancel_on_idle_timeout=False)
    runner = WorkerRunner()
    await runner.add_workers(worker)
    running = asyncio.create_task(runner.run())
    await worker.queue_frame(LLMRunFrame())
    for i in range(int(seconds / CHUNK_S)):
        await worker.queue_frame(InputAudioRawFrame(chunk(i).tobytes(), sample_rate=RATE_HZ, num_channels=1))
        await asyncio.sleep(CHUNK_S)  # paced like a live transport
    await asyncio.sleep(0.5)  # let the last model steps come back before the end
    await worker.queue_frame(EndFrame())
    await running
