"""Checkpoints round-trip; broken ones fail with an error that names the problem."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from pipecat_michi.model.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_hf_backbone,
    save_checkpoint,
)
from pipecat_michi.model.config import BackboneConfig, MichiConfig
from pipecat_michi.model.michi import MichiModel

TINY = MichiConfig.preset("tiny")


@pytest.fixture()
def saved(tmp_path) -> tuple[MichiModel, object]:
    torch.manual_seed(0)
    model = MichiModel(TINY).eval()
    return model, save_checkpoint(model, tmp_path / "ckpt")


def test_round_trip_restores_config_and_every_tensor(saved) -> None:
    model, path = saved
    loaded = load_checkpoint(path)
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_missing_tensor_is_named(saved) -> None:
    _, path = saved
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["flow.output_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lacks tensor 'flow.output_proj.weight'"):
        load_checkpoint(path)


def test_shape_mismatch_is_named(saved) -> None:
    _, path = saved
    tensors = load_file(str(path / "model.safetensors"))
    tensors["latent_in.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'latent_in.weight' has shape \(3, 3\)"):
        load_checkpoint(path)


def test_unexpected_tensor_is_named(saved) -> None:
    _, path = saved
    tensors = load_file(str(path / "model.safetensors"))
    tensors["extra.weight"] = torch.zeros(1)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor 'extra.weight'"):
        load_checkpoint(path)


def test_bad_config_and_missing_files(saved, tmp_path) -> None:
    _, path = saved
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path / "nowhere")
    cfg = json.loads((path / "config.json").read_text())
    cfg["backbone"]["num_attention_heads"] = 5  # 64 is not a multiple of 5
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not a valid MichiAI config"):
        load_checkpoint(path)
    (path / "config.json").write_text(TINY.model_dump_json())
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_checkpoint(path)


def _hf_backbone(tmp_path, cfg: BackboneConfig):
    torch.manual_seed(1)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, tie_word_embeddings=True,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
    )).eval()
    hf.save_pretrained(tmp_path / "smollm")
    return hf, tmp_path / "smollm"


@torch.no_grad()
def test_hf_layout_backbone_loads_by_name(tmp_path) -> None:
    hf, directory = _hf_backbone(tmp_path, TINY.backbone)
    model = MichiModel(TINY).eval()
    load_hf_backbone(model, directory)
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    expected = hf(input_ids=tokens).logits
    got = model.backbone.logits(model.backbone(model.backbone.embed_tokens(tokens)))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_hf_backbone_of_another_shape_is_refused(tmp_path) -> None:
    _, directory = _hf_backbone(tmp_path, TINY.backbone.model_copy(update={"num_hidden_layers": 1}))
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        load_hf_backbone(MichiModel(TINY), directory)
