"""``michi-train lexicon``: the word list from a tokenizer's ranks, and the decoder's word pairs
from the listening training sentences, the corpus's ``--extra-text`` lines included."""

from __future__ import annotations

import json
from pathlib import Path

from pipecat_michi.model.ctc_decoder import Lexicon, english_lexicon
from pipecat_michi.train.lexicon import LexiconConfig, build_lexicon_file, unused_fragments


def test_pairs_count_the_extra_text_lines_and_the_words_follow_the_ranks(tmp_path: Path) -> None:
    vocab = {"Ġthe": 5, "Ġzebra": 900, "Ġquietly": 400, "Ġgrazes": 700, "the": 1, "Ġ42": 3}
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(json.dumps({"model": {"vocab": vocab}}))
    extra = tmp_path / "extra.txt"
    extra.write_text("The zebra quietly grazes.\n\nThe zebra quietly grazes again.\n")
    words, pairs = tmp_path / "english.tsv", tmp_path / "pairs.tsv"
    base = LexiconConfig(tokenizer=tokenizer, cmu_dict=None, out=words, pairs_out=pairs)
    build_lexicon_file(base)
    without = Lexicon.from_file(words, pairs)
    build_lexicon_file(base.model_copy(update={"extra_text": extra}))
    lexicon = Lexicon.from_file(words, pairs)
    assert set(lexicon.word_logprobs) >= {"the", "zebra", "quietly", "grazes"} and "42" not in lexicon.word_logprobs
    assert lexicon.word_logprobs["the"] > lexicon.word_logprobs["quietly"] > lexicon.word_logprobs["zebra"]
    assert "zebra" not in without.bigram_counts.get("the", {})
    assert lexicon.bigram_counts["zebra"]["quietly"] == 2 and lexicon.bigram_counts["quietly"]["grazes"] == 2


def test_word_beginnings_the_training_text_never_uses_rank_below_real_words() -> None:
    ranks = {"the": 5, "th": 20, "two": 40, "people": 60, "pro": 80, "zebra": 5000}
    usage = ("the two people " * 60 + "the people ").split()
    # "th" and "pro" are expected dozens of times in this text and never occur: fragments. "zebra"
    # is too rare for its absence to mean anything.
    assert unused_fragments(ranks, usage, min_expected=20) == {"th", "pro"}
    assert unused_fragments(ranks, usage[:30], min_expected=20) == set()  # too little text to tell


def test_the_shipped_lexicon_ranks_two_above_th() -> None:
    words = english_lexicon().word_logprobs
    assert words["two"] > words["th"] and words["people"] > words["wh"]
    assert words["the"] > words["two"]
