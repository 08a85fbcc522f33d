"""Every stage learns on a tiny corpus, and a resumed run continues exactly where it stopped."""

from pathlib import Path

import pytest
import torch

from pipecat_michi.model.checkpoint import load_checkpoint
from pipecat_michi.train.config import TrainConfig
from pipecat_michi.train.loop import CURVES_FILE, LOSSES_FILE, Trainer


def _config(manifest: Path, out_dir: Path, stage: str, steps: int, **overrides: object) -> TrainConfig:
    fields = {"batch_size": 4, "max_frames": 16, "codec_frames": 16, "lr": 3e-3, "warmup_steps": 0, "seed": 0}
    return TrainConfig(stage=stage, manifest=manifest, out_dir=out_dir, steps=steps, **{**fields, **overrides})


@pytest.mark.parametrize("stage", ["codec", "listening", "speaking", "joint"])
def test_stage_loss_falls(stage: str, tone_manifest: Path, tmp_path: Path) -> None:
    # The codec's HiFi-GAN decoder spikes at 3e-3 on two threads (step 10: 12.7 after 2.6);
    # at 1e-3 it falls steadily on one thread and two alike.
    lr = {"lr": 1e-3} if stage == "codec" else {}
    history = Trainer(_config(tone_manifest, tmp_path / stage, stage, steps=10, **lr)).train()
    first = sum(row["total"] for row in history[:3]) / 3
    last = sum(row["total"] for row in history[-3:]) / 3
    assert last < 0.9 * first, [round(row["total"], 3) for row in history]
    assert (tmp_path / stage / LOSSES_FILE).read_text().count("\n") == 10
    assert (tmp_path / stage / CURVES_FILE).read_bytes().startswith(b"\x89PNG")
    load_checkpoint(tmp_path / stage)  # the run's output is a checkpoint the engine can load


def test_stages_chain_through_init(tone_manifest: Path, tmp_path: Path) -> None:
    Trainer(_config(tone_manifest, tmp_path / "codec", "codec", steps=1)).train()
    codec = load_checkpoint(tmp_path / "codec").codec.state_dict()
    Trainer(_config(tone_manifest, tmp_path / "speaking", "speaking", steps=2, init=tmp_path / "codec")).train()
    after = load_checkpoint(tmp_path / "speaking")
    for name, tensor in after.codec.state_dict().items():  # frozen outside its own stage
        torch.testing.assert_close(tensor, codec[name], rtol=0, atol=0, msg=name)


def test_resume_gives_the_same_next_losses(tone_manifest: Path, tmp_path: Path) -> None:
    straight = Trainer(_config(tone_manifest, tmp_path / "straight", "joint", steps=4)).train()
    Trainer(_config(tone_manifest, tmp_path / "resumed", "joint", steps=2)).train()
    resumed = Trainer(_config(tone_manifest, tmp_path / "resumed", "joint", steps=4, resume=True)).train()
    assert [row["step"] for row in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight[2:], resumed[2:]):
        for name in a:
            assert abs(a[name] - b[name]) <= 1e-6, (name, a[name], b[name])


def test_adversarial_codec_training_adds_discriminator_losses_and_resumes_exactly(
    tone_manifest: Path, tmp_path: Path
) -> None:
    adversarial = {"adversarial": True, "adversarial_start_step": 1, "discriminator_channels": 4}
    straight = Trainer(_config(tone_manifest, tmp_path / "straight", "codec", steps=4, codec_frames=4,
                               **adversarial)).train()
    assert "gen_adv" not in straight[0] and "disc" in straight[0]  # before start_step: D learns alone
    for row in straight[1:]:
        assert row["total"] == pytest.approx(row["stft"] + row["mel_l1"] + row["latent_rms"] + row["adversarial"],
                                             rel=1e-5)
        assert row["feature_match"] > 0 and row["disc"] > 0
    Trainer(_config(tone_manifest, tmp_path / "resumed", "codec", steps=2, codec_frames=4, **adversarial)).train()
    resumed = Trainer(_config(tone_manifest, tmp_path / "resumed", "codec", steps=4, codec_frames=4, resume=True,
                              **adversarial)).train()
    for a, b in zip(straight[2:], resumed[2:]):  # the discriminator and its optimizer resume too
        for name in a:
            assert abs(a[name] - b[name]) <= 1e-6, (name, a[name], b[name])


