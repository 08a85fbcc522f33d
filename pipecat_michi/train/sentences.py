"""Many distinct sentences for the listening corpus, written by SmolLM2-135M-Instruct.

A listening head trained on ~1,000 distinct lines memorises them (docs/training.md: eight epochs
of them made held-out speech worse). The backbone we already ship writes English prose with a
web-scale vocabulary; sampled (temperature, top-p) from varied prompts, a few thousand answers
give thousands of distinct sentences in minutes. Only sentences a caller could say aloud are
kept: 4-18 words, letters and plain punctuation, every word in the decoder's English lexicon, no
stuttering repetition, and nothing that shares a 4-word run with the judge's held-out sentences
or the human clips' transcripts (evaluation text never leaks into training).

    michi-train sentences --out data/smollm2-sentences.txt --answers 1600
    michi-train sentences --out data/smollm2-requests.txt --prompt-set requests --seed 1 \
        --exclude-text pipecat_michi/train/texts/smollm2.txt
    michi-train fluent-corpus --extra-text data/smollm2-sentences.txt ...
"""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path
from typing import Literal

import torch
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from pipecat_michi.model.ctc_decoder import english_lexicon
from pipecat_michi.model.backbone import Backbone
from pipecat_michi.model.tokenizer import HFTokenizer
from pipecat_michi.textnorm import normalise_text
from pipecat_michi.train.chat_texts import chat_document, pretrained_backbone
from pipecat_michi.train.judge import ALL_HELD_OUT_SENTENCES, human_transcripts

TOPICS = (
    "a dentist's office", "a bank", "a pharmacy", "a train station", "an airport", "a hotel front desk",
    "a pizza place", "a doctor's appointment", "a car repair shop", "a library", "a school", "a post office",
    "a grocery store", "a hair salon", "a plumber", "an electrician", "a taxi company", "a bakery",
    "a cinema", "a museum", "a gym", "a vet clinic", "a bookshop", "a garden centre", "an insurance company",
    "a phone company", "an internet provider", "a landlord", "a moving company", "a travel agent",
    "the weather", "cooking dinner", "a birthday party", "a weekend trip", "the morning commute",
    "a lost wallet", "a broken washing machine", "a job interview", "a new neighbour", "a rainy day",
    "a football match", "a concert", "a summer holiday", "a camping trip", "a family dinner",
    "learning to drive", "a visit to grandparents", "a walk in the park", "buying a new phone",
    "fixing a bicycle", "planting tomatoes", "a snowy winter morning", "a late train", "a power cut",
    "a noisy neighbour", "paying a bill", "returning a jacket", "booking a table", "ordering flowers",
    "a wedding", "a school trip", "homework", "a cold", "a sprained ankle", "a power outage at work",
    "a city bus", "a farmers market", "a coffee shop", "a hiking trail", "a beach day", "a science class",
    "a music lesson", "a road trip", "a flat tyre", "a delivery that is late", "a parking ticket",
    "a cooking class", "an art gallery", "a swimming pool", "a meeting at work", "a surprise visit",
)
PROMPTS = (
    "Write five short sentences that a caller might say to {topic}, one per line.",
    "Write five different things a person might say about {topic}, one per line.",
    "Write a short story of five sentences about {topic}.",
    "Describe {topic} in five simple sentences.",
    "Write five questions someone might ask about {topic}.",
    "Write a short conversation between two friends about {topic}.",
    "Write five sentences someone might say on the phone about {topic}.",
    "Tell me about {topic} in a few plain sentences.",
)
# The second set: what callers ask a phone line or a voice assistant (requests, bookings, errands),
# over topics the first set lacks. The shipped text is both sets: ``stories`` with seed 0 and
# ``requests`` with seed 1 (docs/training.md).
REQUEST_TOPICS = (
    "a smart speaker", "the lights at home", "a thermostat", "a calendar", "text messages", "an alarm clock",
    "a shopping list", "a music playlist", "a podcast", "a news briefing", "a recipe", "a timer",
    "a train timetable", "a flight booking", "a hotel booking", "a taxi booking", "a restaurant booking",
    "a table for a group", "a hospital", "a clinic", "an eye test", "a prescription", "a gas bill",
    "an electricity meter", "a water leak", "a heating engineer", "a locksmith", "a bank card",
    "a credit card", "a refund", "an online order", "a parcel delivery", "a courier", "a tracking number",
    "a customer service line", "a phone contract", "a broadband fault", "a television subscription",
    "a car rental", "a bus route", "a ferry", "a ski trip", "a city tour", "the traffic", "a cleaning service",
    "a babysitter", "a dog walker", "a piano teacher", "a tennis court", "a football ticket",
    "a theatre show", "a museum ticket", "a hotel room upgrade", "a lost suitcase", "a passport renewal",
    "a driving test", "a council office", "a rubbish collection", "a recycling bin", "a broken fridge",
    "a dishwasher", "a laptop repair", "a printer", "a password reset", "a weather forecast",
    "a weekend in a big city", "a dinner reservation", "a wine order", "a flower delivery", "a gift",
    "a hairdresser appointment", "a vet appointment", "a school meeting", "a kids party", "a wedding venue",
    "a removal van", "an estate agent", "a mortgage", "a gym membership", "a yoga class",
)
REQUEST_PROMPTS = (
    "Write five short requests a person might say to {topic} on the phone, one per line.",
    "Write five things someone might ask a voice assistant about {topic}, one per line.",
    "Write five short sentences a customer might say when calling about {topic}.",
    "Write five polite questions a caller might ask about {topic}, one per line.",
    "Write five short commands someone might give a voice assistant about {topic}.",
    "Write a short phone call between a customer and an assistant about {topic}.",
    "Write five sentences a caller might leave in a voicemail about {topic}.",
    "Write five everyday things a person might say about {topic} and when it happens.",
)
PROMPT_SETS = {"stories": (PROMPTS, TOPICS), "requests": (REQUEST_PROMPTS, REQUEST_TOPICS)}
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
SPEAKABLE = re.compile(r"^[A-Za-z][A-Za-z ,.'?!-]*[.?!]$")
LIST_MARK = re.compile(r"^\s*(?:\d+[.)]|[-*•]|[A-Z][a-z]+:)\s*")


class SentencesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    out: Path
    answers: int = Field(default=1600, ge=1, description="answers sampled (each gives a few sentences)")
    batch_size: int = Field(default=32, ge=1, description="answers sampled at once")
    answer_tokens: int = Field(default=140, ge=8)
    temperature: float = Field(default=0.9, gt=0.0, le=2.0)
    top_p: float = Field(default=0.92, gt=0.0, le=1.0)
    min_words: int = Field(default=4, ge=1)
    max_words: int = Field(default=18, ge=1)
    prompt_set: Literal["stories", "requests"] = Field(
        default="stories", description="stories: everyday prose topics; requests: what callers ask")
    exclude_text: Path | None = Field(None, description="sentences already in this file are not written again")
    seed: int = 0
    threads: int = Field(default=2, ge=1)


def evaluation_ngrams(n: int = 4) -> set[tuple[str, ...]]:
    """Every ``n``-word run of the judge's held-out sentences and the human clips' transcripts."""
    texts = list(ALL_HELD_OUT_SENTENCES) + list(human_transcripts().values())
    return {gram for text in texts for gram in _ngrams(normalise_text(text).split(), n)}


def _ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i: i + n]) for i in range(len(words) - n + 1)}


def speakable_sentences(answer: str, vocabulary: set[str] | dict[str, float], forbidden: set[tuple[str, ...]],
                        min_words: int = 4, max_words: int = 18) -> list[str]:
    """The sentences of one generated answer a caller could say aloud (see the module doc)."""
    kept = []
    for piece in SENTENCE_END.split(answer):
        sentence = LIST_MARK.sub("", piece.strip()).strip().strip('"').strip()
        sentence = re.sub(r"\s+", " ", sentence)
        if not SPEAKABLE.match(sentence):
            continue
        words = normalise_text(sentence).split()
        if not min_words <= len(words) <= max_words or any(w not in vocabulary for w in words):
            continue
        if Counter(words).most_common(1)[0][1] > 3 or _ngrams(words, 4) & forbidden:
            continue
        kept.append(sentence)
    return kept


