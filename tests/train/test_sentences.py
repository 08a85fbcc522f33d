"""SmolLM2-written corpus text: batched cached sampling equals one-at-a-time decoding, and only
sentences a caller could say aloud, never evaluation text, are kept."""

from __future__ import annotations

import torch

from pipecat_michi.model.backbone import Backbone
from pipecat_michi.model.config import BackboneConfig, MichiConfig
from pipecat_michi.model.tokenizer import PRESET_TOKENIZER_DIR, HFTokenizer
from pipecat_michi.train.chat_texts import chat_document
from pipecat_michi.train.judge import HELD_OUT_SENTENCES
from pipecat_michi.train.sentences import evaluation_ngrams, sample_answers, speakable_sentences

VOCABULARY = set("the train leaves at seven we need two tickets for tonight please call me back i think "
                 "it is raining again dont forget".split())


def test_only_speakable_sentences_in_the_vocabulary_are_kept() -> None:
    answer = ('1. "The train leaves at seven."\n2. We need 2 tickets for tonight.\n'
              "- Please call me back!\nI think it is raining again, please call me back?\n"
              "Tonight.\nThe the the the train.\nWe need two tickets for the zeppelin.\n"
              "Here's a list: (tickets) for tonight.")
    kept = speakable_sentences(answer, VOCABULARY, forbidden=set())
    assert kept == ["The train leaves at seven.", "Please call me back!",
                    "I think it is raining again, please call me back?"]


def test_a_sentence_sharing_four_words_with_evaluation_text_is_dropped() -> None:
    forbidden = evaluation_ngrams()
    held_out = HELD_OUT_SENTENCES[10]  # "We need two tickets for the concert on Saturday evening."
    assert ("we", "need", "two", "tickets") in forbidden
    vocabulary = VOCABULARY | {"concert", "saturday", "evening", "on"}
    assert speakable_sentences(held_out, vocabulary, forbidden) == []
    assert speakable_sentences("We need two tickets for tonight.", vocabulary, forbidden) == []
    assert speakable_sentences("Please call me back tonight.", vocabulary, forbidden) == ["Please call me back tonight."]


@torch.no_grad()
def _greedy(backbone: Backbone, tokenizer: HFTokenizer, prompt: str, steps: int) -> str:
    ids = tokenizer.encode(chat_document(prompt, "").removesuffix("<|im_end|>\n"))
    start = len(ids)
    for _ in range(steps):
        ids.append(int(backbone.logits(backbone(backbone.embed_tokens(torch.tensor([ids])))[0, -1]).argmax()))
    return tokenizer.decode(ids[start:]).strip()


def test_batched_cached_sampling_equals_one_prompt_at_a_time() -> None:
    torch.manual_seed(0)
    backbone = Backbone(BackboneConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2)).eval()
    tokenizer = HFTokenizer(PRESET_TOKENIZER_DIR, MichiConfig.preset("michi-nano").tokens)
    prompts = ["Hi.", "Write five short sentences about a rainy day, one per line.", "What time is it?"]
    # top_p near zero keeps only the most likely token: sampling becomes greedy decoding.
    generator = torch.Generator().manual_seed(0)
    answers = sample_answers(backbone, tokenizer, prompts, 6, 1.0, 1e-9, generator)
    assert answers == [_greedy(backbone, tokenizer, p, 6) for p in prompts]
    varied = sample_answers(backbone, tokenizer, prompts[:1] * 4, 6, 1.5, 1.0, torch.Generator().manual_seed(1))
    assert len(set(varied)) > 1  # real sampling: the same prompt gives different answers


def test_the_packaged_smollm2_text_is_distinct_speakable_and_free_of_evaluation_text() -> None:
    from pipecat_michi.model.ctc_decoder import english_lexicon
    from pipecat_michi.textnorm import normalise_text
    from pipecat_michi.train.fluent import SMOLLM2_REQUESTS_TEXT, SMOLLM2_TEXT, training_sentences

    lines = SMOLLM2_TEXT.read_text().splitlines() + SMOLLM2_REQUESTS_TEXT.read_text().splitlines()
    assert len(lines) > 12000 and len({normalise_text(s) for s in lines}) == len(lines)
    vocabulary, forbidden = english_lexicon().word_logprobs, evaluation_ngrams()
    assert [s for s in lines if speakable_sentences(s, vocabulary, forbidden) != [s]] == []
    assert set(lines) <= set(training_sentences(None))  # the listening corpus draws from them


def test_the_prompt_set_picks_the_templates_and_excluded_sentences_are_not_written_again(
        tmp_path, monkeypatch) -> None:
    from types import SimpleNamespace

    from pipecat_michi.train import sentences as module

    asked: list[str] = []

    def fake_answers(backbone, tokenizer, prompts, *args):  # SmolLM2's sampling is tested above
        asked.extend(prompts)
        return ["Please call me back tonight. I think it is raining again."] * len(prompts)

    monkeypatch.setattr(module, "pretrained_backbone", lambda: (SimpleNamespace(backbone=None), None))
    monkeypatch.setattr(module, "sample_answers", fake_answers)
    excluded = tmp_path / "before.txt"
    excluded.write_text("please call me back tonight\n")
    out = module.generate_sentences(module.SentencesConfig(out=tmp_path / "out.txt", answers=5, batch_size=2,
                                                           prompt_set="requests", exclude_text=excluded))
    assert out.read_text().splitlines() == ["I think it is raining again."]
    assert len(asked) == 5
    assert all(any(p == t.format(topic=topic) for t in module.REQUEST_PROMPTS for topic in module.REQUEST_TOPICS)
               for p in asked)