def test_adversarial_is_refused_outside_the_codec_stage(tone_manifest: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="codec stage"):
        Trainer(_config(tone_manifest, tmp_path / "x", "listening", steps=1, adversarial=True))


def test_the_hifigan_discriminator_judges_periods_and_scales() -> None:
    from pipecat_michi.train.adversarial import HifiGanDiscriminator

    torch.manual_seed(0)
    wav = 0.1 * torch.randn(2, 4800)
    both = HifiGanDiscriminator(channels=4, scales=3)(wav)
    periods_only = HifiGanDiscriminator(channels=4, scales=0)(wav)
    assert len(both) == 5 + 3 and len(periods_only) == 5
    scale_logits = [logits for logits, _ in both[5:]]
    # Each scale halves the rate: its logits are shorter than the previous scale's.
    assert scale_logits[0].shape[1] > scale_logits[1].shape[1] > scale_logits[2].shape[1] > 0
    assert all(f.shape[0] == 2 for _, features in both for f in features)


def test_discriminator_warms_up_only_just_before_the_adversarial_start(tone_manifest: Path, tmp_path: Path) -> None:
    history = Trainer(_config(tone_manifest, tmp_path / "warm", "codec", steps=4, codec_frames=4, adversarial=True,
                              adversarial_start_step=3, discriminator_warmup_steps=1,
                              discriminator_channels=4)).train()
    assert ["disc" in row for row in history] == [False, False, True, True]
    assert ["gen_adv" in row for row in history] == [False, False, False, True]


def _tiny_spectral_checkpoint(directory: Path, flow_objective: str | None = None) -> Path:
    from pipecat_michi.model.checkpoint import save_checkpoint
    from pipecat_michi.model.config import MichiConfig
    from pipecat_michi.model.michi import MichiModel

    tiny = MichiConfig.preset("tiny")
    codec = tiny.codec.model_copy(update={"strides": (8,), "stft_hop": 240, "resblock_dilations": (1, 3)})
    update: dict[str, object] = {"codec": codec}
    if flow_objective is not None:
        update["flow"] = tiny.flow.model_copy(update={"objective": flow_objective})
    torch.manual_seed(0)
    save_checkpoint(MichiModel(tiny.model_copy(update=update)), directory)
    return directory


@pytest.mark.parametrize("context_frames", [0, 6])
def test_the_spectral_codec_learns_through_its_delay(
    context_frames: int, tone_manifest: Path, tmp_path: Path
) -> None:
    init = _tiny_spectral_checkpoint(tmp_path / "init")
    history = Trainer(_config(tone_manifest, tmp_path / "spectral", "codec", steps=12, init=init, codec_frames=8,
                              codec_context_frames=context_frames)).train()
    first = sum(row["total"] for row in history[:3]) / 3
    last = sum(row["total"] for row in history[-3:]) / 3
    assert last < 0.8 * first, [round(row["total"], 3) for row in history]
    assert load_checkpoint(tmp_path / "spectral").config.codec.decoder_delay_samples == 240


