"""A random-weight preset of SmolLM's vocabulary runs without a checkpoint (worker, benchmarks)."""

import pytest

from pipecat_michi.model.config import BackboneConfig, MichiConfig
from pipecat_michi.model.tokenizer import HFTokenizer, load_tokenizer


@pytest.mark.parametrize("preset", ["michi-530m", "michi-nano"])
def test_a_smollm_preset_without_a_checkpoint_gets_smollm_s_tokenizer(preset: str) -> None:
    config = MichiConfig.preset(preset)
    tokenizer = load_tokenizer(config)
    assert isinstance(tokenizer, HFTokenizer)
    assert tokenizer._tokenizer.get_vocab_size() == config.backbone.vocab_size
    # The preset's special ids are the tokenizer's.
    for name, text in (("pad_id", "<|endoftext|>"), ("bos_id", "<|im_start|>"), ("eos_id", "<|im_end|>")):
        assert tokenizer._tokenizer.token_to_id(text) == getattr(config.tokens, name)
    assert tokenizer.decode(tokenizer.encode("What time do you open?")) == "What time do you open?"


def test_another_vocabulary_still_needs_its_checkpoint() -> None:
    base = MichiConfig.preset("michi-530m")
    config = base.model_copy(update={"backbone": BackboneConfig.model_validate(
        base.backbone.model_dump() | {"vocab_size": 32000})})
    with pytest.raises(ValueError, match="vocab 32000.*needs a checkpoint directory with tokenizer.json"):
        load_tokenizer(config)
