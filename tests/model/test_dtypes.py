"""Every dtype the product selects (float32 on CPU, bf16 on CUDA, fp16 by choice) runs the duplex
step, and bf16/fp16 stay close to float32 on one seeded call."""

import copy

import pytest
import torch

from pipecat_michi.model.config import CodecConfig, MichiConfig
from pipecat_michi.model.michi import MichiModel, Sampling, StepNoise
from pipecat_michi.model.parity import compare, run_call, seeded_call_audio

TINY = MichiConfig.preset("tiny")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (text agreement, latent cosine, audio SNR dB) a cast must reach on the seeded call below.
# Measured on seeds 0-2, 25 frames: bf16 text 0.96-1.0, cosine 0.99999, SNR 29.7-52 dB;
# fp16 text 1.0, cosine 0.9999999+, SNR 45.9-70.6 dB. Bars sit below with room for kernels.
PARITY_BARS = {torch.bfloat16: (0.9, 0.999, 20.0), torch.float16: (0.95, 0.9999, 35.0)}


# The tiny preset with the spectral codec (michi-nano's kind): its STFT/iSTFT run in float32.
TINY_SPECTRAL = TINY.model_copy(update={"codec": CodecConfig.model_validate(
    TINY.codec.model_dump() | {"strides": (8,), "stft_hop": 240, "resblock_dilations": (1, 3)})})


@pytest.fixture(scope="module", params=["waveform-codec", "spectral-codec"])
def reference(request: pytest.FixtureRequest) -> MichiModel:
    torch.manual_seed(0)
    return MichiModel(TINY_SPECTRAL if request.param == "spectral-codec" else TINY).eval()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_step_runs_in_every_dtype_and_keeps_the_state_dtypes(reference: MichiModel, dtype: torch.dtype) -> None:
    model = copy.deepcopy(reference).to(dtype)
    cache, state = model.new_cache(2), model.init_state(2)
    sampling = Sampling(torch.full((2,), 0.8), torch.full((2,), 20, dtype=torch.long), torch.full((2,), 0.01))
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    for _ in range(3):
        noise = StepNoise.draw(generators, TINY.codec.latent_dim)
        out, new_state = model.step(0.1 * torch.randn(2, TINY.frame_samples), state, cache, sampling, noise,
                                    active=[True, False])
        assert {k: v.dtype for k, v in new_state.items()} == {k: v.dtype for k, v in state.items()}
        state = new_state
    assert out.latents.dtype == dtype and out.audio.dtype == torch.float32
    assert torch.isfinite(out.latents).all() and torch.isfinite(out.audio).all()
    assert out.audio[0].abs().max() > 0  # row 0 speaks (threshold 0.01)
    assert cache.keys.dtype == dtype and cache.lengths.tolist() == [3, 0] and cache.host_lengths == [3, 0]
    # The mel front-end and RoPE constants are never rounded to the model's dtype.
    assert state["listening.mel_history"].dtype == torch.float32
    assert model.listening.log_mel.filters.dtype == torch.float32
    assert model.backbone.rotary.inv_freq.dtype == torch.float32


@pytest.mark.parametrize("dtype", list(PARITY_BARS), ids=str)
def test_half_precision_follows_float32_on_a_seeded_call(reference: MichiModel, dtype: torch.dtype) -> None:
    audio = seeded_call_audio(reference, frames=25, seed=0)
    expected = run_call(reference, audio, seed=0)
    agreement = compare(expected, run_call(copy.deepcopy(reference).to(dtype), audio, seed=0))
    min_text, min_cosine, min_snr_db = PARITY_BARS[dtype]
    assert agreement.text_agreement >= min_text, agreement
    assert agreement.latent_cosine >= min_cosine, agreement
    assert agreement.audio_snr_db >= min_snr_db, agreement


def test_parity_measures_detect_a_different_model(reference: MichiModel) -> None:
    audio = seeded_call_audio(reference, frames=10, seed=0)
    torch.manual_seed(1)
    other = MichiModel(reference.config).eval()
    agreement = compare(run_call(reference, audio, seed=0), run_call(other, audio, seed=0))
    assert not agreement.passes() and agreement.audio_snr_db < 3.0
    assert compare(run_call(reference, audio, seed=0), run_call(reference, audio, seed=0)).audio_snr_db == float("inf")


def test_a_teacher_forced_call_reads_the_forced_history(reference: MichiModel) -> None:
    audio = seeded_call_audio(reference, frames=8, seed=0)
    expected = run_call(reference, audio, seed=0)
    # Forced with its own trace, a model runs exactly as free-running.
    forced_self = run_call(reference, audio, seed=0, forced=expected)
    assert torch.equal(forced_self.text_tokens, expected.text_tokens)
    assert torch.equal(forced_self.latents, expected.latents)
    # Forced with another history, every frame after the first reads it: the first frame is
    # unchanged (nothing fed back yet), later latents move.
    altered = type(expected)(
        (expected.text_tokens + 7) % reference.config.backbone.vocab_size, -expected.latents, expected.audio
    )
    forced_other = run_call(reference, audio, seed=0, forced=altered)
    assert torch.equal(forced_other.latents[0], expected.latents[0])
    assert not torch.allclose(forced_other.latents[1:], expected.latents[1:])
    with pytest.raises(ValueError, match="forced trace has 8 frames"):
        run_call(reference, audio[:5], seed=0, forced=expected)


def test_recorded_top2_tells_a_near_tie_from_a_decided_frame(reference: MichiModel) -> None:
    from pipecat_michi.model.parity import flips_at_near_ties, recorded_text_top2

    audio = seeded_call_audio(reference, frames=6, seed=0)
    with recorded_text_top2(reference) as records:
        expected = run_call(reference, audio, seed=0)
    assert "logits" not in vars(reference.backbone)  # the method is back
    top2 = torch.cat(records)
    assert top2.shape == (6, 2) and (top2[:, 0] >= top2[:, 1]).all()
    flipped = type(expected)(expected.text_tokens.clone(), expected.latents, expected.audio)
    flipped.text_tokens[[1, 4]] += 1
    decided = torch.tensor([[0.9, 0.05]]).repeat(6, 1)
    tied = decided.clone()
    tied[4] = torch.tensor([0.3, 0.2])
    assert flips_at_near_ties(expected, flipped, decided) == (0, 2)
    assert flips_at_near_ties(expected, flipped, tied) == (1, 2)
