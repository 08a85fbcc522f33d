"""Build the English word lexicon the CTC beam decoder spells against (``michi-train lexicon``).

Sources, none of them our evaluation text:
- the backbone tokenizer's whole-word tokens (``Ġword``): byte-level BPE learns its merges in
  order of frequency, so a token's id is close to its word's frequency rank in a web-scale
  corpus; a Zipf prior ``p(word) ~ 1 / (rank + 200)`` turns it into a unigram;
- the CMU pronouncing dictionary (Debian's ``festlex-cmu``), for rarer words, ranked after them;
- common English contractions (the dictionary has no apostrophes).

A low id does not make a token a word: BPE also learns frequent word *beginnings* early (``Ġth``,
``Ġwh``, ``Ġcon``, ``Ġpro``), and as words they would outrank "two" and "people" (the demo heard
"a table for th people"). Usage text, the listening corpus's sentences (~127k words of English
written by people and by SmolLM2), tells them apart: a token the Zipf prior expects at least
``MIN_EXPECTED_UNUSED`` times in it but that never occurs there is a fragment, and is ranked with
the dictionary's rare words instead.

The result is a ``word<TAB>log-probability`` file (``Lexicon.from_file``), written once and
shipped as ``pipecat_michi/assets/lexicon/english.tsv``; beside it ``everyday-pairs.tsv``, the word
pairs of the listening training sentences (``fluent.training_sentences``: the judge's held-out
sentences are not among them), for the decoder's bigram.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

from loguru import logger
from pydantic import BaseModel, Field

CMU_DICT = Path("/usr/share/festival/dicts/cmu/cmudict-0.4.out")
ZIPF_OFFSET = 200
MIN_EXPECTED_UNUSED = 20.0
WORD = re.compile(r"^[a-z]+('[a-z]+)?$")
CONTRACTIONS = (
    "i'm i'd i'll i've you're you'd you'll you've he's he'd he'll she's she'd she'll it's it'd it'll "
    "we're we'd we'll we've they're they'd they'll they've that's that'll there's here's what's where's "
    "who's how's let's don't doesn't didn't can't couldn't won't wouldn't shouldn't isn't aren't wasn't "
    "weren't hasn't haven't hadn't mustn't"
).split()


def tokenizer_word_ranks(tokenizer_json: Path) -> dict[str, int]:
    """Lower-case whole-word tokens of a byte-level BPE ``tokenizer.json`` -> their id (rank)."""
    vocab: dict[str, int] = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]["vocab"]
    ranks: dict[str, int] = {}
    for token, index in vocab.items():
        if token.startswith("Ġ") and token[1:].isascii():
            word = token[1:].lower()
            if WORD.match(word) and (len(word) > 1 or word in ("a", "i")):
                ranks[word] = min(index, ranks.get(word, index))
    return ranks


def cmu_words(path: Path) -> list[str]:
    """The words of festival's ``cmudict-0.4.out`` (``("word" pos (...))`` lines)."""
    words = []
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith('("'):
            word = line[2: line.index('"', 2)]
            if WORD.match(word) and len(word) > 1:
                words.append(word)
    return words


def unused_fragments(ranks: dict[str, int], usage_words: list[str],
                     min_expected: float = MIN_EXPECTED_UNUSED) -> set[str]:
    """Tokenizer words the Zipf prior expects ``min_expected`` times or more among ``usage_words``
    that never occur there: word beginnings BPE learnt early, not words."""
    counts = Counter(usage_words)
    total = sum(1.0 / (rank + ZIPF_OFFSET) for rank in ranks.values())
    return {word for word, rank in ranks.items()
            if counts[word] == 0 and len(usage_words) / (rank + ZIPF_OFFSET) / total >= min_expected}


def build_lexicon(tokenizer_json: Path, cmu_dict: Path | None,
                  usage_words: list[str] | None = None) -> dict[str, float]:
    """Word -> log-probability (normalised over the lexicon). With ``usage_words``, the tokenizer's
    unused fragments (``unused_fragments``) are ranked with the rare words."""
    ranks = tokenizer_word_ranks(tokenizer_json)
    after = max(ranks.values()) + 1
    if usage_words:
        fragments = sorted(unused_fragments(ranks, usage_words), key=ranks.__getitem__)
        logger.info(f"lexicon: {len(fragments)} tokenizer fragments ranked as rare words: {', '.join(fragments[:40])}")
        for word in fragments:
            ranks[word] = after
    for word in CONTRACTIONS:
        ranks.setdefault(word, 2000)
    if cmu_dict is not None:
        for word in cmu_words(cmu_dict):
            ranks.setdefault(word, after)
    weights = {word: 1.0 / (rank + ZIPF_OFFSET) for word, rank in ranks.items()}
    log_total = math.log(sum(weights.values()))
    return {word: math.log(weight) - log_total for word, weight in sorted(weights.items())}


def write_lexicon(words: dict[str, float], path: Path, sources: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {len(words)} words; {sources}; built by michi-train lexicon"]
    lines += [f"{word}\t{logprob:.3f}" for word, logprob in words.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


class LexiconConfig(BaseModel):
    tokenizer: Path = Field(description="a byte-level BPE tokenizer.json (its whole-word tokens, ranked)")
    cmu_dict: Path | None = Field(CMU_DICT, description="festival's cmudict-0.4.out, for rarer words")
    out: Path = Field(description="where to write the word<TAB>log-probability file")
    pairs_out: Path | None = Field(None, description="where to write the training sentences' word pairs")
    extra_text: Path | None = Field(None, description="the listening corpus's --extra-text lines, counted in the pairs")
    keep_fragments: bool = Field(False, description="keep tokenizer fragments unused in the training sentences "
                                 "at their token rank (the lexicon before fragments were demoted)")


def build_lexicon_file(config: LexiconConfig) -> Path:
    from pipecat_michi.train.fluent import training_sentences
    from pipecat_michi.train.judge import normalise_text

    sentences = [normalise_text(s) for s in training_sentences(config.extra_text)]
    usage_words = [word for sentence in sentences for word in sentence.split()] if not config.keep_fragments else None
    cmu = config.cmu_dict if config.cmu_dict is not None and config.cmu_dict.is_file() else None
    words = build_lexicon(config.tokenizer, cmu, usage_words)
    sources = (f"tokenizer {config.tokenizer.name}" + (f" + {cmu.name}" if cmu else "") + " + contractions"
               + (f"; fragments unused in {len(usage_words)} words of training text demoted" if usage_words else ""))
    write_lexicon(words, config.out, sources)
    print(f"{len(words)} words -> {config.out}")
    if config.pairs_out is not None:
        from pipecat_michi.model.ctc_decoder import count_word_pairs

        pairs = count_word_pairs(sentences)
        lines = ["# word pairs of the listening training sentences; built by michi-train lexicon"]
        lines += [f"{v}\t{w}\t{c}" for v, following in sorted(pairs.items()) for w, c in sorted(following.items())]
        config.pairs_out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"{len(lines) - 1} word pairs -> {config.pairs_out}")
    return config.out
