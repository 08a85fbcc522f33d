"""A spectral codec started at the block PCA of its training speech: latents of mean square one, the PCA's
reconstruction out of the decoder, and a codec stage that starts there and can keep its encoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipecat_michi.model.checkpoint import load_checkpoint, save_checkpoint
from pipecat_michi.model.codec import Codec
from pipecat_michi.model.config import CodecConfig, MichiConfig
from pipecat_michi.model.michi import MichiModel
from pipecat_michi.train.cli import main
from pipecat_michi.train.codec_init import (
    FlattenLatentsConfig,
    flattening_factors,
    init_spectral_codec_from_pca,
    rescale_latents,
)
from pipecat_michi.train.config import TrainConfig
from pipecat_michi.train.loop import Trainer

SPECTRAL = CodecConfig.model_validate(MichiConfig.preset("tiny").codec.model_dump() | {
    "strides": (8,), "stft_hop": 240, "resblock_dilations": (1, 3)})


def _clips(count: int, frames: int, seed: int = 0) -> list[torch.Tensor]:
    """Gliding two-partial tones with a slow envelope: spectra that vary frame to frame."""
    rng = np.random.default_rng(seed)
    t = np.arange(frames * SPECTRAL.frame_samples) / SPECTRAL.sample_rate_hz
    clips = []
    for _ in range(count):
        f0, glide, level = rng.uniform(120, 300), rng.uniform(-60, 60), rng.uniform(0.05, 0.5)
        phase = 2 * np.pi * (f0 * t + 0.5 * glide * t**2)
        envelope = level * (1.2 + np.sin(2 * np.pi * rng.uniform(1, 4) * t))
        wav = envelope * (np.sin(phase) + 0.4 * np.sin(3 * phase)) + 1e-3 * rng.standard_normal(t.size)
        clips.append(torch.from_numpy(wav.astype(np.float32)))
    return clips


def _reference_blocks(wav: np.ndarray) -> np.ndarray:
    """Log-magnitude blocks from the definition: square-root-Hann frames of 480 samples ending at
    each 240-sample hop, one row per 80 ms frame, hop-major."""
    n_fft, hop, hops = 480, 240, SPECTRAL.hops_per_frame
    padded = np.pad(wav.astype(np.float64), (n_fft - hop, 0))
    window = np.sqrt(np.hanning(n_fft + 1)[:n_fft])
    frames = np.stack([padded[j * hop: j * hop + n_fft] for j in range(wav.size // hop)]) * window
    log_magnitude = np.log(np.maximum(np.abs(np.fft.rfft(frames, axis=1)), 1e-5))
    return log_magnitude.reshape(-1, hops * log_magnitude.shape[1])


def test_the_pca_start_scales_the_latent_and_decodes_the_pca_reconstruction() -> None:
    torch.manual_seed(0)
    codec = Codec(SPECTRAL).eval()
    clips = _clips(60, 6)
    explained = init_spectral_codec_from_pca(codec, clips)

    blocks = np.concatenate([_reference_blocks(c.numpy()) for c in clips])
    bins = blocks.shape[1] // SPECTRAL.hops_per_frame
    mean = np.tile(blocks.reshape(-1, SPECTRAL.hops_per_frame, bins).mean(axis=(0, 1)), SPECTRAL.hops_per_frame)
    _, singular, components = np.linalg.svd(blocks[::3] - mean, full_matrices=False)
    kept = components[: SPECTRAL.latent_dim]
    assert explained == pytest.approx((singular[:16] ** 2).sum() / (singular**2).sum(), rel=1e-3)

    wav = torch.stack(clips)
    with torch.no_grad():
        latents = codec.encode(wav)
        _, spectrum, _ = codec.decoder.decode_stream_with_spectrum(latents, codec.decoder.init_state(len(clips)))
    # One scale for all components: their mean squares over the frames the fit used (every third)
    # keep the PCA's proportions and average to one.
    fitted = latents.reshape(-1, SPECTRAL.latent_dim).double()[::3]
    mean_square = fitted.square().sum(0) / (len(fitted) - 1)
    variances = torch.from_numpy(singular[:16] ** 2)
    torch.testing.assert_close(mean_square, variances / variances.mean(), atol=2e-3, rtol=2e-3)
    # The decoder's magnitudes are the PCA reconstruction of the input's blocks.
    reconstruction = (blocks - mean) @ kept.T @ kept + mean
    decoded = spectrum[:, :bins].transpose(1, 2).reshape(-1, SPECTRAL.hops_per_frame * bins).double().numpy()
    np.testing.assert_allclose(decoded, reconstruction, atol=3e-2, rtol=0)  # float32 path, near-silent bins
    # The conv stacks' share starts at zero: the linear path alone makes latent and magnitudes.
    assert not codec.encoder.conv_out.conv.weight.any() and not codec.decoder.conv_post.conv.weight[:bins].any()
    assert codec.decoder.conv_post.conv.weight[bins:].any()  # the phases learn from scratch


def test_the_pca_start_refuses_a_waveform_codec_and_too_little_speech() -> None:
    with pytest.raises(ValueError, match="spectral codec"):
        init_spectral_codec_from_pca(Codec(MichiConfig.preset("tiny").codec), _clips(2, 4))
    with pytest.raises(ValueError, match="too few"):
        init_spectral_codec_from_pca(Codec(SPECTRAL), _clips(2, 4))


def _glide_manifest(root: Path) -> Path:
    """40 gliding-tone clips: enough frames (320) for michi-nano's 64-component PCA."""
    import soundfile

    from pipecat_michi.train.manifest import ManifestEntry, WordTiming, write_manifest

    root.mkdir()
    entries = []
    for i, clip in enumerate(_clips(40, 8, seed=1)):
        soundfile.write(root / f"g{i}.wav", clip.numpy(), SPECTRAL.sample_rate_hz, subtype="FLOAT")
        words = [WordTiming(word="a", start_sample=0, end_sample=clip.numel())]
        entries.append(ManifestEntry(id=f"g{i}", audio=f"g{i}.wav", sample_rate_hz=SPECTRAL.sample_rate_hz,
                                     text="a", words=words))
    return write_manifest(root / "manifest.jsonl", entries)


