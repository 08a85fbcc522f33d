"""A spectral codec's linear path started at the block PCA of the training speech.

One 80 ms frame's log-magnitudes (8 hops x 241 bins under michi-nano) are ~1900 numbers; their
first 64 principal components already keep speech intelligible (held-out slt sentences, Whisper
tiny.en: 4.4% WER with Griffin-Lim phases against 3.0% for the exact spectra; ~98.6% of the
variance). So a fresh codec's latent starts there, and its decoder starts from the matching
reconstruction: the conv stacks' contributions to both are zeroed, and training refines
magnitudes and learns the phases from a codec that is already understood instead of from noise.

The components keep their relative scales, with one factor for all that makes the latent's mean
square 1 (the scale the flow head's unit noise expects): a distance between latents is then a
log-spectral distance, so the speaking head's loss weighs each component by what it changes in
the spectrum. Whitened instead (unit variance each), the ~60 components that carry little of the
spectrum (and are hardly predictable from the text) weighed as much as the loudness and the
formants, and a speaking head trained on them predicted little but the first two.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field

from pipecat_michi.model.checkpoint import TOKENIZER_FILE, load_checkpoint, save_checkpoint
from pipecat_michi.model.codec import Codec
from pipecat_michi.train.data import read_framed_audio
from pipecat_michi.train.manifest import read_manifest

# Every third block enters the SVD: neighbours are alike, and the SVD's cost grows with rows.
_ROW_STRIDE = 3


@torch.no_grad()
def block_log_magnitudes(codec: Codec, wav: torch.Tensor) -> torch.Tensor:
    """``wav[T]`` -> its whole frames' log-magnitude blocks ``[frames, hops_per_frame * bins]``
    (hop-major), as the encoder's linear path reads them."""
    cfg = codec.cfg
    usable = wav.shape[-1] // cfg.frame_samples * cfg.frame_samples
    if usable == 0:
        return torch.zeros(0, cfg.hops_per_frame * codec.encoder.stft.bins)
    stft = codec.encoder.stft
    device = stft.window.device
    spectrum, _ = stft.step(wav[None, :usable].to(device, torch.float32), stft.init_state(1, device, torch.float32))
    return spectrum[0].T.reshape(usable // cfg.frame_samples, -1)


@torch.no_grad()
def init_spectral_codec_from_pca(codec: Codec, clips: Iterable[torch.Tensor]) -> float:
    """Set ``codec``'s linear path to the block PCA of ``clips`` (24 kHz mono tensors), scaled to a
    mean square of 1, and zero the conv stacks' share of the latent and of the log-magnitudes.
    Returns the share of the blocks' variance the latent keeps."""
    cfg = codec.cfg
    if not cfg.spectral:
        raise ValueError("PCA initialisation is for the spectral codec (CodecConfig.stft_hop)")
    blocks = torch.cat([block_log_magnitudes(codec, clip).cpu() for clip in clips]).double()
    bins = codec.encoder.stft.bins
    # One mean per bin (not per hop of the block): the expansion's bias repeats it for each hop.
    mean = blocks.reshape(-1, cfg.hops_per_frame, bins).mean(dim=(0, 1)).repeat(cfg.hops_per_frame)
    rows = blocks[::_ROW_STRIDE] - mean
    if rows.shape[0] <= cfg.latent_dim:
        raise ValueError(
            f"{blocks.shape[0]} frames of speech are too few for a {cfg.latent_dim}-component PCA "
            f"(every {_ROW_STRIDE}rd frame is used); give more clips"
        )
    _, singular, components = torch.linalg.svd(rows, full_matrices=False)
    kept = components[: cfg.latent_dim]  # [latent, hops * bins]
    variances = singular[: cfg.latent_dim].square() / (rows.shape[0] - 1)
    scale = variances.mean().sqrt()  # one factor for all: the latent's mean square becomes 1
    explained = float(singular[: cfg.latent_dim].square().sum() / singular.square().sum())

    projection, expansion = codec.encoder.block_projection, codec.decoder.block_expansion
    projection.weight.copy_(kept / scale)
    projection.bias.copy_(-(kept @ mean) / scale)
    expansion.weight.copy_(kept.T * scale)
    expansion.bias.copy_(mean)
    codec.encoder.conv_out.conv.weight.zero_()
    codec.encoder.conv_out.conv.bias.zero_()
    codec.decoder.conv_post.conv.weight[:bins].zero_()
    codec.decoder.conv_post.conv.bias[:bins].zero_()
    logger.info(
        f"codec linear path from the block PCA of {blocks.shape[0]} frames: "
        f"{cfg.latent_dim} components keep {100 * explained:.1f}% of the variance"
    )
    return explained


@torch.no_grad()
def rescale_latents(codec: Codec, factors: torch.Tensor) -> None:
    """Multiply each latent component ``d`` by ``factors[d]``, exactly: the encoder's outputs
    (linear path and conv stack) are scaled and the decoder's inputs divided back, so
    ``decode(encode(x))`` is unchanged and only the space the speaking head works in changes."""
    factors = factors.to(codec.encoder.conv_out.conv.weight)
    if factors.shape != (codec.cfg.latent_dim,) or not bool((factors > 0).all()):
        raise ValueError(f"need {codec.cfg.latent_dim} positive factors, got shape {tuple(factors.shape)}")
    encoder, decoder = codec.encoder, codec.decoder
    encoder.conv_out.conv.weight.mul_(factors[:, None, None])
    encoder.conv_out.conv.bias.mul_(factors)
    decoder.conv_pre.conv.weight.div_(factors[None, :, None])
    if encoder.block_projection is not None:
        encoder.block_projection.weight.mul_(factors[:, None].to(encoder.block_projection.weight))
        encoder.block_projection.bias.mul_(factors.to(encoder.block_projection.bias))
    if decoder.block_expansion is not None:
        decoder.block_expansion.weight.div_(factors[None, :])


@torch.no_grad()
def flattening_factors(latents: torch.Tensor, power: float) -> torch.Tensor:
    """Per-component factors that bring ``latents [N, D]``'s standard deviations ``s_d`` to
    ``s_d ** (1 - power)`` (0: as they are, 1: whitened), then the whole to a mean square of 1."""
    std = latents.double().std(dim=0).clamp(min=1e-8)
    factors = std.pow(-power)
    scaled = latents.double() * factors
    return (factors / scaled.square().mean().sqrt()).float()


class FlattenLatentsConfig(BaseModel):
    """``michi-train flatten-latents``: a trained codec's latent space, flattened for the speaking head."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: Path
    manifest: Path
    out_dir: Path
    power: float = Field(default=0.5, ge=0, le=1, description="0: as is, 1: whitened")
    clips: int = Field(default=200, ge=1, description="manifest clips that measure the components' spread")


@torch.no_grad()
def flatten_checkpoint_latents(config: FlattenLatentsConfig) -> Path:
    """Write ``config.checkpoint`` with its codec's latents rescaled by ``flattening_factors`` of
    the manifest's speech (before the speaking stage: a speaking head learns the space it sees)."""
    model = load_checkpoint(config.checkpoint).eval()
    rate, frame = model.config.sample_rate_hz, model.config.frame_samples
    entries = read_manifest(config.manifest)[: config.clips]
    device = model.device
    latents = torch.cat([model.codec.encode(read_framed_audio(e, rate, frame)[None].to(device))[0] for e in entries])
    factors = flattening_factors(latents.float().cpu(), config.power)
    rescale_latents(model.codec, factors)
    out = save_checkpoint(model, config.out_dir)
    if (config.checkpoint / TOKENIZER_FILE).is_file():
        shutil.copy(config.checkpoint / TOKENIZER_FILE, out / TOKENIZER_FILE)
    logger.info(f"latents flattened (power {config.power}, factors {float(factors.min()):.2f}..{float(factors.max()):.2f}) -> {out}")
    return out
