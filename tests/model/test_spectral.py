"""The spectral codec's STFT front-end and inverse-STFT back-end: exact reconstruction through
the overlap-add, causality, streaming equals offline, and the configuration's checks."""

from __future__ import annotations

import pytest
import torch

from pipecat_michi.model.codec import Codec, align_reconstruction
from pipecat_michi.model.config import CodecConfig, MichiConfig
from pipecat_michi.model.spectral import CausalISTFT, CausalSTFT

HOP = 240


def _true_spectrum(wav: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """Log-magnitude and phase of frames ``wav[j*hop - (n_fft-hop) : (j+1)*hop]`` under a
    square-root Hann window, computed here from the definition: what the inverse STFT must turn
    back into ``wav``."""
    padded = torch.nn.functional.pad(wav, (n_fft - hop, 0))
    window = torch.hann_window(n_fft, periodic=True).sqrt()
    spectrum = torch.fft.rfft(padded.unfold(-1, n_fft, hop) * window, dim=-1)
    return torch.cat([spectrum.abs().clamp(min=1e-9).log(), spectrum.angle()], dim=-1).transpose(1, 2)


@pytest.mark.parametrize("overlap", [2, 4])
def test_inverse_stft_rebuilds_the_signal_after_its_delay(overlap: int) -> None:
    n_fft = overlap * HOP
    istft = CausalISTFT(n_fft, HOP)
    wav = 0.3 * torch.randn(2, 20 * HOP)
    rebuilt = istft(_true_spectrum(wav, n_fft, HOP))
    delay = n_fft - HOP
    assert rebuilt.shape == wav.shape
    torch.testing.assert_close(rebuilt[:, delay:], wav[:, :-delay], atol=1e-5, rtol=0)


@pytest.mark.parametrize("module", ["stft", "istft"])
def test_chunked_streaming_equals_offline(module: str) -> None:
    torch.manual_seed(0)
    if module == "stft":
        layer, x = CausalSTFT(2 * HOP, HOP), 0.3 * torch.randn(2, 24 * HOP)
        unit = HOP
    else:
        layer, x = CausalISTFT(4 * HOP, HOP), torch.randn(2, 2 * (2 * HOP + 1), 24)
        unit = 1
    offline = layer(x)
    state, outputs, start = layer.init_state(2), [], 0
    for length in [1, 3, 2, 5, 1, 4, 8]:
        out, state = layer.step(x[..., start : start + length * unit], state)
        outputs.append(out)
        start += length * unit
    torch.testing.assert_close(torch.cat(outputs, dim=-1), offline, atol=1e-5, rtol=0)


def test_stft_frames_never_read_the_future() -> None:
    stft = CausalSTFT(2 * HOP, HOP)
    wav = torch.randn(1, 10 * HOP)
    changed = wav.clone()
    changed[:, 6 * HOP :] += 1.0
    torch.testing.assert_close(stft(changed)[..., :6], stft(wav)[..., :6])
    assert not torch.allclose(stft(changed)[..., 6], stft(wav)[..., 6])


def test_stft_runs_in_bfloat16_through_float32() -> None:
    torch.manual_seed(0)
    stft, istft = CausalSTFT(2 * HOP, HOP), CausalISTFT(2 * HOP, HOP)
    wav = 0.3 * torch.randn(1, 8 * HOP)
    features = stft(wav.bfloat16())
    assert features.dtype == torch.bfloat16
    # The input's bf16 rounding (~0.4%) moves the quietest bins most: compare the log-magnitudes
    # loosely, their mean tightly.
    torch.testing.assert_close(features.float(), stft(wav), atol=0.4, rtol=0.05)
    assert (features.float() - stft(wav)).abs().mean() < 0.05
    assert istft(_true_spectrum(wav, 2 * HOP, HOP).bfloat16()).dtype == torch.bfloat16


def test_spectral_codec_config_is_checked() -> None:
    cfg = CodecConfig(strides=(8,), stft_hop=240)
    assert cfg.spectral and cfg.n_fft == 480 and cfg.decoder_delay_samples == 240
    assert CodecConfig(strides=(2, 4), stft_hop=240, stft_n_fft=960).decoder_delay_samples == 720
    assert CodecConfig().decoder_delay_samples == 0 and not CodecConfig().spectral
    with pytest.raises(ValueError, match="frame_samples"):
        CodecConfig(strides=(2, 4, 5), stft_hop=240)
    with pytest.raises(ValueError, match="multiple of stft_hop"):
        CodecConfig(strides=(8,), stft_hop=240, stft_n_fft=600)
    with pytest.raises(ValueError, match="at least twice"):
        CodecConfig(strides=(8,), stft_hop=240, stft_n_fft=240)
    with pytest.raises(ValueError, match="needs stft_hop"):
        CodecConfig(stft_n_fft=480)
    with pytest.raises(ValueError, match="takes \\[batch"):
        CausalISTFT(480, 240)(torch.zeros(1, 10, 3))
    with pytest.raises(ValueError, match="multiple of hop"):
        CausalSTFT(480, 240).step(torch.zeros(1, 100), CausalSTFT(480, 240).init_state(1))


def test_michi_nano_uses_the_spectral_codec_and_aligns_its_delay() -> None:
    cfg = MichiConfig.preset("michi-nano").codec
    assert cfg.spectral and cfg.latent_dim == 64
    codec = Codec(cfg).eval()
    wav = 0.1 * torch.randn(1, 3 * cfg.frame_samples)
    with torch.no_grad():
        recon = codec.decode(codec.encode(wav))
    aligned_recon, aligned_wav = align_reconstruction(recon, wav, cfg.decoder_delay_samples)
    assert aligned_recon.shape == aligned_wav.shape == (1, 3 * cfg.frame_samples - cfg.decoder_delay_samples)
    torch.testing.assert_close(aligned_recon, recon[:, cfg.decoder_delay_samples :])
    with pytest.raises(ValueError, match="shorter than the decoder"):
        align_reconstruction(recon[:, :100], wav[:, :100], cfg.decoder_delay_samples)


def test_training_after_a_context_matches_the_stream() -> None:
    from pipecat_michi.model.codec import reconstruct_after_context

    torch.manual_seed(0)
    cfg = MichiConfig.preset("tiny").codec.model_copy(update={"strides": (8,), "stft_hop": 240,
                                                               "resblock_dilations": (1, 3)})
    codec = Codec(CodecConfig.model_validate(cfg.model_dump())).eval()
    wav = 0.3 * torch.randn(2, 5 * cfg.frame_samples)
    with torch.no_grad():
        whole = codec.decode(codec.encode(wav))
    recon, target, latents = reconstruct_after_context(codec, wav, context_frames=2)
    assert latents.shape == (2, 3, cfg.latent_dim)
    # Exactly what the whole stream decodes there, against the input its delay points at.
    torch.testing.assert_close(recon, whole[:, 2 * cfg.frame_samples :], atol=1e-5, rtol=0)
    torch.testing.assert_close(target, wav[:, 2 * cfg.frame_samples - 240 : -240])
    assert recon.requires_grad  # the context warms the state without a graph; the rest learns
    with pytest.raises(ValueError, match="nothing to train on"):
        reconstruct_after_context(codec, wav, context_frames=5)



def test_the_synthesis_magnitudes_are_what_the_inverse_stft_needs() -> None:
    from pipecat_michi.model.spectral import synthesis_log_magnitude

    torch.manual_seed(0)
    wav = 0.3 * torch.randn(1, 12 * HOP)
    magnitude = synthesis_log_magnitude(wav, 2 * HOP, HOP)
    torch.testing.assert_close(magnitude, _true_spectrum(wav, 2 * HOP, HOP)[:, : HOP + 1], atol=1e-4, rtol=0)


def test_the_codec_loss_pairs_each_decoder_frame_with_its_true_magnitudes() -> None:
    from pipecat_michi.model.codec import reconstruct_with_spectrum

    torch.manual_seed(0)
    cfg = CodecConfig.model_validate(MichiConfig.preset("tiny").codec.model_dump() | {
        "strides": (8,), "stft_hop": 240, "resblock_dilations": (1, 3)})
    codec = Codec(cfg)
    wav = 0.3 * torch.randn(2, 6 * cfg.frame_samples)
    for context in (0, 2):
        recon, target, _, (predicted, true) = reconstruct_with_spectrum(codec, wav, context)
        frames = (6 - context) * cfg.frame_samples // 240
        assert predicted.shape == true.shape == (2, 241, frames) and recon.shape == target.shape
        # The true magnitudes of the first trained frame are those of the input just before it.
        start = context * cfg.frame_samples
        window = torch.hann_window(480, periodic=True).sqrt()
        first = torch.fft.rfft(torch.nn.functional.pad(wav, (240, 0))[:, start : start + 480] * window).abs()
        torch.testing.assert_close(true[:, :, 0], first.clamp(min=1e-5).log(), atol=1e-4, rtol=0)
    waveform = Codec(MichiConfig.preset("tiny").codec)
    assert reconstruct_with_spectrum(waveform, wav, 0)[3] is None
