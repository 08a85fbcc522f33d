"""Listening head streams exactly like its offline pass; the flow head learns a 1-step map."""

import torch

from pipecat_michi.model.config import MichiConfig
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
        (e, t, s), state = head.step(chunk, state)
        torch.testing.assert_close(e, embedding[:, f], atol=1e-5, rtol=1e-4)
        assert torch.equal(t, transcript[:, f].argmax(dim=-1)[:, None])
        torch.testing.assert_close(s, speak[:, f], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_listening_head_hears_the_audio() -> None:
    head = _listening_head()
    silence = torch.zeros(1, TINY.frame_samples)
    tone = torch.sin(torch.arange(TINY.frame_samples) * 2 * torch.pi * 440 / 24000)[None]
    (e_silence, _, _), _ = head.step(silence, head.init_state(1))
    (e_tone, _, _), _ = head.step(tone, head.init_state(1))
    assert (e_silence - e_tone).abs().max() > 1e-3


def test_flow_head_training_drives_one_step_error_down() -> None:
    torch.manual_seed(0)
    latent_dim, cond_dim = 8, 16
    head = FlowHead(TINY.flow, latent_dim, cond_dim)
    cond = torch.randn(4, cond_dim)
    targets = torch.randn(4, latent_dim)  # one fixed latent per condition
    eval_noise = torch.randn(64, 4, latent_dim, generator=torch.Generator().manual_seed(9))

    def one_step_error() -> float:
        with torch.no_grad():
            samples = torch.stack([head.sample(cond, n, steps=1) for n in eval_noise])
        return float((samples - targets).pow(2).mean())

    before = one_step_error()
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(300):
        loss = head.loss(cond.repeat(16, 1), targets.repeat(16, 1), generator=gen)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = one_step_error()
    assert after < 0.1 * before, (before, after)
    assert after < 0.05
