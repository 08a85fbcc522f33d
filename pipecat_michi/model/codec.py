"""MichiAI's audio codec: 24 kHz mono audio <-> one continuous latent per 80 ms frame.

The encoder is a causal SEANet-style conv stack; the decoder is a causal HiFi-GAN-style vocoder.
Both stream one frame per ``step`` under the contract of ``streaming.py``, and their ``forward``
equals stepping frame by frame from the zero state.

With ``CodecConfig.stft_hop`` set (the spectral codec) the encoder reads a causal STFT and the
decoder ends in an inverse STFT (``spectral.py``): the same blocks, run at the hop rate. Beside
the conv stacks, a linear path maps each frame's block of log-magnitudes (its hops x bins) to the
latent and back (``block_projection`` / ``block_expansion``): training starts it at the block PCA
of the corpus (``train/codec_init.py``), a latent that already keeps speech intelligible, and the
conv stacks learn what it misses (the phases above all) on top.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipecat_michi.model.backbone import Float32Buffers
from pipecat_michi.model.config import CodecConfig
from pipecat_michi.model.streaming import (
    StreamingConv1d,
    StreamingConvTranspose1d,
    StreamingModule,
    StreamingState,
)
from pipecat_michi.model.spectral import CausalISTFT, CausalSTFT, synthesis_log_magnitude

_MAX_ENCODER_CHANNELS = 512
_MIN_DECODER_CHANNELS = 8
_LRELU_SLOPE = 0.1  # HiFi-GAN's slope inside the upsampling stages
# One dilated residual unit per encoder stage widens its receptive field beyond the strided conv.
_ENCODER_RESIDUAL_KERNEL = 3
_ENCODER_RESIDUAL_DILATION = 3


class EncoderResidualUnit(StreamingModule):
    """SEANet residual unit: ELU -> dilated causal conv (half the channels) -> ELU -> 1x1 conv,
    added to the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = channels // 2
        self.conv1 = StreamingConv1d(
            channels, hidden, _ENCODER_RESIDUAL_KERNEL, dilation=_ENCODER_RESIDUAL_DILATION
        )
        self.conv2 = StreamingConv1d(hidden, channels, 1)

    def step(self, x: torch.Tensor, state: StreamingState) -> tuple[torch.Tensor, StreamingState]:
        new_state: StreamingState = {}
        y = self._step_child("conv1", F.elu(x), state, new_state)
        y = self._step_child("conv2", F.elu(y), state, new_state)
        return x + y, new_state


class EncoderBlock(StreamingModule):
    """One encoder stage: a residual unit, then ELU and a strided causal conv that downsamples
    by ``stride``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.residual = EncoderResidualUnit(in_channels)
        self.downsample = StreamingConv1d(in_channels, out_channels, 2 * stride, stride=stride)

    def step(self, x: torch.Tensor, state: StreamingState) -> tuple[torch.Tensor, StreamingState]:
        new_state: StreamingState = {}
        x = self._step_child("residual", x, state, new_state)
        x = self._step_child("downsample", F.elu(x), state, new_state)
        return x, new_state


class BlockProjection(Float32Buffers):
    """The spectral encoder's linear path: one frame's log-magnitudes ``[hops x bins]``, flattened
    hop-major, -> ``weight @ block + bias``, a latent-sized vector.

    A fixed analysis, not a parameter: zero (off) until set from data (``train/codec_init.py``).
    As a parameter, Adam's first steps on the raw log-magnitudes it reads (~1900 inputs around
    -5) moved the latent by whole units per step and the codec diverged. It stays float32 under
    a model cast, like the STFT in front of it.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(out_features, in_features))
        self.register_buffer("bias", torch.zeros(out_features))

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        return F.linear(blocks.float(), self.weight, self.bias).to(blocks.dtype)


