"""Forced and paced speech: the text the bot speaks goes into its inner monologue when and as
the evaluation says."""

from __future__ import annotations

import pytest
import torch

from pipecat_michi.model.config import MichiConfig
from pipecat_michi.model.michi import MichiModel
from pipecat_michi.model.checkpoint import save_checkpoint
from pipecat_michi.train.evaluate import forced_speech, load_speaking_checkpoint, paced_speech


@pytest.fixture(scope="module")
def model() -> MichiModel:
    torch.manual_seed(0)
    return MichiModel(MichiConfig.preset("tiny")).eval()


def _text_head_wants(model: MichiModel, pattern: list[bool], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make the text head ask for a token at the steps ``pattern`` marks (PAD elsewhere, then PAD
    for good); returns the monologue tokens the model is given, one list per step."""
    fed: list[int] = []
    pad_id, vocab = model.config.tokens.pad_id, model.config.backbone.vocab_size
    original_embed = model.backbone.embed_tokens.forward

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        step = len(fed) - 1  # this step's monologue input is already in
        out = torch.zeros(hidden.shape[0], vocab)
        out[:, (pad_id + 1) % vocab if step < len(pattern) and pattern[step] else pad_id] = 1.0
        return out

    def embed(ids: torch.Tensor) -> torch.Tensor:
        fed.append(int(ids[0]))
        return original_embed(ids)

    monkeypatch.setattr(model.backbone, "logits", logits)
    monkeypatch.setattr(model.backbone.embed_tokens, "forward", embed)
    return fed


def test_paced_speech_feeds_the_next_token_whenever_the_text_head_asks(
    model: MichiModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    pad = model.config.tokens.pad_id
    fed = _text_head_wants(model, [False, True, False, True, True, False], monkeypatch)
    wav, said = paced_speech(model, [7, 8, 9], torch.Generator().manual_seed(0), max_frames=40, tail_frames=2)
    assert said == 3
    # Step t's text goes in at step t + 1: PAD first, then what each step's head asked for.
    assert fed == [pad, pad, 7, pad, 8, 9, pad]
    # Step 4 asked for the last token; two more frames (steps 5 and 6) and it stops.
    assert wav.shape == (7 * model.config.frame_samples,)


def test_paced_speech_stops_at_max_frames_when_the_model_never_asks(
    model: MichiModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    _text_head_wants(model, [], monkeypatch)
    wav, said = paced_speech(model, [7, 8], torch.Generator().manual_seed(0), max_frames=5)
    assert said == 0 and wav.shape == (5 * model.config.frame_samples,)


def test_forced_speech_speaks_one_frame_per_text_frame(model: MichiModel) -> None:
    text = torch.tensor([model.config.tokens.pad_id, 7, 8, model.config.tokens.pad_id])
    wav = forced_speech(model, text, torch.Generator().manual_seed(0))
    assert wav.shape == (4 * model.config.frame_samples,) and torch.isfinite(wav).all()


def test_a_speaking_checkpoint_loads_with_its_sampling_temperature(tmp_path) -> None:
    torch.manual_seed(0)
    save_checkpoint(MichiModel(MichiConfig.preset("tiny")), tmp_path / "ck")
    model, tokenizer = load_speaking_checkpoint(tmp_path / "ck")
    assert model.flow.config.noise_scale == 1.0 and not model.training
    assert tokenizer.decode(tokenizer.encode("hi")) == "hi"
    cooled, _ = load_speaking_checkpoint(tmp_path / "ck", flow_noise_scale=0.0)
    cond, noise = torch.randn(3, model.config.backbone.hidden_size), torch.randn(3, model.config.codec.latent_dim)
    # At zero noise the one-step sample no longer depends on the noise drawn.
    torch.testing.assert_close(cooled.flow.sample(cond, noise), cooled.flow.sample(cond, 2 * noise))
    assert not torch.allclose(model.flow.sample(cond, noise), model.flow.sample(cond, 2 * noise))
    # Judged speech is plain data (a benchmark turns it into numpy).
    speech = forced_speech(model, torch.zeros(2, dtype=torch.long), torch.Generator().manual_seed(0))
    assert not speech.requires_grad