def test_a_fresh_spectral_codec_starts_at_the_pca_and_a_frozen_encoder_stays(tmp_path: Path) -> None:
    tiny = MichiConfig.preset("tiny")
    torch.manual_seed(0)
    init = save_checkpoint(MichiModel(tiny), tmp_path / "init")
    config = TrainConfig(stage="codec", manifest=_glide_manifest(tmp_path / "glides"), out_dir=tmp_path / "fresh", preset="michi-nano",
                         init=init, fresh_codec=True, freeze_codec_encoder=True, steps=2, batch_size=2,
                         codec_frames=2, warmup_steps=0, seed=0)
    trainer = Trainer(config)
    encoder_before = {k: v.clone() for k, v in trainer.model.codec.encoder.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in trainer.model.codec.decoder.state_dict().items()}
    assert not trainer.model.codec.encoder.conv_out.conv.weight.any()  # the PCA start
    trainer.train()
    after = load_checkpoint(tmp_path / "fresh").codec
    assert after.cfg.spectral and after.cfg.latent_dim == 64
    for name, tensor in after.encoder.state_dict().items():
        torch.testing.assert_close(tensor, encoder_before[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(t, decoder_before[k]) for k, t in after.decoder.state_dict().items())
    # Resumed, the run keeps what it was started with: no second PCA over the trained weights.
    resumed = Trainer(config.model_copy(update={"resume": True, "steps": 3}))
    torch.testing.assert_close(resumed.model.codec.decoder.block_expansion.weight, after.decoder.block_expansion.weight)


def test_rescaling_the_latents_changes_their_space_and_not_the_codec() -> None:
    torch.manual_seed(0)
    codec = Codec(SPECTRAL).eval()
    init_spectral_codec_from_pca(codec, _clips(12, 10))
    with torch.no_grad():  # the conv stacks too: a trained codec uses them
        codec.encoder.conv_out.conv.weight.normal_(std=0.01)
        codec.decoder.conv_post.conv.weight.normal_(std=0.01)
    wav = _clips(1, 6, seed=3)[0][None]
    latents, audio = codec.encode(wav), codec.decode(codec.encode(wav))
    factors = 0.5 + torch.rand(SPECTRAL.latent_dim)
    rescale_latents(codec, factors)
    torch.testing.assert_close(codec.encode(wav), latents * factors, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(codec.decode(codec.encode(wav)), audio, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="positive factors"):
        rescale_latents(codec, -factors)


def test_flattening_factors_interpolate_between_as_is_and_whitened() -> None:
    latents = torch.randn(4000, 8) * torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05])
    for power in (0.0, 0.5, 1.0):
        scaled = latents * flattening_factors(latents, power)
        assert float(scaled.square().mean()) == pytest.approx(1.0, rel=1e-4)
        std = scaled.std(dim=0)
        # Ratios of standard deviations shrink to the power 1 - power.
        ratio = float(std[0] / std[-1])
        assert ratio == pytest.approx(160.0 ** (1 - power), rel=0.1)


def test_flatten_latents_writes_a_checkpoint_whose_codec_decodes_as_before(tmp_path: Path) -> None:
    config = MichiConfig.preset("tiny").model_copy(update={"codec": SPECTRAL})
    torch.manual_seed(0)
    model = MichiModel(config).eval()
    init_spectral_codec_from_pca(model.codec, _clips(12, 10))
    save_checkpoint(model, tmp_path / "codec")
    main(["flatten-latents", "--checkpoint", str(tmp_path / "codec"), "--manifest", str(_glide_manifest(tmp_path / "glides")),
          "--out-dir", str(tmp_path / "flat"), "--power", "1"])
    flat = load_checkpoint(tmp_path / "flat").eval()
    wav = _clips(1, 6, seed=3)[0][None]
    with torch.no_grad():
        torch.testing.assert_close(flat.codec.decode(flat.codec.encode(wav)), model.codec.decode(model.codec.encode(wav)),
                                   atol=1e-5, rtol=1e-4)
        ratio = model.codec.encode(wav)[0].std(dim=0) / flat.codec.encode(wav)[0].std(dim=0)
    assert float(ratio.max() / ratio.min()) > 2  # whitened: components rescaled unequally
    with pytest.raises(ValueError):
        FlattenLatentsConfig(checkpoint=tmp_path, manifest=tmp_path, out_dir=tmp_path, power=1.5)
