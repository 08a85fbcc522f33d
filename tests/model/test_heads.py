"""Listening head streams exactly like its offline pass; the flow head samples in one step.

A MeanFlow head's one step lands on the modes of a two-mode target; a rectified head's one
step lands on their mean (the defect MeanFlow fixes), though many Euler steps still sample.
"""

from collections.abc import Callable

import pytest
import torch

from pipecat_michi.engine.config import DEMO_CHECKPOINT
from pipecat_michi.model.checkpoint import load_config
from pipecat_michi.model.config import FlowHeadConfig, MichiConfig
from pipecat_michi.model.flow_head import FlowHead
from pipecat_michi.model.listening_head import ListeningHead

TINY = MichiConfig.preset("tiny")


def _listening_head() -> ListeningHead:
    torch.manual_seed(0)
    return ListeningHead(TINY.listening, TINY.frame_samples, TINY.sample_rate_hz,
                         TINY.backbone.hidden_size, TINY.backbone.vocab_size).eval()


@torch.no_grad()
def test_listening_head_streaming_equals_offline_beyond_its_window() -> None:
    head = _listening_head()
    frames = TINY.listening.context_frames + 6  # past the window, so eviction is exercised
    wav = 0.3 * torch.randn(2, frames * TINY.frame_samples, generator=torch.Generator().manual_seed(1))
    embedding, transcript, speak = head(wav)
    state = head.init_state(2)
    for f in range(frames):
        chunk = wav[:, f * TINY.frame_samples : (f + 1) * TINY.frame_samples]
        (e, t, s, logprobs), state = head.step(chunk, state)
        assert logprobs is None  # a frame head has no CTC log-probabilities
        torch.testing.assert_close(e, embedding[:, f], atol=1e-5, rtol=1e-4)
        assert torch.equal(t, transcript[:, f].argmax(dim=-1)[:, None])
        torch.testing.assert_close(s, speak[:, f], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_listening_head_hears_the_audio() -> None:
    head = _listening_head()
    silence = torch.zeros(1, TINY.frame_samples)
    tone = torch.sin(torch.arange(TINY.frame_samples) * 2 * torch.pi * 440 / 24000)[None]
    e_silence = head.step(silence, head.init_state(1))[0].embedding
    e_tone = head.step(tone, head.init_state(1))[0].embedding
    assert (e_silence - e_tone).abs().max() > 1e-3


def _train(head: FlowHead, batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]],
           steps: int, lr: float = 3e-3) -> FlowHead:
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = head.loss(*batch(gen), generator=gen)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head.eval()


@pytest.mark.parametrize("objective", ["mean_flow", "rectified"])
def test_flow_head_training_drives_one_step_error_down(objective: str) -> None:
    torch.manual_seed(0)
    latent_dim, cond_dim = 8, 16
    head = FlowHead(TINY.flow.model_copy(update={"objective": objective}), latent_dim, cond_dim)
    cond = torch.randn(4, cond_dim)
    targets = torch.randn(4, latent_dim)  # one fixed latent per condition
    eval_noise = torch.randn(64, 4, latent_dim, generator=torch.Generator().manual_seed(9))

    def error(steps: int) -> float:
        with torch.no_grad():
            samples = torch.stack([head.sample(cond, n, steps=steps) for n in eval_noise])
        return float((samples - targets).pow(2).mean())

    before = error(1)
    _train(head, lambda gen: (cond.repeat(16, 1), targets.repeat(16, 1)), steps=300)
    after = error(1)
    assert after < 0.1 * before, (before, after)
    assert after < 0.05
    assert error(4) < 0.05  # more steps still land on the target


BIMODAL_DIM, BIMODAL_COND = 2, 8


def _bimodal_batch(gen: torch.Generator, rows: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Each latent coordinate is +1 or -1 at random; the condition says nothing about which."""
    cond = torch.randn(rows, BIMODAL_COND, generator=gen)
    return cond, torch.randint(0, 2, (rows, BIMODAL_DIM), generator=gen).float() * 2 - 1


def _mode_shares(head: FlowHead, steps: int) -> tuple[float, float, float]:
    """Shares of sampled coordinates near +1, near -1 and near the midpoint 0."""
    gen = torch.Generator().manual_seed(9)
    cond, _ = _bimodal_batch(gen, rows=1024)
    with torch.no_grad():
        x = head.sample(cond, torch.randn(1024, BIMODAL_DIM, generator=gen), steps=steps)
    near = lambda centre, radius: float(((x - centre).abs() < radius).float().mean())  # noqa: E731
    return near(1.0, 0.5), near(-1.0, 0.5), near(0.0, 0.25)


def _bimodal_head(objective: str) -> FlowHead:
    torch.manual_seed(0)
    head = FlowHead(FlowHeadConfig(hidden_size=64, num_blocks=2, objective=objective), BIMODAL_DIM, BIMODAL_COND)
    return _train(head, _bimodal_batch, steps=300)


def test_mean_flow_one_step_samples_both_modes_of_a_bimodal_target() -> None:
    head = _bimodal_head("mean_flow")
    # Measured (seed 0): 1 step 0.47 / 0.45 / 0.04 midpoint; 4 steps 0.50 / 0.49 / 0.004.
    for steps in (1, 4):
        plus, minus, middle = _mode_shares(head, steps)
        assert plus >= 0.3 and minus >= 0.3 and middle <= 0.1, (steps, plus, minus, middle)


def test_rectified_one_step_collapses_to_the_mean_of_a_bimodal_target() -> None:
    head = _bimodal_head("rectified")
    # Measured (seed 0): 1 step 0.005 / 0.005 / 0.94 midpoint; 16 steps 0.51 / 0.46 / 0.01.
    plus, minus, middle = _mode_shares(head, steps=1)
    assert plus <= 0.05 and minus <= 0.05 and middle >= 0.8, (plus, minus, middle)
    plus, minus, middle = _mode_shares(head, steps=16)
    assert plus >= 0.3 and minus >= 0.3 and middle <= 0.1, (plus, minus, middle)


@pytest.mark.parametrize("objective", ["mean_flow", "rectified"])
def test_flow_loss_draws_all_its_randomness_from_the_generator(objective: str) -> None:
    torch.manual_seed(0)
    head = FlowHead(TINY.flow.model_copy(update={"objective": objective}), BIMODAL_DIM, BIMODAL_COND)
    cond, target = _bimodal_batch(torch.Generator().manual_seed(0), rows=8)
    losses = [head.loss(cond, target, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(losses[0], losses[1])


def test_configs_without_an_objective_keep_the_rectified_head() -> None:
    assert load_config(DEMO_CHECKPOINT).flow.objective == "rectified"
    assert all(MichiConfig.preset(name).flow.objective == "mean_flow" for name in ("tiny", "michi-nano", "michi-530m"))
    rectified = FlowHead(FlowHeadConfig(hidden_size=16, num_blocks=1), 2, 4)
    assert not any(name.startswith("interval_mlp") for name in rectified.state_dict())
