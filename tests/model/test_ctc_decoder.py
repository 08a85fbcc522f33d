"""The streaming CTC beam decoder: greedy when the lexicon says nothing, lexicon-led when the
characters are unsure, and final text that never changes once out."""

import math

import numpy as np
import pytest

from pipecat_michi.model.ctc_decoder import BeamSettings, CtcBeamDecoder, Lexicon
from pipecat_michi.model.config import CTC_ALPHABET

ALPHABET = CTC_ALPHABET  # " ", a-z, "'"
CLASSES = len(ALPHABET) + 1
BLANK = "_"


def _rows(*tokens: dict[str, float] | str) -> np.ndarray:
    """One row per token: a character (or ``_`` for blank) with probability 0.97, or a dict of
    character -> probability with the rest spread over the other classes."""
    rows = []
    for token in tokens:
        probs = {token: 0.97} if isinstance(token, str) else token
        row = np.full(CLASSES, (1.0 - sum(probs.values())) / (CLASSES - len(probs)))
        for char, p in probs.items():
            row[0 if char == BLANK else ALPHABET.index(char) + 1] = p
        rows.append(np.log(row))
    return np.array(rows)


def _spell(text: str) -> list[str]:
    """Peaky CTC tokens for ``text``: each character once, a blank after it."""
    return [t for char in text for t in (char, BLANK)]


LEXICON = Lexicon({"moved": math.log(0.01), "my": math.log(0.05), "the": math.log(0.1), "hello": math.log(0.01),
                   "move": math.log(0.01)})


def test_an_unsure_letter_is_settled_by_the_lexicon() -> None:
    # Greedy reads "movd": the "e" token is 40% e, 60% blank.
    tokens = [*_spell("mov"), {"e": 0.4, BLANK: 0.58}, *_spell("d"), *[BLANK] * 20]
    decoder = CtcBeamDecoder(ALPHABET, LEXICON)
    text = decoder.push(_rows(*tokens)) + decoder.finish()
    assert text == "moved "
    greedy = CtcBeamDecoder(ALPHABET, LEXICON, BeamSettings(beam_size=1, lm_weight=0.0, word_bonus=0.0))
    assert (greedy.push(_rows(*tokens)) + greedy.finish()) == "movd "


def test_without_a_prior_it_spells_what_it_hears_repeats_included() -> None:
    decoder = CtcBeamDecoder(ALPHABET, LEXICON, BeamSettings(lm_weight=0.0, word_bonus=0.0))
    tokens = [*_spell("helo"), *_spell(" "), "z", "z", "o", *[BLANK] * 20]  # "zz" without a blank is one z
    tokens[4:4] = ["l", BLANK]  # a second l, blank-separated
    assert decoder.push(_rows(*tokens)) + decoder.finish() == "hello zo "


def test_a_clear_word_outside_the_lexicon_still_comes_out() -> None:
    # Heard with the certainty a trained head has for a clear word (0.999 a character): the
    # acoustics outweigh the price of a word outside the lexicon.
    sure = [t for char in "zebra" for t in ({char: 0.999}, {BLANK: 0.999})]
    decoder = CtcBeamDecoder(ALPHABET, LEXICON)
    assert decoder.push(_rows(*sure, *[BLANK] * 20)) + decoder.finish() == "zebra "


def test_words_become_final_in_a_pause_and_final_text_never_changes() -> None:
    tokens = _rows(*_spell("hello my"), *[BLANK] * 14, *_spell("the"), *[BLANK] * 3)
    decoder = CtcBeamDecoder(ALPHABET, LEXICON)
    pieces = [decoder.push(tokens[i: i + 4]) for i in range(0, len(tokens), 4)]  # 80 ms steps
    said_before_finish = "".join(pieces)
    assert said_before_finish.startswith("hello my ")  # the pause made both words final
    assert said_before_finish + decoder.finish() == "hello my the "
    whole = CtcBeamDecoder(ALPHABET, LEXICON)
    assert whole.push(tokens) + whole.finish() == "hello my the "


def test_reset_starts_a_fresh_stream() -> None:
    decoder = CtcBeamDecoder(ALPHABET, LEXICON)
    decoder.push(_rows(*_spell("mov")))
    decoder.reset()
    assert decoder.hypothesis == ""
    assert decoder.push(_rows(*_spell("my"), *[BLANK] * 20)) + decoder.finish() == "my "


def test_a_lexicon_file_round_trips_and_names_a_bad_line(tmp_path) -> None:
    path = tmp_path / "words.tsv"
    path.write_text("# comment\nmoved\t-4.6\nmy\t-3.0\n")
    lexicon = Lexicon.from_file(path)
    assert lexicon.word_logprobs == {"moved": -4.6, "my": -3.0}
    assert lexicon.prefix_best["m"] == -3.0 and lexicon.prefix_best["mov"] == -4.6
    path.write_text("moved -4.6\n")
    with pytest.raises(ValueError, match=":1: expected"):
        Lexicon.from_file(path)
    path.write_text("moved\t-4.6\n")
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("# pairs\nmy\tmoved\t3\nmy\tmy\t1\n")
    with_pairs = Lexicon.from_file(path, pairs)
    assert with_pairs.bigram_counts == {"my": {"moved": 3, "my": 1}}
    pairs.write_text("my\tmoved\n")
    with pytest.raises(ValueError, match=r"pairs.tsv:1: expected 'previous<TAB>word<TAB>count'"):
        Lexicon.from_file(path, pairs)


def test_a_word_pair_seen_in_training_text_settles_an_ambiguous_word() -> None:
    from pipecat_michi.model.ctc_decoder import count_word_pairs

    # "red" or "read", equally heard and equally common, after "please": the pairs decide.
    words = {"please": math.log(0.1), "read": math.log(0.01), "red": math.log(0.01)}
    tokens = _rows(*_spell("please "), "r", BLANK, {"e": 0.97}, BLANK, {"a": 0.45, BLANK: 0.53}, "d", *[BLANK] * 20)
    unigram = CtcBeamDecoder(ALPHABET, Lexicon(words))
    assert (unigram.push(tokens) + unigram.finish()) == "please red "  # the characters lean to "red"
    paired = Lexicon(words, count_word_pairs(["please read the menu", "please read it"]))
    assert paired.word_logprob("read", "please", -20.0) > paired.word_logprob("red", "please", -20.0)
    bigram = CtcBeamDecoder(ALPHABET, paired)
    assert (bigram.push(tokens) + bigram.finish()) == "please read "


def test_the_shipped_lexicon_knows_everyday_and_rare_words() -> None:
    from pipecat_michi.model.ctc_decoder import english_lexicon

    lexicon = english_lexicon()
    logp = lexicon.word_logprobs
    assert len(logp) > 50_000 and logp["the"] > logp["dentist"] > logp["amiable"]
    assert "don't" in logp and all(" " not in w for w in list(logp)[:1000])
