"""The duplex step: batching never mixes calls; injection and voice prompts reach the cache."""

import pytest
import torch

from pipecat_michi.model.config import MichiConfig
from pipecat_michi.model.michi import (
    MichiModel,
    Sampling,
    StepNoise,
    sample_tokens,
    speak_decision,
    speaking_over_time,
)
from pipecat_michi.model.tokenizer import ByteTokenizer, StreamingDetokenizer

TINY = MichiConfig.preset("tiny")
FRAME = TINY.frame_samples


@pytest.fixture(scope="module")
def model() -> MichiModel:
    torch.manual_seed(0)
    return MichiModel(TINY).eval()


def _sampling(batch: int) -> Sampling:
    return Sampling(
        temperature=torch.full((batch,), 0.9),
        top_k=torch.full((batch,), 20, dtype=torch.long),
        speak_threshold=torch.full((batch,), 0.5),
    )


def _run(model: MichiModel, prefixes: list[str], audio: torch.Tensor, seeds: list[int]) -> list[list]:
    """Step len(prefixes) calls together; each call's prefix text puts it at its own position."""
    batch = len(prefixes)
    cache, state = model.new_cache(batch), model.init_state(batch)
    for slot, prefix in enumerate(prefixes):
        model.prefill_text(ByteTokenizer().encode(prefix), cache, slot)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    outputs = []
    for f in range(audio.shape[1]):
        out, state = model.step(audio[:, f], state, cache, _sampling(batch),
                                StepNoise.draw(generators, TINY.codec.latent_dim))
        outputs.append(out)
    return outputs