def test_fresh_codec_replaces_the_codec_and_its_latent_space(tone_manifest: Path, tmp_path: Path) -> None:
    from pipecat_michi.model.config import MichiConfig

    init = _tiny_spectral_checkpoint(tmp_path / "init", flow_objective="rectified")
    before = load_checkpoint(init)
    Trainer(_config(tone_manifest, tmp_path / "fresh", "codec", steps=1, init=init, preset="tiny",
                    fresh_codec=True, seed=3)).train()
    after = load_checkpoint(tmp_path / "fresh")
    assert not after.config.codec.spectral  # the tiny preset's waveform codec
    assert after.config.flow == MichiConfig.preset("tiny").flow  # and its flow head, objective included
    assert after.config.listening == before.config.listening
    for name, tensor in after.listening.state_dict().items():  # what it heard with is kept
        torch.testing.assert_close(tensor, before.listening.state_dict()[name], rtol=0, atol=0, msg=name)
    # The latent projection and the flow head live in the old codec's latent space: made anew.
    assert not torch.equal(after.latent_in.weight, before.latent_in.weight)
    assert not torch.equal(after.flow.input_proj.weight, before.flow.input_proj.weight)


def test_latent_input_noise_blurs_what_the_backbone_hears_of_its_speech_not_its_silence(
    tone_manifest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipecat_michi.model.config import MichiConfig
    from pipecat_michi.model.michi import MichiModel
    from pipecat_michi.model.tokenizer import load_tokenizer
    from pipecat_michi.train.data import ExampleBuilder, sample_batch, split_entries
    from pipecat_michi.train.manifest import read_manifest
    from pipecat_michi.train.stages import LossWeights, speaking_losses

    torch.manual_seed(0)
    model = MichiModel(MichiConfig.preset("tiny"))
    builder = ExampleBuilder(load_tokenizer(model.config), model.config.frame_samples, model.config.sample_rate_hz)
    _, pairs = split_entries(read_manifest(tone_manifest))
    batch = sample_batch([builder.dialogue(u, b) for u, b in pairs], 2, 16, model.config.frame_samples,
                         torch.Generator().manual_seed(0))
    heard: list[torch.Tensor] = []
    original = model.latent_in.forward
    monkeypatch.setattr(model.latent_in, "forward", lambda x: heard.append(x.detach().clone()) or original(x))
    for noise in (0.0, 0.5):
        speaking_losses(model, batch, None, torch.Generator().manual_seed(1), LossWeights(latent_input_noise=noise))
    clean, noisy = heard
    # The input at frame t is what was played at t - 1: speech there is blurred, silence is not.
    played_speech = torch.nn.functional.pad(batch.speak, (1, 0))[:, :-1] > 0
    assert played_speech.any() and (~played_speech).any()
    torch.testing.assert_close(noisy[~played_speech], clean[~played_speech], rtol=0, atol=0)
    difference = (noisy - clean)[played_speech]
    assert 0.05 < difference.square().mean().sqrt() < 0.5  # std ~U(0, 0.5): RMS ~0.29


def test_the_speaking_stage_trains_the_listening_heads_bridge_into_the_backbone_only() -> None:
    from pipecat_michi.model.config import MichiConfig
    from pipecat_michi.model.michi import MichiModel
    from pipecat_michi.train.stages import STAGES, set_trainable

    model = MichiModel(MichiConfig.preset("tiny"))
    trainable = {id(p) for p in set_trainable(model, STAGES["speaking"])}
    bridge = {id(p) for p in model.listening.to_backbone.parameters()}
    assert bridge <= trainable
    assert not any(id(p) in trainable for n, p in model.listening.named_parameters() if not n.startswith("to_backbone."))
    assert all(id(p) in trainable for p in model.flow.parameters())
    assert not any(id(p) in trainable for p in model.codec.parameters())


def test_the_flow_head_can_learn_at_its_own_rate(tone_manifest: Path, tmp_path: Path) -> None:
    trainer = Trainer(_config(tone_manifest, tmp_path / "flow-lr", "speaking", steps=1, flow_lr_scale=4.0))
    flow_ids = {id(p) for p in trainer.model.flow.parameters()}
    groups = trainer.optimizer.param_groups
    flow_group = next(g for g in groups if any(id(p) in flow_ids for p in g["params"]))
    assert flow_group["lr_scale"] == 4.0 and {id(p) for p in flow_group["params"]} == flow_ids
    trainer.train()
    assert flow_group["lr"] == pytest.approx(4.0 * min(g["lr"] for g in groups))
    # At the default scale the flow head shares its group, as runs from before resume into.
    default = Trainer(_config(tone_manifest, tmp_path / "flow-default", "speaking", steps=1))
    assert len(default.optimizer.param_groups) == 1


def test_a_one_sided_example_holds_its_silent_channel_in_no_memory_and_batches_it_as_zeros(tone_manifest: Path) -> None:
    from pipecat_michi.model.config import MichiConfig
    from pipecat_michi.model.tokenizer import load_tokenizer
    from pipecat_michi.train.data import ExampleBuilder, sample_batch, split_entries
    from pipecat_michi.train.manifest import read_manifest

    config = MichiConfig.preset("tiny")
    builder = ExampleBuilder(load_tokenizer(config), config.frame_samples, config.sample_rate_hz)
    singles, _ = split_entries(read_manifest(tone_manifest))
    heard, spoken = [builder.as_user(e) for e in singles], [builder.as_bot(e) for e in singles]
    for example, silent, sound in [(e, e.bot_wav, e.user_wav) for e in heard] + [(e, e.user_wav, e.bot_wav) for e in spoken]:
        assert silent.shape == sound.shape and silent.untyped_storage().nbytes() == 4  # one float32
        assert sound.untyped_storage().nbytes() == 4 * sound.numel()
    batch = sample_batch(heard + spoken, 6, 8, config.frame_samples, torch.Generator().manual_seed(0))
    assert batch.user_wav.abs().sum() > 0 and batch.bot_wav.abs().sum() > 0
    own = batch.user_wav.abs().sum(-1) > 0  # rows from `heard` have silent bot channels, and the other way round
    assert (batch.bot_wav[own] == 0).all() and (batch.user_wav[~own] == 0).all() and own.any() and (~own).any()


def test_a_monologue_context_is_added_to_an_init_learns_and_resumes_exactly(tone_manifest: Path, tmp_path: Path) -> None:
    Trainer(_config(tone_manifest, tmp_path / "plain", "speaking", steps=1)).train()
    trainer = Trainer(_config(tone_manifest, tmp_path / "ctx", "speaking", steps=3, init=tmp_path / "plain",
                              monologue_tokens=3, flow_lr_scale=2.0))
    context = trainer.model.monologue
    assert context is not None and not context.mix[-1].weight.any()  # starts at zero: speaks as the init did
    flow_group = next(g for g in trainer.optimizer.param_groups if g["lr_scale"] == 2.0)
    assert {id(p) for p in context.parameters()} <= {id(p) for p in flow_group["params"]}
    straight = trainer.train()
    assert context.mix[-1].weight.any()  # the flow loss reached it
    assert load_checkpoint(tmp_path / "ctx").config.flow.monologue_tokens == 3
    Trainer(_config(tone_manifest, tmp_path / "resumed", "speaking", steps=1, init=tmp_path / "plain",
                    monologue_tokens=3, flow_lr_scale=2.0)).train()
    resumed = Trainer(_config(tone_manifest, tmp_path / "resumed", "speaking", steps=3, init=tmp_path / "plain",
                              monologue_tokens=3, flow_lr_scale=2.0, resume=True)).train()
    for a, b in zip(straight[1:], resumed[1:]):
        for name in a:
            assert abs(a[name] - b[name]) <= 1e-6, (name, a[name], b[name])
    with pytest.raises(ValueError, match="monologue context of 3 tokens; --monologue-tokens asks for 4"):
        Trainer(_config(tone_manifest, tmp_path / "other", "speaking", steps=1, init=tmp_path / "ctx",
                        monologue_tokens=4))
