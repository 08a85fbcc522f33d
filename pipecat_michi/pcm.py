"""PCM16 <-> float samples, one convention everywhere: full scale is 32768.

int16 ``x`` is ``x / 32768`` as a float in [-1, 1); a float is scaled by 32768, rounded and
clipped to [-32768, 32767]. So int16 -> float -> int16 is exact, and +1.0 (which int16 cannot
hold) clips to 32767.
"""

from __future__ import annotations

import numpy as np

PCM16_FULL_SCALE = 32768.0


def pcm16_to_float(pcm: np.ndarray) -> np.ndarray:
    """int16 samples as float32 in [-1, 1)."""
    return pcm.astype(np.float32) / PCM16_FULL_SCALE


def float_to_pcm16(samples: np.ndarray) -> np.ndarray:
    """Float samples (nominally in [-1, 1]) as int16, rounded and clipped."""
    scaled = np.rint(np.asarray(samples, dtype=np.float32) * PCM16_FULL_SCALE)
    return np.clip(scaled, -PCM16_FULL_SCALE, PCM16_FULL_SCALE - 1).astype(np.int16)
