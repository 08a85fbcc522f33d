"""Does the model say what it means? Whisper's WER on its forced speech of held-out sentences.

Forced TTS, judged by an ASR we did not write: each held-out sentence (``judge.HELD_OUT_SENTENCES``,
never in a training corpus) becomes the bot's inner monologue, one token per frame where the bot's
voice would say it (word timings from a synthesis of the sentence in ``--voice``, as the training
corpus has them, text leading the audio by ``MONOLOGUE_LEAD_FRAMES``). The model speaks it over a
silent caller, one duplex step per 80 ms frame (flow head sampled in one step, codec decoder), and
faster-whisper tiny.en transcribes the bot's audio; jiwer scores it against the sentence. Beside
it: the reference voice and the codec's resynthesis of it (what the speaking head aims at), and
with ``--paced`` the same sentence paced by the model itself (``evaluate.paced_speech``: a token
whenever its text head asks for one, as in a call where no timing is given).

    .venv/bin/python benchmarks/speak_eval.py --checkpoint runs/speaking-slt
    .venv/bin/python benchmarks/speak_eval.py --checkpoint runs/speaking-slt --twilio --save-dir /tmp/speak
    .venv/bin/python benchmarks/speak_eval.py --checkpoint runs/speaking-resto --domain restaurant --twilio
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import soundfile
import soxr
import torch

from pipecat_michi.train.data import MONOLOGUE_LEAD_FRAMES, frame_tokens
from pipecat_michi.train.evaluate import forced_speech, load_speaking_checkpoint, paced_speech
from pipecat_michi.train.fluent import framed_speech
from pipecat_michi.train.judge import OfflineWhisper, held_out_sentences, twilio_path, wer

WHISPER_RATE_HZ = 16000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a MichiAI checkpoint with a trained speaking head")
    parser.add_argument("--voice", default="slt", help="the bot's voice: word timings and the reference (default slt)")
    parser.add_argument("--domain", choices=("everyday", "restaurant"), default="everyday",
                        help="held-out sentences: everyday (open vocabulary) or the demo's restaurant answers "
                             "(train/restaurant.py: the domain's words in combinations training never saw)")
    parser.add_argument("--sentences", type=int, help="only the first N held-out sentences")
    parser.add_argument("--twilio", action="store_true", help="also score everything through 8 kHz mu-law")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timings", choices=("exact", "approximate"), default="exact",
                        help="the inner monologue's word timings: flite's exact ones (what corpora hold since "
                             "2026-12-04 night), or the letter-proportional ones earlier runs were trained on")
    parser.add_argument("--seed", type=int, default=0, help="the flow head's noise")
    parser.add_argument("--flow-noise-scale", type=float,
                        help="the flow head's starting noise times this (default: the checkpoint's, 1.0): "
                             "below 1 samples nearer the distribution's centre, as a temperature")
    parser.add_argument("--save-dir", type=Path, help="write each sentence's reference and bot speech as WAV")
    parser.add_argument("--verbose", action="store_true", help="print every transcript")
    parser.add_argument("--paced", action="store_true",
                        help="also let the model pace the text itself (a token whenever its text head asks for one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_speaking_checkpoint(args.checkpoint, args.flow_noise_scale)
    rate, frame = model.config.sample_rate_hz, model.config.frame_samples
    delay = model.config.codec.decoder_delay_samples
    generator = torch.Generator().manual_seed(args.seed)
    sentences = list(held_out_sentences(args.domain)[: args.sentences])
    clips: dict[str, list[np.ndarray]] = {"reference": [], "codec": [], "bot": []} | ({"paced": []} if args.paced else {})
    paced_tokens = paced_said = 0
    spent = spoken_seconds = 0.0
    for i, text in enumerate(sentences):
        wav, words = framed_speech(text, args.voice, rate, timings=args.timings)
        wav = np.pad(wav, (0, -wav.size % frame))
        frames = wav.size // frame
        monologue = frame_tokens(words, tokenizer, frames, frame, MONOLOGUE_LEAD_FRAMES)
        started = time.perf_counter()
        bot = forced_speech(model, monologue, generator).float().cpu().numpy()[delay:]
        spent, spoken_seconds = spent + time.perf_counter() - started, spoken_seconds + wav.size / rate
        with torch.no_grad():
            codec = model.codec.decode(model.codec.encode(torch.from_numpy(wav)[None].to(model.device, model.dtype)))
        clips["reference"].append(wav)
        clips["codec"].append(codec[0].float().cpu().numpy()[delay:])
        clips["bot"].append(bot)
        if args.paced:
            tokens = [int(t) for t in monologue if int(t) != tokenizer.tokens.pad_id]
            paced, said = paced_speech(model, tokens, generator, max_frames=2 * frames)
            clips["paced"].append(paced.float().cpu().numpy()[delay:])
            paced_tokens, paced_said = paced_tokens + len(tokens), paced_said + said
        if args.save_dir is not None:
            args.save_dir.mkdir(parents=True, exist_ok=True)
            for kind in clips:
                soundfile.write(args.save_dir / f"{i:02d}-{kind}.wav", clips[kind][-1], rate)

    judge = OfflineWhisper(cpu_threads=args.threads)
    print(f"{args.checkpoint}: forced speech of {len(sentences)} held-out {args.domain} sentences, timings from {args.voice}; "
          f"judge: faster-whisper tiny.en")
    print(f"{'path':<7} " + " ".join(f"{kind:>9}" for kind in clips))
    paths = [("clean", lambda a: a)] + ([("twilio", lambda a: twilio_path(a, rate))] if args.twilio else [])
    for path, through in paths:
        heard = {kind: [judge.transcribe(soxr.resample(through(a), rate, WHISPER_RATE_HZ)) for a in audio]
                 for kind, audio in clips.items()}
        print(f"{path:<7} " + " ".join(f"{100 * wer(heard[kind], sentences):>8.1f}%" for kind in clips))
        if args.verbose:
            for i, text in enumerate(sentences):
                print(f"    said: {text}\n" + "".join(f"    {kind}: {heard[kind][i]}\n" for kind in clips if kind != "reference"))
    if args.paced:
        print(f"paced: the model asked for {paced_said} of {paced_tokens} tokens within twice the forced length")
    print(f"bot speech: {spent / spoken_seconds:.2f}x real time ({args.threads} threads, unbatched eager steps)")


if __name__ == "__main__":
    main()
