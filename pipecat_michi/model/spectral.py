"""A causal STFT front-end and a causal inverse STFT, streaming under ``streaming.py``'s contract.

The spectral codec (``CodecConfig.stft_hop``) reads speech through ``CausalSTFT`` and writes it
through ``CausalISTFT``, so its convolutions run at the hop rate (100 Hz) instead of 24 kHz.

Both compute in float32 whatever the input dtype (``torch.fft`` has no bfloat16 kernels on the
CPU, and a bf16 overlap-add would lose the quiet samples) and hand back the input's dtype; their
windows and DFT bases stay float32 when the model is cast (``Float32Buffers``).

Both directions use the square root of a periodic Hann window (analysis and synthesis alike), so
the overlap-add rebuilds a signal exactly and the magnitudes the decoder must predict are those
of windowed frames: smooth enough that 64 linear floats per 80 ms keep speech intelligible, where
unwindowed frames' leakage made them ragged (``benchmarks/codec_eval.py --oracle``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipecat_michi.model.backbone import Float32Buffers
from pipecat_michi.model.streaming import StreamingModule, StreamingState

_LOG_MAGNITUDE_FLOOR = 1e-5  # -100 dB: silence, not -inf
# exp() of a larger predicted log-magnitude is clipped: one wild bin must not overflow a frame.
_MAX_LOG_MAGNITUDE = 4.6  # ~100x full scale per bin


def analysis_window(n_fft: int) -> torch.Tensor:
    """The square root of a periodic Hann window: what frames are weighted by before an FFT."""
    return torch.hann_window(n_fft, periodic=True).sqrt()


class _HopFrames(StreamingModule, Float32Buffers):
    """What both directions share: ``n_fft``-sample frames every ``hop`` samples, and a state of
    ``n_fft - hop`` samples per row (the overlap that crosses a chunk boundary)."""

    def __init__(self, n_fft: int, hop: int) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.hop = hop

    @property
    def bins(self) -> int:
        return self.n_fft // 2 + 1

    def _overlap_state(
        self, name: str, batch_size: int, device: torch.device | None, dtype: torch.dtype | None
    ) -> StreamingState:
        shape = (batch_size, self.n_fft - self.hop)
        return {name: torch.zeros(shape, device=device or self.window.device, dtype=dtype or torch.float32)}


class CausalSTFT(_HopFrames):
    """``wav[B, T]`` -> log-magnitude frames ``[B, n_fft // 2 + 1, T // hop]``.

    Frame ``j`` is the spectrum of ``wav[j * hop - (n_fft - hop) : (j + 1) * hop]`` weighted by
    ``analysis_window``: it ends with its own hop, so it needs no future sample. The state ``history`` holds the last
    ``n_fft - hop`` samples (zeros before the stream's first sample).
    """

    def __init__(self, n_fft: int, hop: int) -> None:
        if n_fft < hop:
            raise ValueError(f"CausalSTFT: n_fft {n_fft} is shorter than hop {hop}")
        super().__init__(n_fft, hop)
        self.register_buffer("window", analysis_window(n_fft), persistent=False)

    def init_state(
        self,
        batch_size: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> StreamingState:
        return self._overlap_state("history", batch_size, device, dtype)

    def step(self, wav: torch.Tensor, state: StreamingState) -> tuple[torch.Tensor, StreamingState]:
        if wav.shape[-1] % self.hop:
            raise ValueError(
                f"CausalSTFT: chunk of {wav.shape[-1]} samples is not a multiple of hop {self.hop}"
            )
        x = torch.cat([state["history"].to(wav.dtype), wav], dim=-1)
        history = x[..., x.shape[-1] - (self.n_fft - self.hop) :]
        frames = x.float().unfold(-1, self.n_fft, self.hop) * self.window  # [B, J, n_fft]
        power = torch.fft.rfft(frames, dim=-1).abs().square()
        log_magnitude = 0.5 * torch.log(power.clamp(min=_LOG_MAGNITUDE_FLOOR**2))
        return log_magnitude.transpose(1, 2).to(wav.dtype), {"history": history}


def synthesis_spectrum(wav: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """``[B, n_fft // 2 + 1, T // hop]`` complex: the spectra whose log-magnitudes and phases,
    given to ``CausalISTFT``, rebuild ``wav[B, T]`` exactly, ``n_fft - hop`` samples late.

    Frame ``j`` is the spectrum of ``wav[j * hop - (n_fft - hop) : (j + 1) * hop]`` (zeros before
    the start) weighted by ``analysis_window``: the frames ``CausalSTFT`` reads, before the log.
    """
    padded = F.pad(wav.float(), (n_fft - hop, 0))
    frames = padded.unfold(-1, n_fft, hop) * analysis_window(n_fft).to(padded.device)
    return torch.fft.rfft(frames, dim=-1).transpose(1, 2)


def synthesis_log_magnitude(wav: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """The log-magnitudes of ``synthesis_spectrum`` (floored at -100 dB)."""
    return torch.log(synthesis_spectrum(wav, n_fft, hop).abs().clamp(min=_LOG_MAGNITUDE_FLOOR))


class CausalISTFT(_HopFrames):
    """``[B, 2 * (n_fft // 2 + 1), J]`` (log-magnitudes, then phases) -> ``wav[B, J * hop]``.

    Each frame's inverse FFT is weighted by ``analysis_window`` again, scaled so that analysis
    times synthesis windows sum to one at this overlap, then overlap-added. A sample is complete once every frame that
    covers it is in, so a step emits the ``J * hop`` samples that are complete and keeps the
    last ``n_fft - hop`` (the state ``tail``) for the next frames to add to: the output lags the
    frames by ``n_fft - hop`` samples. Offline, the final tail is dropped.
    """

    def __init__(self, n_fft: int, hop: int) -> None:
        if n_fft % hop or n_fft < 2 * hop:
            raise ValueError(f"CausalISTFT: n_fft {n_fft} must be a multiple of hop {hop}, at least 2x")
        super().__init__(n_fft, hop)
        # Analysis x synthesis = a periodic Hann window, which at hop n_fft / k sums to k / 2
        # (k >= 2): scale it to sum to one.
        window = analysis_window(n_fft) * (2.0 * hop / n_fft)
        self.register_buffer("window", window, persistent=False)
        # The inverse real DFT as two real matrices (irfft's weights: bins 0 and n/2 once, the
        # rest twice), the synthesis window folded in: no complex tensors, which torch.compile's
        # inductor cannot generate code for, and one matmul per half on the CPU.
        bins = n_fft // 2 + 1
        angles = 2.0 * math.pi * torch.outer(torch.arange(bins, dtype=torch.float64),
                                             torch.arange(n_fft, dtype=torch.float64)) / n_fft
        weights = torch.full((bins, 1), 2.0, dtype=torch.float64)
        weights[0] = weights[-1] = 1.0
        scale = weights / n_fft * window.double()[None, :]
        self.register_buffer("cos_basis", (torch.cos(angles) * scale).float(), persistent=False)
        self.register_buffer("sin_basis", (-torch.sin(angles) * scale).float(), persistent=False)

    def init_state(
        self,
        batch_size: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> StreamingState:
        # The overlap-add's running sum stays float32 whatever the model's dtype.
        return self._overlap_state("tail", batch_size, device, torch.float32)

    def step(self, spec: torch.Tensor, state: StreamingState) -> tuple[torch.Tensor, StreamingState]:
        if spec.dim() != 3 or spec.shape[1] != 2 * self.bins:
            raise ValueError(
                f"CausalISTFT takes [batch, {2 * self.bins}, frames], got {tuple(spec.shape)}"
            )
        log_magnitude, phase = spec.float().split(self.bins, dim=1)
        magnitude = torch.exp(log_magnitude.clamp(max=_MAX_LOG_MAGNITUDE)).transpose(1, 2)
        phase = phase.transpose(1, 2)
        # irfft(magnitude * e^{i phase}) * window, as real matmuls: [B, J, bins] @ [bins, n_fft].
        frames = (magnitude * torch.cos(phase)) @ self.cos_basis + (magnitude * torch.sin(phase)) @ self.sin_basis
        num_frames = frames.shape[1]
        length = (num_frames - 1) * self.hop + self.n_fft
        overlapped = F.fold(
            frames.transpose(1, 2), output_size=(1, length), kernel_size=(1, self.n_fft), stride=(1, self.hop)
        )[:, 0, 0, :]
        overlapped = overlapped + F.pad(state["tail"].float(), (0, length - state["tail"].shape[-1]))
        emitted = num_frames * self.hop
        return overlapped[:, :emitted].to(spec.dtype), {"tail": overlapped[:, emitted:]}
