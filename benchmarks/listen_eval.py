"""Does the listening head hear real words? WER judged against references, beside offline Whisper.

Test sets: held-out synthetic sentences in held-out voices (``judge.HELD_OUT_*``: never in
training) and the human clips of Debian's ``pocketsphinx-testdata`` (evaluation only). For each,
the model's streaming transcript (the listening head's transcript logits, offline with the
streaming mask, which the tests show equals stepping) and offline Whisper tiny.en
(faster-whisper, int8, 2 threads) are scored with jiwer on normalised text, side by side.
``--twilio`` puts every clip through 8 kHz mu-law first, as a phone caller.

    .venv/bin/python benchmarks/listen_eval.py --checkpoint runs/listening --twilio
    .venv/bin/python benchmarks/listen_eval.py            # offline Whisper only (no checkpoint)
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import torch

from pipecat_michi.model.checkpoint import load_checkpoint
from pipecat_michi.model.michi import MichiModel
from pipecat_michi.model.tokenizer import Tokenizer, load_tokenizer
from pipecat_michi.train.evaluate import transcribe
from pipecat_michi.train.judge import (
    HELD_OUT_SENTENCES,
    HELD_OUT_VOICES,
    Clip,
    OfflineWhisper,
    fluent_speech,
    human_clips,
    twilio_path,
    wer,
)


def synthetic_clips(count: int) -> list[Clip]:
    pairs = zip(HELD_OUT_SENTENCES[:count], itertools.cycle(HELD_OUT_VOICES))
    return [Clip(f"{voice}/{i}", *fluent_speech(text, voice), text) for i, (text, voice) in enumerate(pairs)]


def streaming_transcript(model: MichiModel, tokenizer: Tokenizer, clip: Clip) -> str:
    audio = torch.from_numpy(clip.resampled(model.config.sample_rate_hz))
    frame = model.config.frame_samples
    # Half a second of silence after the clip: the head's transcript lags the audio.
    padded = torch.nn.functional.pad(audio, (0, (-audio.numel()) % frame + 6 * frame))
    return transcribe(model, tokenizer, padded)


def evaluate_set(name: str, clips: list[Clip], judge: OfflineWhisper, model: MichiModel | None,
                 tokenizer: Tokenizer | None, twilio: bool, verbose: bool) -> None:
    if twilio:
        clips = [Clip(c.name, twilio_path(c.audio, c.sample_rate_hz), c.sample_rate_hz, c.text) for c in clips]
    references = [c.text for c in clips]
    offline = [judge.transcribe(c.resampled(16000)) for c in clips]
    line = f"{name:28s} {len(clips):3d} clips {sum(c.audio.size / c.sample_rate_hz for c in clips):6.1f} s  " \
           f"offline Whisper tiny.en WER {100 * wer(offline, references):5.1f}%"
    if model is not None:
        streamed = [streaming_transcript(model, tokenizer, c) for c in clips]
        line += f"  streaming head WER {100 * wer(streamed, references):5.1f}%"
    else:
        streamed = [""] * len(clips)
    print(line)
    if verbose:
        for clip, off, st in zip(clips, offline, streamed):
            print(f"    {clip.name}: ref={clip.text!r}\n      whisper={off!r}\n      head={st!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a MichiAI checkpoint; without it only offline Whisper runs")
    parser.add_argument("--sentences", type=int, default=len(HELD_OUT_SENTENCES), help="held-out sentences")
    parser.add_argument("--twilio", action="store_true", help="8 kHz mu-law round trip before listening")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--verbose", action="store_true", help="print every transcript")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    np.random.seed(0)
    model = tokenizer = None
    if args.checkpoint is not None:
        model = load_checkpoint(args.checkpoint).eval()
        tokenizer = load_tokenizer(model.config, args.checkpoint)
    judge_listening(model, tokenizer, args.twilio, args.sentences, args.threads, args.verbose)


def judge_listening(model: MichiModel | None, tokenizer: Tokenizer | None, twilio: bool = False,
                    sentences: int = len(HELD_OUT_SENTENCES), threads: int = 2, verbose: bool = False) -> None:
    """Print held-out synthetic and human WER of ``model``'s head beside offline Whisper tiny.en."""
    judge = OfflineWhisper(cpu_threads=threads)
    path = " (Twilio 8 kHz mu-law)" if twilio else ""
    evaluate_set("held-out synthetic" + path, synthetic_clips(sentences), judge, model, tokenizer, twilio, verbose)
    humans = human_clips()
    if humans:
        evaluate_set("pocketsphinx human" + path, humans, judge, model, tokenizer, twilio, verbose)
    else:
        print("pocketsphinx-testdata not installed (apt-get install -y pocketsphinx-testdata): no human clips")


if __name__ == "__main__":
    main()