@torch.no_grad()
def sample_answers(backbone: Backbone, tokenizer: HFTokenizer, prompts: list[str], max_tokens: int,
                   temperature: float, top_p: float, generator: torch.Generator) -> list[str]:
    """One sampled answer per prompt (SmolLM2's chat template), the batch decoded together
    through the backbone's slot KV cache (each prompt prefilled into its own slot)."""
    stops = {tokenizer.tokens.eos_id, tokenizer.tokens.pad_id, *tokenizer.encode("<|im_end|>")[:1]}
    encoded = [tokenizer.encode(chat_document(p, "").removesuffix("<|im_end|>\n")) for p in prompts]
    cache = backbone.new_cache(len(prompts), max(map(len, encoded)) + max_tokens + 1)
    last = []
    for row, ids in enumerate(encoded):
        hidden = backbone.forward_cached(backbone.embed_tokens(torch.tensor([ids])), cache, slice(row, row + 1))
        last.append(backbone.logits(hidden[0, -1]))
    logits = torch.stack(last)
    answers: list[list[int]] = [[] for _ in prompts]
    open_rows = [True] * len(prompts)
    for _ in range(max_tokens):
        tokens = _top_p_sample(logits.float(), temperature, top_p, generator)
        for row, token in enumerate(tokens.tolist()):
            if open_rows[row]:
                if token in stops:
                    open_rows[row] = False
                else:
                    answers[row].append(token)
        if not any(open_rows):
            break
        hidden = backbone.forward_cached(backbone.embed_tokens(tokens[:, None]), cache, slice(0, len(prompts)),
                                         active=open_rows)
        logits = backbone.logits(hidden[:, -1])
    return [tokenizer.decode(ids).strip() for ids in answers]


def _top_p_sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest set of tokens whose mass reaches top_p (the first token always stays).
    sorted_probs[(sorted_probs.cumsum(dim=-1) - sorted_probs) > top_p] = 0.0
    return order.gather(-1, torch.multinomial(sorted_probs, 1, generator=generator))[:, 0]


def generate_sentences(config: SentencesConfig) -> Path:
    """Write distinct speakable sentences, one per line, to ``config.out``; return it."""
    torch.set_num_threads(config.threads)
    model, tokenizer = pretrained_backbone()
    rng = random.Random(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    vocabulary = english_lexicon().word_logprobs
    forbidden = evaluation_ngrams()
    templates, topics = PROMPT_SETS[config.prompt_set]
    prompts = [rng.choice(templates).format(topic=rng.choice(topics)) for _ in range(config.answers)]
    seen = ({normalise_text(line) for line in config.exclude_text.read_text(encoding="utf-8").splitlines()}
            if config.exclude_text is not None else set())
    sentences: list[str] = []
    progress = tqdm(range(0, len(prompts), config.batch_size), desc="sentences")
    for start in progress:
        batch = prompts[start: start + config.batch_size]
        for answer in sample_answers(model.backbone, tokenizer, batch, config.answer_tokens, config.temperature,
                                     config.top_p, generator):
            for sentence in speakable_sentences(answer, vocabulary, forbidden, config.min_words, config.max_words):
                key = normalise_text(sentence)
                if key not in seen:
                    seen.add(key)
                    sentences.append(sentence)
        progress.set_postfix(sentences=len(sentences))
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.out.write_text("".join(s + "\n" for s in sentences), encoding="utf-8")
    logger.info(f"sentences: {len(sentences)} distinct from {len(prompts)} answers -> {config.out}")
    return config.out
