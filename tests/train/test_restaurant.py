import random
import re
import shutil

import pytest

from pipecat_michi.train.fluent import FluentCorpusConfig, generate_fluent_corpus
from pipecat_michi.train.judge import HELD_OUT_SENTENCES, held_out_sentences
from pipecat_michi.train.manifest import read_manifest
from pipecat_michi.train.restaurant import (
    ANSWER_TEMPLATES,
    HELD_OUT_ANSWERS,
    QUESTION_TEMPLATES,
    fill,
    restaurant_sentences,
    vocabulary,
)


def test_training_draws_never_hold_a_held_out_answer_but_cover_its_words():
    sentences = restaurant_sentences(3000, seed=1)
    assert not {s.lower() for s in sentences} & {s.lower() for s in HELD_OUT_ANSWERS}
    # Held out means new combinations of the domain's words, not new words.
    assert vocabulary(list(HELD_OUT_ANSWERS)) <= vocabulary(sentences)
    # Every template is drawn, answers more often than questions.
    assert len({s for s in sentences if "?" in s}) < len(sentences) / 2
    assert restaurant_sentences(50, seed=1) == sentences[:50]
    assert restaurant_sentences(50, seed=2) != sentences[:50]


def test_each_held_out_answer_is_a_sentence_of_the_grammar():
    # Held-out answers are judged as in-domain speech: each must be one fill of a template.
    def matches(sentence: str, template: str) -> bool:
        pattern = re.escape(template[0].upper() + template[1:])
        pattern = re.sub(r"\\\{\w+\\\}", "[a-z ]+", pattern)
        return re.fullmatch(pattern, sentence) is not None

    for answer in HELD_OUT_ANSWERS:
        assert any(matches(answer, t) for t in ANSWER_TEMPLATES + QUESTION_TEMPLATES), answer


def test_fill_draws_every_slot():
    assert all(t[0].isupper() for t in ANSWER_TEMPLATES + QUESTION_TEMPLATES)  # sentences start capitalised
    sentence = fill("A table for {party} at {time} {day}.", random.Random(0))
    assert "{" not in sentence and sentence.startswith("A table for ")


def test_a_restaurant_corpus_speaks_domain_sentences_at_one_rate(tmp_path):
    if shutil.which("flite") is None:  # .ci/run installs it; a bare checkout may not have it
        pytest.skip("flite is not installed")
    config = FluentCorpusConfig(out_dir=tmp_path, utterances=3, voices="slt", speeds_wpm="160", domain="restaurant",
                                workers=1)
    entries = read_manifest(generate_fluent_corpus(config))
    assert [e.text for e in entries] == restaurant_sentences(3, seed=0)
    assert {e.speaker for e in entries} == {"slt@160"}
    assert all(e.words[-1].end_sample <= e.words[0].start_sample + 24000 * 10 for e in entries)


def test_the_judge_names_each_domains_held_out_sentences():
    assert held_out_sentences("restaurant") == HELD_OUT_ANSWERS
    assert held_out_sentences("everyday") == HELD_OUT_SENTENCES
    with pytest.raises(ValueError, match="unknown domain"):
        held_out_sentences("weather")
