"""Quality of a trained (or random) checkpoint on an espeak-ng corpus: codec reconstruction and
forced-TTS word error rate.

  codec       STFT loss (multi-resolution, as trained) and mel-cepstral distance (dB) of
              encode -> decode against the input, over the corpus's utterances;
  listening   WER of the listening head on the corpus's espeak speech (its training sentences
              when the corpus is the training one: a reference for the next, not a judge);
  forced TTS  the bot's text injected frame by frame, the model speaks it (user silent), and the
              listening head transcribes the model's own speech: WER against the text.

    .venv/bin/python benchmarks/demo_quality.py --checkpoint checkpoints/demo/joint \\
        --manifest artifacts/espeak-corpus/manifest.jsonl
    .venv/bin/python benchmarks/demo_quality.py      # random tiny model, fresh small corpus

``--judge`` adds the independent judge of ``benchmarks/listen_eval.py``: held-out sentences and
voices and real human clips, streaming-head WER beside offline Whisper tiny.en's.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from pipecat_michi.model.checkpoint import load_checkpoint
from pipecat_michi.model.config import MichiConfig
from pipecat_michi.model.michi import MichiModel
from pipecat_michi.model.tokenizer import load_tokenizer
from pipecat_michi.train.corpus import CorpusConfig, generate_corpus
from pipecat_michi.train.data import ExampleBuilder, split_entries
from pipecat_michi.train.evaluate import codec_quality, forced_speech, transcribe, word_error_rate
from pipecat_michi.train.manifest import read_manifest
from listen_eval import judge_listening  # noqa: E402 - benchmarks are scripts, not a package


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a MichiAI checkpoint; default: random tiny model")
    parser.add_argument("--manifest", type=Path, help="default: synthesise a small espeak-ng corpus")
    parser.add_argument("--utterances", type=int, default=8, help="utterances measured")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--judge", action="store_true", help="also run listen_eval's held-out and human sets")
    parser.add_argument("--twilio", action="store_true", help="with --judge: through 8 kHz mu-law")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    if args.checkpoint is None:
        model, source = MichiModel(MichiConfig.preset("tiny")).eval(), "random-init tiny"
    else:
        model, source = load_checkpoint(args.checkpoint), str(args.checkpoint)
    tokenizer = load_tokenizer(model.config, args.checkpoint)
    manifest = args.manifest or generate_corpus(
        CorpusConfig(out_dir=Path(tempfile.mkdtemp(prefix="michi-bench-")), utterances=args.utterances, dialogues=0)
    )
    singles, _ = split_entries(read_manifest(manifest))
    entries = singles[: args.utterances]
    if not entries:
        raise SystemExit(f"{manifest} has no single utterances to measure")
    builder = ExampleBuilder(tokenizer, model.config.frame_samples, model.config.sample_rate_hz)
    generator = torch.Generator().manual_seed(args.seed)

    codec, listen_wer, tts_wer = [], [], []
    for entry in entries:
        spoken = builder.as_bot(entry)  # bot_wav: the speech; bot_text: its aligned monologue
        codec.append(codec_quality(model, spoken.bot_wav[None]))
        listen_wer.append(word_error_rate(transcribe(model, tokenizer, spoken.bot_wav), entry.text))
        own_speech = forced_speech(model, spoken.bot_text, generator)
        heard = transcribe(model, tokenizer, own_speech)
        tts_wer.append(word_error_rate(heard, entry.text))
        print(f"  {entry.id}: text={entry.text!r} heard={heard!r}")

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    print(f"model: {source} ({model.config.name}), {len(entries)} utterances from {manifest}")
    print(f"codec reconstruction: STFT loss {mean([c['stft_loss'] for c in codec]):.3f}, "
          f"mel-cepstral distance {mean([c['mcd_db'] for c in codec]):.2f} dB "
          f"(white noise at 20 dB SNR: {mean([c['noise20_mcd_db'] for c in codec]):.2f} dB)")
    print(f"listening head WER on espeak speech: {100 * mean(listen_wer):.1f}%")
    print(f"forced-TTS WER (listening head on the model's own speech): {100 * mean(tts_wer):.1f}%")
    if args.judge:
        judge_listening(model, tokenizer, twilio=args.twilio)


if __name__ == "__main__":
    main()