class CodecEncoder(StreamingModule):
    """Causal conv encoder: ``wav[B, T]`` -> ``latents[B, T // frame_samples, latent_dim]``.

    Channels start at ``encoder_channels`` and double per stage (at most 512); the stages
    downsample by ``cfg.strides`` in order, so each latent sees only its frame and the past.
    """

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        channels = cfg.encoder_channels
        # The spectral codec's first conv reads STFT bins where the waveform codec reads samples.
        self.stft = CausalSTFT(cfg.n_fft, cfg.stft_hop) if cfg.stft_hop is not None else None
        self.conv_in = StreamingConv1d(self.stft.bins if self.stft is not None else 1, channels, 7)
        blocks = []
        for stride in cfg.strides:
            out_channels = min(2 * channels, _MAX_ENCODER_CHANNELS)
            blocks.append(EncoderBlock(channels, out_channels, stride))
            channels = out_channels
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = StreamingConv1d(channels, cfg.latent_dim, 3)
        self.block_projection = (
            BlockProjection(cfg.hops_per_frame * self.stft.bins, cfg.latent_dim) if self.stft is not None else None
        )

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """Encode ``wav[B, T]`` offline; ``T`` must be a positive multiple of ``frame_samples``."""
        frame_samples = self.cfg.frame_samples
        if wav.dim() != 2 or wav.shape[1] == 0 or wav.shape[1] % frame_samples:
            raise ValueError(
                f"codec encoder takes audio shaped [batch, samples] with samples a positive "
                f"multiple of frame_samples={frame_samples}, got {tuple(wav.shape)}; "
                "pad the tail with zeros"
            )
        return self.encode_stream(wav, self.init_state(wav.shape[0], wav.device, wav.dtype))[0]

    def step(
        self, wav_frame: torch.Tensor, state: StreamingState
    ) -> tuple[torch.Tensor, StreamingState]:
        """Encode one frame ``wav_frame[B, frame_samples]`` into ``latent[B, latent_dim]``."""
        frame_samples = self.cfg.frame_samples
        if wav_frame.dim() != 2 or wav_frame.shape[1] != frame_samples:
            raise ValueError(
                f"codec encoder step takes one frame shaped [batch, {frame_samples}], "
                f"got {tuple(wav_frame.shape)}"
            )
        latents, state = self.encode_stream(wav_frame, state)
        return latents[:, 0], state

    def encode_stream(
        self, wav: torch.Tensor, state: StreamingState
    ) -> tuple[torch.Tensor, StreamingState]:
        """Encode the next whole frames ``wav[B, F * frame_samples]`` of a stream from ``state``:
        ``(latents[B, F, latent_dim], state after them)``."""
        new_state: StreamingState = {}
        if self.stft is not None:
            x = self._step_child("stft", wav, state, new_state)
        else:
            x = wav[:, None, :]
        spectrum = x
        x = self._step_child("conv_in", x, state, new_state)
        for i in range(len(self.blocks)):
            x = self._step_child(f"blocks.{i}", x, state, new_state)
        latents = self._step_child("conv_out", F.elu(x), state, new_state).transpose(1, 2)
        if self.block_projection is not None:
            batch, bins, hops = spectrum.shape
            blocks = spectrum.transpose(1, 2).reshape(batch, hops // self.cfg.hops_per_frame, -1)
            latents = latents + self.block_projection(blocks)
        return latents, new_state


class ResBlock(StreamingModule):
    """Causal HiFi-GAN ResBlock1: per dilation, LeakyReLU -> dilated conv -> LeakyReLU -> conv,
    added to the input."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            StreamingConv1d(channels, channels, kernel_size, dilation=d) for d in dilations
        )
        self.convs2 = nn.ModuleList(
            StreamingConv1d(channels, channels, kernel_size) for _ in dilations
        )

    def step(self, x: torch.Tensor, state: StreamingState) -> tuple[torch.Tensor, StreamingState]:
        new_state: StreamingState = {}
        for i in range(len(self.convs1)):
            y = self._step_child(f"convs1.{i}", F.leaky_relu(x, _LRELU_SLOPE), state, new_state)
            y = self._step_child(f"convs2.{i}", F.leaky_relu(y, _LRELU_SLOPE), state, new_state)
            x = x + y
        return x, new_state


class DecoderBlock(StreamingModule):
    """One vocoder stage: LeakyReLU, causal transposed conv upsampling by ``stride``, then
    multi-receptive-field fusion (the mean of one ``ResBlock`` per kernel size)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        kernel_sizes: tuple[int, ...],
        dilations: tuple[int, ...],
    ) -> None:
        super().__init__()
        self.upsample = StreamingConvTranspose1d(in_channels, out_channels, 2 * stride, stride)
        self.resblocks = nn.ModuleList(ResBlock(out_channels, k, dilations) for k in kernel_sizes)

    def step(self, x: torch.Tensor, state: StreamingState) -> tuple[torch.Tensor, StreamingState]:
        new_state: StreamingState = {}
        x = self._step_child("upsample", F.leaky_relu(x, _LRELU_SLOPE), state, new_state)
        branches = [
            self._step_child(f"resblocks.{i}", x, state, new_state)
            for i in range(len(self.resblocks))
        ]
        return torch.stack(branches).mean(dim=0), new_state


