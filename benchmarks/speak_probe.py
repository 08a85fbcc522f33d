"""Where does the speaking head stand? Its teacher-forced error per band of latent components.

Each held-out sentence (``--domain``) is encoded by the checkpoint's codec; the backbone reads the
true previous latents and the inner monologue at the sentence's word timings (as in training),
and the flow head samples each next latent in one step. Per band of components (the codec's
latents are PCA-ordered: loudness and tilt first, finer spectral detail after), it prints the
flow samples' squared error over the band's variance (1.0: no better than silence's zeros; ~2:
samples of the right spread that ignore the text) and, when the run's ``train_state.pt`` holds a
``--latent-readout-weight`` readout, the share of the band's variance that linear readout of the
backbone's state explains (the conditional mean: what the states carry). Teacher forcing makes
it an upper bound of what a call gets; ``benchmarks/speak_eval.py`` is the judged figure.
``--judge`` also decodes the teacher-forced samples and has Whisper transcribe them (WER).

    .venv/bin/python benchmarks/speak_probe.py --checkpoint runs/speaking-resto --domain restaurant
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import soxr
import torch

from pipecat_michi.train.data import MONOLOGUE_LEAD_FRAMES, frame_tokens
from pipecat_michi.train.fluent import framed_speech
from pipecat_michi.train.evaluate import load_speaking_checkpoint
from pipecat_michi.train.judge import OfflineWhisper, held_out_sentences, wer

BANDS = ((0, 4), (4, 8), (8, 16), (16, 32), (32, 64))
WHISPER_RATE_HZ = 16000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--domain", choices=("everyday", "restaurant"), default="everyday")
    parser.add_argument("--sentences", type=int, default=8)
    parser.add_argument("--voice", default="slt")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timings", choices=("exact", "approximate"), default="exact",
                        help="the inner monologue's word timings: flite's exact ones (what corpora hold since "
                             "2026-12-04 night), or the letter-proportional ones earlier runs were trained on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--judge", action="store_true", help="also Whisper's WER on the decoded teacher-forced samples")
    parser.add_argument("--flow-noise-scale", type=float, help="the flow head's starting noise times this (default 1.0)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_speaking_checkpoint(args.checkpoint, args.flow_noise_scale)
    rate, frame, dim = model.config.sample_rate_hz, model.config.frame_samples, model.config.codec.latent_dim
    readout = None
    state_file = args.checkpoint / "train_state.pt"
    if state_file.is_file():
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        if state.get("readout") is not None:
            readout = torch.nn.Linear(model.config.backbone.hidden_size, dim)
            readout.load_state_dict(state["readout"])
            print(f"readout of step {state['step']}")
    sentences = held_out_sentences(args.domain)[: args.sentences]
    generator = torch.Generator().manual_seed(args.seed)
    variance, flow_error, readout_error = torch.zeros(dim), torch.zeros(dim), torch.zeros(dim)
    decoded: list[np.ndarray] = []
    for text in sentences:
        wav, words = framed_speech(text, args.voice, rate, timings=args.timings)
        wav = torch.from_numpy(np.pad(wav, (0, -wav.size % frame)))[None]
        frames = wav.shape[1] // frame
        monologue = frame_tokens(words, tokenizer, frames, frame, MONOLOGUE_LEAD_FRAMES)[None]
        with torch.no_grad():
            latents = model.codec.encode(wav.to(model.device, model.dtype))[0].float()
            heard = model.listening(torch.zeros_like(wav).to(model.device))[0]
            previous = torch.cat([torch.zeros_like(latents[:1]), latents[:-1]])[None].to(model.dtype)
            previous_text = torch.cat([torch.full_like(monologue[:, :1], model.config.tokens.pad_id), monologue[:, :-1]], 1)
            hidden = model.backbone(heard + model.latent_in(previous) + model.backbone.embed_tokens(previous_text.to(model.device)))[0]
            sampled = model.flow.sample(hidden, torch.randn(frames, dim, generator=generator).to(hidden)).float()
            variance += latents.square().sum(0)
            flow_error += (sampled - latents).square().sum(0)
            if readout is not None:
                readout_error += (readout(hidden.float().cpu()) - latents.cpu()).square().sum(0)
            if args.judge:
                delay = model.config.codec.decoder_delay_samples
                decoded.append(model.codec.decode(sampled[None].to(model.dtype))[0, delay:].float().cpu().numpy())
    print(f"{args.checkpoint}: teacher-forced, {len(sentences)} held-out {args.domain} sentences in {args.voice}")
    print(f"{'components':<12}{'share of variance':>18}{'flow error / variance':>23}" + (f"{'readout explains':>18}" if readout else ""))
    for low, high in BANDS:
        band = slice(low, min(high, dim))
        share = float(variance[band].sum() / variance.sum())
        row = f"{f'{low}-{high}':<12}{100 * share:>17.1f}%{float(flow_error[band].sum() / variance[band].sum()):>23.2f}"
        if readout is not None:
            row += f"{100 * (1 - float(readout_error[band].sum() / variance[band].sum())):>17.0f}%"
        print(row)
    if args.judge:
        judge = OfflineWhisper(cpu_threads=args.threads)
        heard = [judge.transcribe(soxr.resample(clip, rate, WHISPER_RATE_HZ)) for clip in decoded]
        print(f"teacher-forced samples decoded, Whisper WER {100 * wer(heard, list(sentences)):.1f}%")
        for text, said in zip(sentences, heard):
            print(f"    {text} -> {said}")


if __name__ == "__main__":
    main()
