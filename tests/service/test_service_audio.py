"""Caller audio of any rate and channel count becomes exact 24 kHz model frames."""

import numpy as np
import pytest

from pipecat_michi.service.audio import InputFramer, OutputResampler


@pytest.mark.parametrize(("rate", "channels"), [(8000, 1), (16000, 1), (48000, 2), (24000, 1)])
async def test_chunks_become_exact_frames(rate: int, channels: int) -> None:
    framer = InputFramer(24000, 1920)
    chunk = np.zeros(rate // 50 * channels, dtype=np.int16)  # 20 ms
    frames = []
    for _ in range(50):  # 1 s
        frames += await framer.push(chunk.tobytes(), rate, channels)
    # 12.5 frames per second, less what the resampler still holds.
    assert len(frames) == 12
    assert all(f.shape == (1920,) and f.dtype == np.int16 for f in frames)


async def test_stereo_is_mixed_down() -> None:
    framer = InputFramer(24000, 1920)
    left_right = np.tile(np.array([1000, 3000], dtype=np.int16), 1920)
    (frame,) = await framer.push(left_right.tobytes(), 24000, 2)
    assert np.all(frame == 2000)


async def test_output_is_resampled_only_when_rates_differ() -> None:
    pcm = (np.sin(np.arange(1920) / 10) * 8000).astype(np.int16)
    assert await OutputResampler(24000, 24000).convert(pcm) == pcm.tobytes()
    out = OutputResampler(24000, 8000)
    total = sum([len(await out.convert(pcm)) for _ in range(5)]) // 2
    assert 5 * 640 - 640 <= total <= 5 * 640
