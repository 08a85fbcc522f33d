"""Whisper's exact log-mel front-end, offline and streaming, plus a streaming 24 -> 16 kHz resampler.

Whisper's weights only mean something on Whisper's features: 16 kHz audio, a 400-sample periodic
Hann window, hop 160, power spectrum, Slaney-scale mel filters with Slaney area normalisation
(librosa's default, what ``mel_filters.npz`` holds), ``log10(max(x, 1e-10))``, a floor at
``max - 8`` and ``(x + 4) / 4``. :func:`log_mel_spectrogram` is that, bit for bit up to float
rounding (tested against transformers' ``WhisperFeatureExtractor``).

Streaming differs from offline Whisper in three documented ways:

- **Framing**: offline Whisper centres each STFT window (reflect padding at the clip start);
  streaming cannot look 200 samples ahead, so mel frame ``t`` covers samples
  ``[160 t - 240, 160 t + 160)`` (the ``n_fft - hop`` history is carried, zeros at call start):
  the features are Whisper's on audio delayed by 40 samples (2.5 ms).
- **Floor**: the global maximum of the clip is unknown while streaming, so the ``max - 8`` floor
  uses the running maximum of the call so far (carried in the state). Offline, the same thing is
  a cumulative maximum over time (:func:`running_max_floor`), so streaming == offline exactly.
  It only differs from Whisper's where a frame is quieter than 8 decades (80 dB) under the
  loudest frame: frames before the first loud frame can keep quieter detail than Whisper would.
- **Resampling**: the model's audio is 24 kHz; :class:`PolyphaseResampler` is a causal
  windowed-sinc FIR (up 2, down 3), ``(taps - 1) / 2`` samples of delay at the 48 kHz
  intermediate rate (1.33 ms for the default 129 taps).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

WHISPER_SAMPLE_RATE_HZ = 16000
WHISPER_N_FFT = 400
WHISPER_HOP = 160
LOG_FLOOR = -10.0  # log10 of the 1e-10 clamp: the lowest value a log-mel can take
DYNAMIC_RANGE = 8.0  # Whisper keeps 8 decades under the maximum


def _hz_to_mel_slaney(hz: torch.Tensor) -> torch.Tensor:
    # Linear below 1 kHz (200/3 Hz per mel), logarithmic above: librosa's htk=False scale.
    f_sp, min_log_hz = 200.0 / 3.0, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    linear = hz / f_sp
    log = min_log_mel + torch.log(torch.clamp(hz, min=min_log_hz) / min_log_hz) / logstep
    return torch.where(hz >= min_log_hz, log, linear)


def _mel_to_hz_slaney(mel: torch.Tensor) -> torch.Tensor:
    f_sp, min_log_hz = 200.0 / 3.0, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    linear = mel * f_sp
    log = min_log_hz * torch.exp(logstep * (mel - min_log_mel))
    return torch.where(mel >= min_log_mel, log, linear)


def slaney_mel_filters(n_fft: int, n_mels: int, sample_rate_hz: int) -> torch.Tensor:
    """Slaney mel filters ``[n_fft // 2 + 1, n_mels]`` float32, as librosa's
    ``filters.mel(sr, n_fft, n_mels)`` (htk=False, norm="slaney") and Whisper's ``mel_filters.npz``."""
    fft_hz = torch.linspace(0.0, sample_rate_hz / 2, n_fft // 2 + 1, dtype=torch.float64)
    top = _hz_to_mel_slaney(torch.tensor(sample_rate_hz / 2, dtype=torch.float64))
    mel_points = torch.linspace(0.0, float(top), n_mels + 2, dtype=torch.float64)
    hz_points = _mel_to_hz_slaney(mel_points)
    lower, center, upper = hz_points[:-2], hz_points[1:-1], hz_points[2:]
    rising = (fft_hz[:, None] - lower) / (center - lower)
    falling = (upper - fft_hz[:, None]) / (upper - center)
    filters = torch.clamp(torch.minimum(rising, falling), min=0.0) * (2.0 / (upper - lower))
    return filters.to(torch.float32)


def _power_mel(frames_audio: torch.Tensor, filters: torch.Tensor, window: torch.Tensor, center: bool) -> torch.Tensor:
    spec = torch.stft(frames_audio, WHISPER_N_FFT, WHISPER_HOP, window=window, center=center, return_complex=True)
    if center:
        spec = spec[..., :-1]  # Whisper drops the last centred frame
    return torch.log10(torch.clamp((spec.abs() ** 2).transpose(-1, -2) @ filters, min=1e-10))


def log_mel_spectrogram(audio_16k: torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """Offline Whisper features: ``[B, samples]`` at 16 kHz -> ``[B, samples // 160, n_mels]`` (float32)."""
    audio = audio_16k.to(torch.float32)
    filters = slaney_mel_filters(WHISPER_N_FFT, n_mels, WHISPER_SAMPLE_RATE_HZ).to(audio.device)
    window = torch.hann_window(WHISPER_N_FFT, dtype=torch.float32, device=audio.device)
    log_spec = _power_mel(audio, filters, window, center=True)
    peak = log_spec.amax(dim=(-1, -2), keepdim=True)
    return (torch.maximum(log_spec, peak - DYNAMIC_RANGE) + 4.0) / 4.0


def running_max_floor(log_spec: torch.Tensor, start_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Streaming form of Whisper's ``max - 8`` floor and scaling.

    ``log_spec [B, T, n_mels]`` float32, ``start_max [B]`` the running maximum before these
    frames. Returns the scaled features and the running maximum after them.
    """
    frame_peak = log_spec.amax(dim=-1)
    running = torch.cummax(torch.maximum(frame_peak, start_max[:, None]), dim=1).values
    scaled = (torch.maximum(log_spec, running[..., None] - DYNAMIC_RANGE) + 4.0) / 4.0
    return scaled, running[:, -1]


class PolyphaseResampler(nn.Module):
    """Causal rational resampler (windowed-sinc FIR, Kaiser window) with carried history.

    Output sample ``m`` depends on inputs up to its own time only, so chunked calls equal one
    call over the concatenation exactly (given the carried history). Delay: ``(taps - 1) / 2``
    samples at ``up * in_rate``.
    """

    def __init__(self, in_rate_hz: int, out_rate_hz: int, taps: int = 129, kaiser_beta: float = 8.0) -> None:
        super().__init__()
        g = math.gcd(in_rate_hz, out_rate_hz)
        self.up, self.down = out_rate_hz // g, in_rate_hz // g
        self.identity = self.up == self.down
        self.in_rate_hz = in_rate_hz
        self.history = taps - 1  # at the upsampled rate
        fast_rate = in_rate_hz * self.up
        cutoff_hz = 0.475 * min(in_rate_hz, out_rate_hz)  # a little under the lower Nyquist
        t = torch.arange(taps, dtype=torch.float64) - (taps - 1) / 2
        ideal = 2 * cutoff_hz / fast_rate * torch.sinc(2 * cutoff_hz / fast_rate * t)
        kernel = ideal * torch.kaiser_window(taps, periodic=False, beta=kaiser_beta, dtype=torch.float64)
        kernel = kernel * self.up  # zero insertion divides the passband gain by `up`
        # conv1d correlates; flip so the output is a true convolution with the (symmetric) kernel.
        self.register_buffer("kernel", kernel.flip(0).to(torch.float32)[None, None], persistent=False)

    @property
    def delay_ms(self) -> float:
        return 0.0 if self.identity else 1000.0 * (self.history / 2) / (self.up * self.in_rate_hz)

    def init_history(self, batch_size: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(batch_size, 0 if self.identity else self.history, dtype=torch.float32, device=device)

    def forward(self, audio: torch.Tensor, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``audio [B, N]`` (``N`` a multiple of ``down``) -> ``[B, N * up / down]`` float32, new history."""
        audio = audio.to(torch.float32)
        if self.identity:
            return audio, history
        if audio.shape[-1] % self.down:
            raise ValueError(f"chunk of {audio.shape[-1]} samples is not a multiple of {self.down}")
        batch, samples = audio.shape
        upsampled = torch.zeros(batch, samples * self.up, dtype=torch.float32, device=audio.device)
        upsampled[:, :: self.up] = audio
        padded = torch.cat([history, upsampled], dim=-1)
        out = F.conv1d(padded[:, None], self.kernel.to(torch.float32), stride=self.down)[:, 0]
        return out, padded[:, -self.history:]


class StreamingWhisperFrontEnd(nn.Module):
    """Model-rate audio chunks -> Whisper log-mel frames, with explicit carried state.

    State: ``resample_history``, ``stft_history`` (the last ``n_fft - hop`` samples at 16 kHz)
    and ``log_max`` (the running maximum of the call's log-mel, see the module docstring).
    """

    def __init__(self, n_mels: int, sample_rate_hz: int) -> None:
        super().__init__()
        self.n_mels = n_mels
        self.resampler = PolyphaseResampler(sample_rate_hz, WHISPER_SAMPLE_RATE_HZ)
        self.stft_history = WHISPER_N_FFT - WHISPER_HOP
        self.register_buffer(
            "filters", slaney_mel_filters(WHISPER_N_FFT, n_mels, WHISPER_SAMPLE_RATE_HZ), persistent=False
        )
        self.register_buffer("window", torch.hann_window(WHISPER_N_FFT, dtype=torch.float32), persistent=False)

    def init_state(self, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {
            "resample_history": self.resampler.init_history(batch_size, device),
            "stft_history": torch.zeros(batch_size, self.stft_history, dtype=torch.float32, device=device),
            "log_max": torch.full((batch_size,), LOG_FLOOR, dtype=torch.float32, device=device),
        }

    def forward(
        self, audio: torch.Tensor, state: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``audio [B, N]`` at the model rate -> features ``[B, N_16k // 160, n_mels]`` float32."""
        audio_16k, resample_history = self.resampler(audio, state["resample_history"])
        if audio_16k.shape[-1] % WHISPER_HOP:
            raise ValueError(f"{audio_16k.shape[-1]} samples at 16 kHz is not a multiple of the hop {WHISPER_HOP}")
        padded = torch.cat([state["stft_history"], audio_16k], dim=-1)
        # Buffers are float32 islands even in a bf16 model (module.to(bf16) casts them).
        log_spec = _power_mel(padded, self.filters.to(torch.float32), self.window.to(torch.float32), center=False)
        features, log_max = running_max_floor(log_spec, state["log_max"])
        new_state = {
            "resample_history": resample_history,
            "stft_history": padded[:, -self.stft_history:],
            "log_max": log_max,
        }
        return features, new_state
