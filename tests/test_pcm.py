"""One PCM16 <-> float convention (full scale 32768) for the whole package."""

import numpy as np

from pipecat_michi.pcm import float_to_pcm16, pcm16_to_float


def test_int16_round_trips_exactly_and_full_scale_float_clips() -> None:
    every = np.arange(-32768, 32768, dtype=np.int16)
    assert np.array_equal(float_to_pcm16(pcm16_to_float(every)), every)
    assert pcm16_to_float(np.array([-32768, 16384], dtype=np.int16)).tolist() == [-1.0, 0.5]
    assert float_to_pcm16(np.array([1.0, -1.0, 2.0, 0.5 / 32768])).tolist() == [32767, -32768, 32767, 0]