def test_batched_calls_equal_separate_calls(model: MichiModel) -> None:
    prefixes = ["hi", "a longer system prompt", ""]
    audio = 0.2 * torch.randn(3, 5, FRAME, generator=torch.Generator().manual_seed(1))
    batched = _run(model, prefixes, audio, seeds=[10, 11, 12])
    for row in range(3):
        alone = _run(model, [prefixes[row]], audio[row : row + 1], seeds=[10 + row])
        for b, a in zip(batched, alone):
            assert b.text_tokens[row] == a.text_tokens[0]
            assert torch.equal(b.transcript_tokens[row], a.transcript_tokens[0])
            torch.testing.assert_close(b.latents[row], a.latents[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(b.audio[row], a.audio[0], atol=1e-5, rtol=1e-4)


def test_step_outputs_and_own_audio_feedback(model: MichiModel) -> None:
    cache, state = model.new_cache(2), model.init_state(2)
    sampling = Sampling.greedy(2)
    sampling.speak_threshold = torch.tensor([1e-6, 1 - 1e-6])  # row 0 always speaks, row 1 holds
    noise = StepNoise.draw([torch.Generator().manual_seed(i) for i in range(2)], TINY.codec.latent_dim)
    out, new_state = model.step(torch.zeros(2, FRAME), state, cache, sampling, noise)
    assert out.audio.shape == (2, FRAME) and out.latents.shape == (2, TINY.codec.latent_dim)
    assert out.speaking.tolist() == [True, False]
    assert out.audio[0].abs().max() > 0 and out.audio[1].abs().max() == 0
    torch.testing.assert_close(new_state["prev_latent"][0], out.latents[0])
    assert new_state["prev_latent"][1].abs().max() == 0  # it hears the silence it played
    assert new_state["prev_text"].tolist() == out.text_tokens.tolist()
    assert cache.lengths.tolist() == [1, 1]


def test_the_floor_is_taken_after_onset_frames_in_a_row_and_held_until_the_probability_falls() -> None:
    #              a pause's blip | a longer pause    | the caller is done, the bot speaks | yields
    probs = torch.tensor([0.9, 0.2, 0.9, 0.9, 0.1, 0.8, 0.9, 0.95, 0.99, 0.7, 0.3, 0.9])
    assert speaking_over_time(probs, 0.5, 1).tolist() == (probs > 0.5).tolist()
    assert speaking_over_time(probs, 0.5, 3).nonzero().flatten().tolist() == [7, 8, 9]
    assert speaking_over_time(probs, 0.5, 2).nonzero().flatten().tolist() == [3, 6, 7, 8, 9]
    # Per row: each call its own count, its own run.
    sampling = Sampling.greedy(2)
    sampling.speak_onset_frames = torch.tensor([1, 2])
    speaking, run = speak_decision(torch.tensor([0.9, 0.9]), torch.tensor([0, 0]), sampling)
    assert speaking.tolist() == [True, False] and run.tolist() == [1, 1]
    speaking, run = speak_decision(torch.tensor([0.9, 0.9]), run, sampling)
    assert speaking.tolist() == [True, True] and run.tolist() == [2, 2]


def test_a_held_back_onset_plays_silence_and_the_run_lives_in_the_call_state(model: MichiModel) -> None:
    cache, state = model.new_cache(2), model.init_state(2)
    sampling = Sampling.greedy(2, speak_threshold=1e-6)  # both rows always above the threshold
    sampling.speak_onset_frames = torch.tensor([1, 3])
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    spoke = []
    for _ in range(4):
        out, state = model.step(torch.zeros(2, FRAME), state, cache, sampling,
                                StepNoise.draw(generators, TINY.codec.latent_dim))
        spoke.append(out.speaking.tolist())
        if not out.speaking[1]:  # holding: no audio out, and it hears the silence it played
            assert out.audio[1].abs().max() == 0 and state["prev_latent"][1].abs().max() == 0
    assert spoke == [[True, False], [True, False], [True, True], [True, True]]
    assert state["speak_run"].tolist() == [4, 4]


def test_inactive_rows_keep_state(model: MichiModel) -> None:
    cache, state = model.new_cache(2), model.init_state(2)
    noise = StepNoise.draw([torch.Generator().manual_seed(i) for i in range(2)], TINY.codec.latent_dim)
    _, new_state = model.step(torch.randn(2, FRAME) * 0.1, state, cache, Sampling.greedy(2), noise,
                              active=[True, False])
    for key, value in new_state.items():
        torch.testing.assert_close(value[1], state[key][1], msg=key)
    assert cache.lengths.tolist() == [1, 0]


def test_text_injection_grows_the_cache_and_changes_the_next_frame(model: MichiModel) -> None:
    tokens = ByteTokenizer().encode("Our store opens at 9am.")
    cache, state = model.new_cache(1), model.init_state(1)
    assert model.prefill_text(tokens, cache, 0) == len(tokens)
    plain_cache = model.new_cache(1)
    noise = StepNoise.draw([torch.Generator().manual_seed(0)], TINY.codec.latent_dim)
    injected, _ = model.step(torch.zeros(1, FRAME), state, cache, Sampling.greedy(1), noise)
    plain, _ = model.step(torch.zeros(1, FRAME), model.init_state(1), plain_cache, Sampling.greedy(1), noise)
    assert not torch.allclose(injected.latents, plain.latents)
    assert int(cache.lengths[0]) == len(tokens) + 1


def test_pinned_context_must_be_a_prefix(model: MichiModel) -> None:
    cache = model.new_cache(1)
    model.prefill_text([1, 2, 3], cache, 0, pinned=True)
    model.prefill_text([4, 5], cache, 0, pinned=True)
    assert int(cache.pinned[0]) == 5
    model.prefill_text([6], cache, 0)
    with pytest.raises(ValueError, match="pinned"):
        model.prefill_text([7], cache, 0, pinned=True)


def test_voice_prompt_prefills_pinned_frames(model: MichiModel) -> None:
    cache = model.new_cache(1)
    clip = 0.1 * torch.randn(3 * FRAME + 100, generator=torch.Generator().manual_seed(2))
    assert model.prefill_voice(clip, cache, 0) == 3
    assert int(cache.lengths[0]) == 3 and int(cache.pinned[0]) == 3
    with pytest.raises(ValueError, match="shorter than one frame"):
        model.prefill_voice(torch.zeros(FRAME - 1), model.new_cache(1), 0)


def test_sampling_greedy_top_k_and_temperature() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0], [3.0, 0.0, 0.0, 0.0]])
    greedy = Sampling.greedy(2)
    assert sample_tokens(logits, greedy, torch.tensor([0.99, 0.99])).tolist() == [1, 0]
    top1 = Sampling(torch.ones(2), torch.ones(2, dtype=torch.long), torch.full((2,), 0.5))
    assert sample_tokens(logits, top1, torch.tensor([0.99, 0.5])).tolist() == [1, 0]
    hot = Sampling(torch.full((2,), 100.0), torch.zeros(2, dtype=torch.long), torch.full((2,), 0.5))
    # Near-uniform at high temperature: the top of the CDF picks the last-ranked token.
    assert sample_tokens(logits, hot, torch.tensor([0.999, 0.999])).tolist() == [0, 3]


def test_streaming_detokenizer_never_splits_a_character() -> None:
    tokenizer = ByteTokenizer()
    detok = StreamingDetokenizer(tokenizer)
    ids = [tokenizer.tokens.pad_id] + tokenizer.encode("é😀 ok") + [tokenizer.tokens.eos_id]
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) == "é😀 ok"
    assert all("\ufffd" not in p for p in pieces)


def test_a_host_side_top_k_bound_samples_the_same_tokens_as_a_full_sort() -> None:
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 300, generator=generator)
    sampling = Sampling(torch.tensor([0.7, 1.0, 1.5, 0.0]), torch.tensor([5, 40, 1, 40]), torch.full((4,), 0.5))
    bounded = Sampling(sampling.temperature, sampling.top_k, sampling.speak_threshold, max_top_k=40)
    for _ in range(50):  # across the whole range of draws, not one point of each CDF
        uniform = torch.rand(4, generator=generator)
        assert sample_tokens(logits, bounded, uniform).tolist() == sample_tokens(logits, sampling, uniform).tolist()
