"""Does the backbone still answer questions in text? Before (the pretrained weights) and after
(a checkpoint's backbone, LoRA adapters merged) on a few everyday questions.

The speaking stages adapt the backbone (LoRA); the seed claims MichiAI keeps its backbone's text
ability. Each question goes through SmolLM2's chat template, greedy decoding writes the answer,
and it passes when it contains one of the expected words.

    .venv/bin/python benchmarks/text_ability.py --checkpoint runs/speaking-slt
    .venv/bin/python benchmarks/text_ability.py            # the pretrained backbone alone
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pipecat_michi.model.checkpoint import load_checkpoint
from pipecat_michi.model.michi import MichiModel
from pipecat_michi.model.tokenizer import HFTokenizer
from pipecat_michi.train.chat_texts import chat_document, greedy_answer, pretrained_backbone

# (question, words of which one must appear in the answer, lowercase). Questions the pretrained
# Q4_1 SmolLM2-135M-Instruct answers right (2026-12-04: 8/8), so a miss after is a loss; it got
# "bees make", "two plus two", "Spain's language" and "largest planet" wrong, and they were left out.
QUESTIONS = (
    ("What is the capital of France?", ("paris",)),
    ("How many days are there in a week?", ("seven", "7")),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What is the opposite of hot?", ("cold",)),
    ("Which animal says meow?", ("cat", "kitten")),
    ("What is the capital of Italy?", ("rome",)),
    ("What do cows drink?", ("water",)),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
)
ANSWER_TOKENS = 24


def answer(model: MichiModel, tokenizer: HFTokenizer, question: str) -> str:
    prompt = chat_document(question, "").removesuffix("<|im_end|>\n")
    return greedy_answer(model, tokenizer, prompt, ANSWER_TOKENS)


def score(model: MichiModel, tokenizer: HFTokenizer, label: str) -> int:
    passed = 0
    for question, expected in QUESTIONS:
        reply = answer(model, tokenizer, question)
        ok = any(word in reply.lower() for word in expected)
        passed += ok
        print(f"  [{label}] {'ok  ' if ok else 'MISS'} {question} -> {reply[:80]!r}")
    print(f"{label}: {passed}/{len(QUESTIONS)} answered")
    return passed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a michi-nano checkpoint whose backbone to test after")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    before, tokenizer = pretrained_backbone()
    results = {"before (SmolLM2-135M-Instruct)": score(before, tokenizer, "before")}
    if args.checkpoint is not None:
        after = load_checkpoint(args.checkpoint)
        adapters = after.config.lora
        label = f"after ({args.checkpoint}, {'LoRA rank ' + str(adapters.rank) if adapters else 'no adapters'})"
        results[label] = score(after, tokenizer, "after")
    for label, passed in results.items():
        print(f"{label}: {passed}/{len(QUESTIONS)}")


if __name__ == "__main__":
    main()