class CodecDecoder(StreamingModule):
    """Causal HiFi-GAN-style vocoder: ``latents[B, F, latent_dim]`` -> ``wav[B, F * frame_samples]``
    in [-1, 1].

    Upsamples by ``cfg.strides`` in reverse order, halving channels per stage (at least 8).
    No weight norm, so the ``state_dict`` holds plain conv weights. The spectral codec's last
    conv predicts log-magnitudes and phases for ``CausalISTFT`` instead of samples; its output
    lags the encoded audio by ``cfg.decoder_delay_samples``.
    """

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        channels = cfg.decoder_channels
        self.conv_pre = StreamingConv1d(cfg.latent_dim, channels, 7)
        blocks = []
        for stride in reversed(cfg.strides):
            out_channels = max(channels // 2, _MIN_DECODER_CHANNELS)
            blocks.append(
                DecoderBlock(
                    channels,
                    out_channels,
                    stride,
                    cfg.resblock_kernel_sizes,
                    cfg.resblock_dilations,
                )
            )
            channels = out_channels
        self.blocks = nn.ModuleList(blocks)
        self.istft = CausalISTFT(cfg.n_fft, cfg.stft_hop) if cfg.stft_hop is not None else None
        self.conv_post = StreamingConv1d(channels, 2 * self.istft.bins if self.istft is not None else 1, 7)
        # Spectral codec: latent -> its frame's log-magnitudes [hops x bins], added to conv_post's.
        # It learns (its inputs, the latents, have a mean square of 1); zero until trained or set from data.
        self.block_expansion = None
        if self.istft is not None:
            self.block_expansion = nn.Linear(cfg.latent_dim, cfg.hops_per_frame * self.istft.bins)
            nn.init.zeros_(self.block_expansion.weight)
            nn.init.zeros_(self.block_expansion.bias)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode ``latents[B, F, latent_dim]`` offline into ``wav[B, F * frame_samples]``."""
        latent_dim = self.cfg.latent_dim
        if latents.dim() != 3 or latents.shape[1] == 0 or latents.shape[2] != latent_dim:
            raise ValueError(
                f"codec decoder takes latents shaped [batch, frames>0, {latent_dim}], "
                f"got {tuple(latents.shape)}"
            )
        state = self.init_state(latents.shape[0], latents.device, latents.dtype)
        return self.decode_stream(latents, state)[0]

    def step(
        self, latent: torch.Tensor, state: StreamingState
    ) -> tuple[torch.Tensor, StreamingState]:
        """Decode one ``latent[B, latent_dim]`` into ``wav[B, frame_samples]``."""
        latent_dim = self.cfg.latent_dim
        if latent.dim() != 2 or latent.shape[1] != latent_dim:
            raise ValueError(
                f"codec decoder step takes one latent shaped [batch, {latent_dim}], "
                f"got {tuple(latent.shape)}"
            )
        return self.decode_stream(latent[:, None, :], state)

    def decode_stream(
        self, latents: torch.Tensor, state: StreamingState
    ) -> tuple[torch.Tensor, StreamingState]:
        """Decode the next latents ``[B, F, latent_dim]`` of a stream from ``state``:
        ``(wav[B, F * frame_samples], state after them)``."""
        wav, _, new_state = self.decode_stream_with_spectrum(latents, state)
        return wav, new_state

    def decode_stream_with_spectrum(
        self, latents: torch.Tensor, state: StreamingState
    ) -> tuple[torch.Tensor, torch.Tensor | None, StreamingState]:
        """``decode_stream``, plus what the spectral decoder gives its inverse STFT: log-magnitudes
        then phases, ``[B, 2 * bins, F * hops]`` (None for the waveform decoder)."""
        new_state: StreamingState = {}
        x = self._step_child("conv_pre", latents.transpose(1, 2), state, new_state)
        for i in range(len(self.blocks)):
            x = self._step_child(f"blocks.{i}", x, state, new_state)
        # HiFi-GAN's last activation uses LeakyReLU's default slope, not the stages' 0.1.
        x = self._step_child("conv_post", F.leaky_relu(x), state, new_state)
        if self.istft is None:
            return torch.tanh(x[:, 0, :]), None, new_state
        batch, frames, _ = latents.shape
        bins = self.istft.bins
        block_magnitude = self.block_expansion(latents).reshape(batch, frames * self.cfg.hops_per_frame, bins)
        x = torch.cat([x[:, :bins] + block_magnitude.transpose(1, 2), x[:, bins:]], dim=1)
        # An overlap-add has no tanh to bound it: clip to full scale like a DAC would.
        wav = self._step_child("istft", x, state, new_state)
        return wav.clamp(-1.0, 1.0), x, new_state


class Codec(nn.Module):
    """The encoder and decoder together. Each streams on its own state: use
    ``codec.encoder.init_state`` / ``step`` and ``codec.decoder.init_state`` / ``step``."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = CodecEncoder(cfg)
        self.decoder = CodecDecoder(cfg)

    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """``wav[B, F * frame_samples]`` -> ``latents[B, F, latent_dim]``."""
        return self.encoder(wav)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``latents[B, F, latent_dim]`` -> ``wav[B, F * frame_samples]``."""
        return self.decoder(latents)


def reconstruct_after_context(
    codec: Codec, wav: torch.Tensor, context_frames: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codec training as the codec runs in a call: the first ``context_frames`` frames of
    ``wav[B, T]`` only warm the encoder's and decoder's streaming state (no gradient), and the
    rest is encoded and decoded from that state. Returns ``(reconstruction, target, latents)``,
    the first two aligned sample for sample (the decoder's delay reaches back into the context).

    A causal codec's receptive field (~1.6 s for michi-nano's) outreaches a short training crop:
    trained only from the zero state, it never meets the long history every frame of a call has.
    """
    recon, target, latents, _ = reconstruct_with_spectrum(codec, wav, context_frames)
    return recon, target, latents


def reconstruct_with_spectrum(
    codec: Codec, wav: torch.Tensor, context_frames: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """``reconstruct_after_context``, plus for the spectral codec ``(predicted, true)``
    log-magnitudes of the decoder's frames: what its inverse STFT must be given to rebuild the
    input exactly (``spectral.synthesis_log_magnitude``). None for the waveform codec."""
    frame_samples = codec.cfg.frame_samples
    split = context_frames * frame_samples
    delay = codec.cfg.decoder_delay_samples
    if not 0 <= split < wav.shape[-1] or (split and split < delay):
        raise ValueError(
            f"{context_frames} context frames leave nothing to train on in a {wav.shape[-1]}-sample crop"
        )
    batch = wav.shape[0]
    encoder_state = codec.encoder.init_state(batch, wav.device, wav.dtype)
    decoder_state = codec.decoder.init_state(batch, wav.device, wav.dtype)
    if split:
        with torch.no_grad():
            context_latents, encoder_state = codec.encoder.encode_stream(wav[:, :split], encoder_state)
            _, decoder_state = codec.decoder.decode_stream(context_latents, decoder_state)
    latents, _ = codec.encoder.encode_stream(wav[:, split:], encoder_state)
    recon, spectrum, _ = codec.decoder.decode_stream_with_spectrum(latents, decoder_state)
    spectra = None
    if spectrum is not None:
        log_magnitude = spectrum[:, : spectrum.shape[1] // 2]
        # Decoder frame j rebuilds input [j*hop - (n_fft - hop), (j + 1)*hop): read from split on.
        true = synthesis_log_magnitude(wav, codec.cfg.n_fft, codec.cfg.stft_hop)
        spectra = (log_magnitude, true[..., split // codec.cfg.stft_hop :])
    if split == 0:
        return *align_reconstruction(recon, wav, delay), latents, spectra
    target = wav[:, split - delay : wav.shape[-1] - delay]
    return recon, target, latents, spectra


def align_reconstruction(
    recon: torch.Tensor, wav: torch.Tensor, delay_samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(recon, wav)`` trimmed so sample ``i`` of one matches sample ``i`` of the other, for a
    decoder whose output lags its input by ``delay_samples`` (``CodecConfig.decoder_delay_samples``)."""
    if delay_samples == 0:
        return recon, wav
    if delay_samples >= wav.shape[-1]:
        raise ValueError(f"a {wav.shape[-1]}-sample clip is shorter than the decoder's {delay_samples}-sample delay")
    return recon[..., delay_samples:], wav[..., : wav.shape[-1] - delay_samples]


_STFT_FFT_SIZES = (512, 1024, 2048)
_STFT_EPS = 1e-7


def _stft_magnitude(wav: torch.Tensor, n_fft: int) -> torch.Tensor:
    window = torch.hann_window(n_fft, device=wav.device, dtype=wav.dtype)
    spec = torch.stft(
        wav, n_fft, hop_length=n_fft // 4, window=window, center=False, return_complex=True
    )
    # The floor keeps the sqrt's gradient finite on silent bins.
    return torch.sqrt(torch.clamp(spec.real.square() + spec.imag.square(), min=_STFT_EPS))


def multi_resolution_stft_loss(pred_wav: torch.Tensor, target_wav: torch.Tensor) -> torch.Tensor:
    """Spectral convergence plus log-magnitude L1, averaged over STFT sizes 512, 1024 and 2048.

    Takes ``[..., T]`` waveforms of equal shape. Sizes longer than ``T`` are skipped; if all are,
    the largest power of two not above ``T`` is used alone.
    """
    if pred_wav.shape != target_wav.shape:
        raise ValueError(
            f"multi_resolution_stft_loss: shapes differ, {tuple(pred_wav.shape)} vs "
            f"{tuple(target_wav.shape)}"
        )
    num_samples = pred_wav.shape[-1]
    if num_samples < 16:
        raise ValueError(f"multi_resolution_stft_loss needs at least 16 samples, got {num_samples}")
    fft_sizes = [n for n in _STFT_FFT_SIZES if n <= num_samples] or [
        1 << (num_samples.bit_length() - 1)
    ]
    pred_wav = pred_wav.reshape(-1, num_samples)
    target_wav = target_wav.reshape(-1, num_samples)
    total = pred_wav.new_zeros(())
    for n_fft in fft_sizes:
        pred_mag = _stft_magnitude(pred_wav, n_fft)
        target_mag = _stft_magnitude(target_wav, n_fft)
        spectral_convergence = torch.linalg.vector_norm(target_mag - pred_mag) / (
            torch.linalg.vector_norm(target_mag) + _STFT_EPS
        )
        log_magnitude = F.l1_loss(torch.log(pred_mag), torch.log(target_mag))
        total = total + spectral_convergence + log_magnitude
    return total / len(fft_sizes)
