"""Audio plumbing between a Pipecat pipeline and a duplex call: any rate in, 24 kHz frames out."""

from __future__ import annotations

import numpy as np
from pipecat.audio.resamplers.base_audio_resampler import SoxrQuality
from pipecat.audio.utils import create_stream_resampler

#: Default resampling quality. soxr releases its output in bursts that grow with the filter
#: length, and a model frame only completes when its last sample is out: caller audio at 8 kHz
#: in 20 ms chunks completes frames 93 ms late on average (160 ms worst) at VHQ, Pipecat's
#: default, 32 ms (40 ms) at LQ and 20 ms (one chunk) at QQ. LQ is still a proper band-limiting
#: filter, ample for speech; VHQ would add most of a frame to every reply on a phone line.
DEFAULT_QUALITY: SoxrQuality = "LQ"


def _to_mono(samples: np.ndarray, num_channels: int) -> np.ndarray:
    if num_channels <= 1:
        return samples
    usable = len(samples) - len(samples) % num_channels
    return samples[:usable].reshape(-1, num_channels).mean(axis=1).astype(np.int16)


class InputFramer:
    """Turns ``InputAudioRawFrame`` payloads of any rate and channel count into the call's frames.

    PCM16 is down-mixed to mono, resampled with Pipecat's stream resampler (which keeps filter
    history across chunks, so no clicks at chunk edges) and cut into exact ``frame_samples``
    frames; the remainder waits for the next chunk. A change of input rate mid-call starts a
    fresh resampler, since a stream resampler serves one rate pair.
    """

    def __init__(self, sample_rate_hz: int, frame_samples: int, quality: SoxrQuality = DEFAULT_QUALITY) -> None:
        self.sample_rate_hz = sample_rate_hz
        self.frame_samples = frame_samples
        self._quality: SoxrQuality = quality
        self._resampler = create_stream_resampler(quality=quality)
        self._in_rate: int | None = None
        self._pending = np.zeros(0, dtype=np.int16)

    async def push(self, audio: bytes, sample_rate: int, num_channels: int = 1) -> list[np.ndarray]:
        """Add one chunk; return the complete frames it finishes (often none, sometimes several)."""
        samples = _to_mono(np.frombuffer(audio, dtype=np.int16), num_channels)
        if sample_rate != self.sample_rate_hz:
            if self._in_rate != sample_rate:
                self._resampler = create_stream_resampler(quality=self._quality)
                self._in_rate = sample_rate
            resampled = await self._resampler.resample(samples.tobytes(), sample_rate, self.sample_rate_hz)
            samples = np.frombuffer(resampled, dtype=np.int16)
        if len(samples) == 0:
            return []
        pending = np.concatenate([self._pending, samples])
        whole = len(pending) // self.frame_samples
        frames = [pending[i * self.frame_samples : (i + 1) * self.frame_samples] for i in range(whole)]
        self._pending = pending[whole * self.frame_samples :].copy()
        return frames


class OutputResampler:
    """The call's 24 kHz PCM16 to the pipeline's output rate (a no-op when they match)."""

    def __init__(self, in_rate_hz: int, out_rate_hz: int, quality: SoxrQuality = DEFAULT_QUALITY) -> None:
        self.in_rate_hz = in_rate_hz
        self.out_rate_hz = out_rate_hz
        self._resampler = create_stream_resampler(quality=quality)

    async def convert(self, pcm: np.ndarray) -> bytes:
        audio = pcm.astype(np.int16, copy=False).tobytes()
        if self.in_rate_hz == self.out_rate_hz:
            return audio
        return await self._resampler.resample(audio, self.in_rate_hz, self.out_rate_hz)

    async def reset(self) -> None:
        """Forget the filter history: the next audio is a new speech run."""
        await self._resampler.reset()
