"""The flow head's monologue context: the history the step carries is the one training builds,
a model that gains it speaks as before until it learns, and batched calls never share it."""

import pytest
import torch

from pipecat_michi.model.checkpoint import load_checkpoint, save_checkpoint
from pipecat_michi.model.config import MichiConfig
from pipecat_michi.model.michi import MichiModel, Sampling, StepNoise
from pipecat_michi.model.monologue import advance_history, empty_history, history_over_frames

TINY = MichiConfig.preset("tiny")
WITH_CONTEXT = TINY.model_copy(update={"flow": TINY.flow.model_copy(update={"monologue_tokens": 3,
                                                                           "monologue_max_age": 5})})
PAD = TINY.tokens.pad_id
FRAME = TINY.frame_samples


def test_a_said_token_enters_in_front_at_age_zero_and_every_age_grows_to_the_cap() -> None:
    history, ages = empty_history(1, 3, 5, PAD)
    said = [7, PAD, 8, 9, PAD, PAD, PAD, PAD, PAD, 4]
    seen = []
    for token in said:
        history, ages = advance_history(history, ages, torch.tensor([token]), PAD, 5)
        seen.append((history[0].tolist(), ages[0].tolist()))
    assert seen[0] == ([7, PAD, PAD], [0, 5, 5])
    assert seen[1] == ([7, PAD, PAD], [1, 5, 5])
    assert seen[3] == ([9, 8, 7], [0, 1, 3])
    assert seen[8] == ([9, 8, 7], [5, 5, 5])  # capped
    assert seen[9] == ([4, 9, 8], [0, 5, 5])  # the oldest left


def test_training_builds_the_history_each_step_holds() -> None:
    inputs = torch.randint(0, 20, (2, 30), generator=torch.Generator().manual_seed(0))
    inputs[torch.rand(2, 30, generator=torch.Generator().manual_seed(1)) < 0.6] = PAD
    tokens, ages = history_over_frames(inputs, 3, 5, PAD)
    history, history_ages = empty_history(2, 3, 5, PAD)
    for t in range(30):
        history, history_ages = advance_history(history, history_ages, inputs[:, t], PAD, 5)
        assert torch.equal(tokens[:, t], history) and torch.equal(ages[:, t], history_ages)


def _sampling(batch: int) -> Sampling:
    return Sampling(temperature=torch.full((batch,), 0.9), top_k=torch.full((batch,), 20, dtype=torch.long),
                    speak_threshold=torch.full((batch,), 0.0))  # always speaking: the flow head's output plays


def _steps(model: MichiModel, audio: torch.Tensor, seeds: list[int]) -> tuple[list, dict]:
    batch = audio.shape[0]
    cache, state = model.new_cache(batch), model.init_state(batch)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    outputs = []
    for f in range(audio.shape[1]):
        out, state = model.step(audio[:, f], state, cache, _sampling(batch),
                                StepNoise.draw(generators, TINY.codec.latent_dim))
        outputs.append(out)
    return outputs, state


def _pair() -> tuple[MichiModel, MichiModel]:
    torch.manual_seed(0)
    plain = MichiModel(TINY).eval()
    with_context = MichiModel(WITH_CONTEXT).eval()
    missing, unexpected = with_context.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(key.startswith("monologue.") for key in missing)
    return plain, with_context


def _learned(model: MichiModel) -> MichiModel:
    """The context's zero last layer moved, as training moves it."""
    with torch.no_grad():
        model.monologue.mix[-1].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    return model


def test_a_new_context_speaks_exactly_as_the_model_did_until_it_learns() -> None:
    plain, with_context = _pair()
    audio = 0.2 * torch.randn(2, 6, FRAME, generator=torch.Generator().manual_seed(1))
    before, _ = _steps(plain, audio, [1, 2])
    after, state = _steps(with_context, audio, [1, 2])
    for a, b in zip(before, after):
        assert torch.equal(a.text_tokens, b.text_tokens)
        torch.testing.assert_close(a.latents, b.latents, atol=0, rtol=0)
    assert state["monologue_history"].shape == (2, 3)


def test_the_step_carries_the_monologue_it_said_and_its_sound_depends_on_it() -> None:
    _, model = _pair()
    model = _learned(model)
    audio = 0.2 * torch.randn(1, 8, FRAME, generator=torch.Generator().manual_seed(1))
    outputs, state = _steps(model, audio, [4])
    said = torch.stack([o.text_tokens for o in outputs], dim=1)  # [1, F]: each step's input is the one before
    inputs = torch.cat([torch.full((1, 1), PAD), said[:, :-1]], dim=1)
    tokens, ages = history_over_frames(inputs, 3, 5, PAD)
    # The state after the last step holds what that step conditioned on.
    assert torch.equal(state["monologue_history"], tokens[:, -1]) and torch.equal(state["monologue_ages"], ages[:, -1])
    hidden = torch.randn(1, TINY.backbone.hidden_size)
    other = tokens[:, -1].clone()
    other[0, 0] = (int(other[0, 0]) + 1) % TINY.backbone.vocab_size
    with torch.no_grad():
        assert not torch.equal(model.flow_condition(hidden, tokens[:, -1], ages[:, -1]),
                               model.flow_condition(hidden, other, ages[:, -1]))


def test_batched_calls_never_share_a_monologue() -> None:
    _, model = _pair()
    model = _learned(model)
    audio = 0.2 * torch.randn(3, 5, FRAME, generator=torch.Generator().manual_seed(2))
    batched, _ = _steps(model, audio, [10, 11, 12])
    for row in range(3):
        alone, _ = _steps(model, audio[row: row + 1], [10 + row])
        for b, a in zip(batched, alone):
            assert b.text_tokens[row] == a.text_tokens[0]
            torch.testing.assert_close(b.latents[row], a.latents[0], atol=1e-5, rtol=1e-4)


def test_a_checkpoint_keeps_its_monologue_context(tmp_path) -> None:
    _, model = _pair()
    model = _learned(model)
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "ckpt"))
    assert loaded.config.flow.monologue_tokens == 3
    for key, value in model.monologue.state_dict().items():
        assert torch.equal(loaded.monologue.state_dict()[key], value), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_context_runs_in_every_dtype_the_engine_picks(dtype) -> None:
    _, model = _pair()
    model = _learned(model).to(dtype)
    outputs, state = _steps(model, 0.2 * torch.randn(1, 3, FRAME, generator=torch.Generator().manual_seed(5)), [1])
    assert outputs[-1].latents.dtype == dtype and torch.isfinite(outputs[-1].latents.float()).all()
    assert state["monologue_ages"].dtype == torch.long
