"""The codec and its streaming convolutions: streaming equals offline, rows are independent,
steps are pure, and bad shapes are refused."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from pipecat_michi.model.codec import (
    Codec,
    CodecDecoder,
    CodecEncoder,
    multi_resolution_stft_loss,
)
from pipecat_michi.model.config import CodecConfig, MichiConfig
from pipecat_michi.model.streaming import (
    StreamingConv1d,
    StreamingConvTranspose1d,
    StreamingModule,
    StreamingState,
)

ATOL = 1e-5
NUM_FRAMES = 5


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# The spectral codec at the tiny preset's size: an STFT front-end and an inverse-STFT decoder.
TINY_SPECTRAL = MichiConfig.preset("tiny").codec.model_copy(
    update={"strides": (8,), "stft_hop": 240, "resblock_dilations": (1, 3)}
)


@pytest.fixture(scope="module", params=["waveform", "spectral"])
def tiny_cfg(request: pytest.FixtureRequest) -> CodecConfig:
    if request.param == "spectral":
        return CodecConfig.model_validate(TINY_SPECTRAL.model_dump())
    return MichiConfig.preset("tiny").codec


def _run_chunks(
    module: StreamingModule, chunks: list[torch.Tensor], state: StreamingState
) -> tuple[torch.Tensor, StreamingState]:
    outputs = []
    for chunk in chunks:
        out, state = module.step(chunk, state)
        outputs.append(out)
    return torch.cat(outputs, dim=-1), state


def _random_chunks(x: torch.Tensor, unit: int, max_units: int) -> list[torch.Tensor]:
    """Split ``x`` along time into chunks of random multiples of ``unit`` samples."""
    chunks, start = [], 0
    while start < x.shape[-1]:
        length = unit * int(torch.randint(1, max_units + 1, ()))
        chunks.append(x[..., start : start + length])
        start += length
    return chunks


@pytest.mark.parametrize(
    ("kernel_size", "stride", "dilation"),
    [(1, 1, 1), (3, 1, 1), (3, 1, 4), (7, 1, 2), (4, 2, 1), (5, 5, 1), (10, 5, 1), (16, 8, 1)],
)
def test_conv1d_chunked_streaming_equals_offline(
    kernel_size: int, stride: int, dilation: int
) -> None:
    conv = StreamingConv1d(3, 4, kernel_size, stride=stride, dilation=dilation)
    x = torch.randn(2, 3, stride * 24)
    offline = conv(x)
    assert offline.shape == (2, 4, 24)
    streamed, _ = _run_chunks(conv, _random_chunks(x, stride, 4), conv.init_state(2))
    torch.testing.assert_close(streamed, offline, atol=ATOL, rtol=0)


def test_conv1d_is_causal() -> None:
    conv = StreamingConv1d(1, 1, 5, dilation=2)
    x = torch.randn(1, 1, 32)
    changed = x.clone()
    changed[..., 20:] += 1.0
    torch.testing.assert_close(conv(changed)[..., :20], conv(x)[..., :20])


@pytest.mark.parametrize(
    ("kernel_size", "stride"), [(1, 1), (3, 1), (4, 2), (5, 2), (7, 2), (16, 8)]
)
def test_conv_transpose1d_chunked_streaming_equals_offline(kernel_size: int, stride: int) -> None:
    convtr = StreamingConvTranspose1d(3, 4, kernel_size, stride)
    x = torch.randn(2, 3, 20)
    offline = convtr(x)
    assert offline.shape == (2, 4, 20 * stride)
    streamed, _ = _run_chunks(convtr, _random_chunks(x, 1, 3), convtr.init_state(2))
    torch.testing.assert_close(streamed, offline, atol=ATOL, rtol=0)


def test_streaming_primitives_reject_bad_arguments() -> None:
    conv = StreamingConv1d(1, 1, 4, stride=2)
    with pytest.raises(ValueError, match="multiple of stride"):
        conv.step(torch.randn(1, 1, 3), conv.init_state(1))
    with pytest.raises(ValueError, match="stride"):
        StreamingConv1d(1, 1, 2, stride=3)
    with pytest.raises(ValueError, match="kernel_size"):
        StreamingConvTranspose1d(1, 1, 2, stride=3)


def _encoder_frames(cfg: CodecConfig, batch: int) -> list[torch.Tensor]:
    wav = 0.5 * torch.randn(batch, NUM_FRAMES * cfg.frame_samples)
    return list(wav.split(cfg.frame_samples, dim=1))


def _decoder_frames(cfg: CodecConfig, batch: int) -> list[torch.Tensor]:
    return list(torch.randn(batch, NUM_FRAMES, cfg.latent_dim).unbind(1))


# The two streaming halves of the codec, each with a maker of its per-frame inputs.
_CASES = {"encoder": (CodecEncoder, _encoder_frames), "decoder": (CodecDecoder, _decoder_frames)}


def _make(
    name: str, cfg: CodecConfig
) -> tuple[StreamingModule, Callable[[int], list[torch.Tensor]]]:
    module_cls, make_frames = _CASES[name]
    return module_cls(cfg).eval(), lambda batch: make_frames(cfg, batch)


def _step_frames(
    module: StreamingModule, frames: list[torch.Tensor], state: StreamingState
) -> tuple[list[torch.Tensor], StreamingState]:
    outputs = []
    for frame in frames:
        out, state = module.step(frame, state)
        outputs.append(out)
    return outputs, state


@torch.no_grad()
def test_encoder_step_equals_forward(tiny_cfg: CodecConfig) -> None:
    encoder = CodecEncoder(tiny_cfg).eval()
    wav = 0.5 * torch.randn(2, NUM_FRAMES * tiny_cfg.frame_samples)
    offline = encoder(wav)
    assert offline.shape == (2, NUM_FRAMES, tiny_cfg.latent_dim)
    frames = wav.split(tiny_cfg.frame_samples, dim=1)
    latents, _ = _step_frames(encoder, list(frames), encoder.init_state(2))
    assert latents[0].shape == (2, tiny_cfg.latent_dim)
    torch.testing.assert_close(torch.stack(latents, dim=1), offline, atol=ATOL, rtol=0)


@torch.no_grad()
def test_decoder_step_equals_forward(tiny_cfg: CodecConfig) -> None:
    decoder = CodecDecoder(tiny_cfg).eval()
    latents = torch.randn(2, NUM_FRAMES, tiny_cfg.latent_dim)
    offline = decoder(latents)
    assert offline.shape == (2, NUM_FRAMES * tiny_cfg.frame_samples)
    assert offline.abs().max() <= 1.0
    wav_frames, _ = _step_frames(decoder, list(latents.unbind(1)), decoder.init_state(2))
    assert wav_frames[0].shape == (2, tiny_cfg.frame_samples)
    torch.testing.assert_close(torch.cat(wav_frames, dim=1), offline, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(_CASES))
@torch.no_grad()
def test_init_state_is_zero_and_batch_first(name: str, tiny_cfg: CodecConfig) -> None:
    module, _ = _make(name, tiny_cfg)
    state = module.init_state(3)
    assert state
    for key, tensor in state.items():
        assert tensor.shape[0] == 3, key
        assert not tensor.any(), key


@pytest.mark.parametrize("name", sorted(_CASES))
@torch.no_grad()
def test_batch_rows_are_independent_and_resettable(name: str, tiny_cfg: CodecConfig) -> None:
    module, make_frames = _make(name, tiny_cfg)
    frames = make_frames(3)
    split = 2

    together, _ = _step_frames(module, frames, module.init_state(3))
    for row in range(3):
        alone, _ = _step_frames(module, [f[row : row + 1] for f in frames], module.init_state(1))
        for out_together, out_alone in zip(together, alone):
            torch.testing.assert_close(out_together[row : row + 1], out_alone, atol=ATOL, rtol=0)

    # Reset row 1 mid-stream, as the engine does when a slot gets a new call.
    _, state = _step_frames(module, frames[:split], module.init_state(3))
    keep = torch.tensor([True, False, True])
    state = {
        key: torch.where(keep.view(-1, *[1] * (v.dim() - 1)), v, torch.zeros_like(v))
        for key, v in state.items()
    }
    after_reset, _ = _step_frames(module, frames[split:], state)
    fresh_row1, _ = _step_frames(module, [f[1:2] for f in frames[split:]], module.init_state(1))
    for out, continued, fresh in zip(after_reset, together[split:], fresh_row1):
        torch.testing.assert_close(out[[0, 2]], continued[[0, 2]], atol=ATOL, rtol=0)
        torch.testing.assert_close(out[1:2], fresh, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(_CASES))
@torch.no_grad()
def test_step_does_not_mutate_its_state(name: str, tiny_cfg: CodecConfig) -> None:
    module, make_frames = _make(name, tiny_cfg)
    frames = make_frames(2)
    _, state = _step_frames(module, frames[:2], module.init_state(2))
    before = {key: v.clone() for key, v in state.items()}
    _, new_state = module.step(frames[2], state)
    assert new_state.keys() == state.keys()
    for key, v in state.items():
        assert torch.equal(v, before[key]), key


def test_bad_input_shapes_raise(tiny_cfg: CodecConfig) -> None:
    codec = Codec(tiny_cfg)
    frame_samples, latent_dim = tiny_cfg.frame_samples, tiny_cfg.latent_dim
    with pytest.raises(ValueError, match="multiple of frame_samples"):
        codec.encode(torch.zeros(1, frame_samples + 7))
    with pytest.raises(ValueError, match="multiple of frame_samples"):
        codec.encode(torch.zeros(frame_samples))
    with pytest.raises(ValueError, match="one frame"):
        codec.encoder.step(torch.zeros(1, frame_samples // 2), codec.encoder.init_state(1))
    with pytest.raises(ValueError, match="latents shaped"):
        codec.decode(torch.zeros(1, 2, latent_dim + 1))
    with pytest.raises(ValueError, match="one latent"):
        codec.decoder.step(torch.zeros(1, 1, latent_dim), codec.decoder.init_state(1))


@torch.no_grad()
def test_codec_roundtrip_shapes(tiny_cfg: CodecConfig) -> None:
    codec = Codec(tiny_cfg)
    wav = torch.rand(2, 3 * tiny_cfg.frame_samples) * 2 - 1
    latents = codec.encode(wav)
    assert latents.shape == (2, 3, tiny_cfg.latent_dim)
    assert codec.decode(latents).shape == wav.shape


@pytest.mark.parametrize(
    "cfg",
    [MichiConfig.preset("michi-530m").codec, CodecConfig()],
    ids=["michi-530m (spectral)", "waveform, HiFi-GAN V1 width"],
)
@torch.no_grad()
def test_large_codec_shapes(cfg: CodecConfig) -> None:
    codec = Codec(cfg).eval()
    latents = codec.encode(0.1 * torch.randn(1, 2 * cfg.frame_samples))
    assert latents.shape == (1, 2, cfg.latent_dim)
    assert codec.decode(latents).shape == (1, 2 * cfg.frame_samples)


def test_speaking_presets_share_one_codec() -> None:
    # A codec trained for michi-nano must load into michi-530m unchanged.
    assert MichiConfig.preset("michi-530m").codec == MichiConfig.preset("michi-nano").codec
    assert MichiConfig.preset("michi-530m").codec.stft_hop is not None


def test_stft_loss_zero_for_identical_positive_otherwise_and_differentiable() -> None:
    target = 0.5 * torch.randn(2, 4096)
    assert multi_resolution_stft_loss(target, target.clone()).item() == pytest.approx(0.0, abs=1e-6)

    pred = (target + 0.1 * torch.randn_like(target)).requires_grad_()
    loss = multi_resolution_stft_loss(pred, target)
    assert loss.item() > 0
    loss.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_stft_loss_handles_short_inputs() -> None:
    target = torch.randn(1, 300)
    assert multi_resolution_stft_loss(target + 0.1, target).item() > 0
    with pytest.raises(ValueError, match="shapes differ"):
        multi_resolution_stft_loss(target, target[:, :200])
