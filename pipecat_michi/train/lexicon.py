"""Build the English word lexicon the CTC beam decoder spells against (``michi-train lexicon``).

Sources, none of them our evaluation text:
- the backbone tokenizer's whole-word tokens (``Ġword``): byte-level BPE learns its merges in
  order of frequency, so a token's id is close to its word's frequency rank in a web-scale
  corpus; a Zipf prior ``p(word) ~ 1 / (rank + 200)`` turns it into a unigram;
- the CMU pronouncing dictionary (Debian's ``festlex-cmu``), for rarer words, ranked after them;
- common English contractions (the dictionary has no apostrophes).

The result is a ``word<TAB>log-probability`` file (``Lexicon.from_file``), written once and
shipped as ``pipecat_michi/assets/lexicon/english.tsv``; beside it ``everyday-pairs.tsv``, the word
pairs of the listening training sentences (``fluent.training_sentences``: the judge's held-out
sentences are not among them), for the decoder's bigram.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from pydantic import BaseModel, Field

CMU_DICT = Path("/usr/share/festival/dicts/cmu/cmudict-0.4.out")
ZIPF_OFFSET = 200
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


def build_lexicon(tokenizer_json: Path, cmu_dict: Path | None) -> dict[str, float]:
    """Word -> log-probability (normalised over the lexicon)."""
    ranks = tokenizer_word_ranks(tokenizer_json)
    after = max(ranks.values()) + 1
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


def build_lexicon_file(config: LexiconConfig) -> Path:
    cmu = config.cmu_dict if config.cmu_dict is not None and config.cmu_dict.is_file() else None
    words = build_lexicon(config.tokenizer, cmu)
    sources = f"tokenizer {config.tokenizer.name}" + (f" + {cmu.name}" if cmu else "") + " + contractions"
    write_lexicon(words, config.out, sources)
    print(f"{len(words)} words -> {config.out}")
    if config.pairs_out is not None:
        from pipecat_michi.model.ctc_decoder import count_word_pairs
        from pipecat_michi.train.fluent import training_sentences
        from pipecat_michi.train.judge import normalise_text

        pairs = count_word_pairs([normalise_text(s) for s in training_sentences(config.extra_text)])
        lines = ["# word pairs of the listening training sentences; built by michi-train lexicon"]
        lines += [f"{v}\t{w}\t{c}" for v, following in sorted(pairs.items()) for w, c in sorted(following.items())]
        config.pairs_out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"{len(lines) - 1} word pairs -> {config.pairs_out}")
    return config.out
