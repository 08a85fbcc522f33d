"""How intelligible can one-step speech be from the inner monologue's context alone?

A probe for issue #15, without the backbone: the flow head's monologue context
(``model/monologue.py``: the last K monologue tokens the step holds and their ages in frames,
exactly as the duplex step builds them) plus a small MLP on the two previous latents (standing
in for the backbone's state) condition a one-step MeanFlow head and a linear readout, trained on
a fluent corpus (exact word timings) in a codec checkpoint's latent space. Judged as
``speak_eval.py`` judges the model: the judge's held-out restaurant answers in slt with flite's
exact timings, decoded by the checkpoint's codec, faster-whisper tiny.en + jiwer, beside the
reference voice and the codec's resynthesis. Three ways to speak: ``forced`` (the true previous
latents: teacher-forced), ``free`` (its own one-step samples fed back, as in a call) and
``free-mean`` (its readout fed back: the conditional mean, no sampling).

It answers where the speaking head's information must come from: the full speaking stage (LoRA
backbone, 2,500 steps, 71 min) was 83% WER teacher-forced and 101% free-running.

    .venv/bin/python benchmarks/speak_context_probe.py --checkpoint runs/codec-slt-flat \\
        --manifest data/resto/manifest.jsonl --steps 2000 --threads 1        # ~35 min on 1 core
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import soundfile
import soxr
import torch
import torch.nn.functional as F
from torch import nn

from pipecat_michi.model.checkpoint import load_checkpoint
from pipecat_michi.model.config import FlowHeadConfig
from pipecat_michi.model.flow_head import FlowHead
from pipecat_michi.model.monologue import MonologueContext, history_over_frames
from pipecat_michi.model.tokenizer import load_tokenizer
from pipecat_michi.train.data import MONOLOGUE_LEAD_FRAMES, frame_tokens, read_framed_audio
from pipecat_michi.train.fluent import framed_speech
from pipecat_michi.train.judge import OfflineWhisper, held_out_sentences, twilio_path, wer
from pipecat_michi.train.manifest import read_manifest

WHISPER_RATE_HZ = 16000
MODES = ("forced", "free", "free-mean")


class Probe(nn.Module):
    def __init__(self, embed: nn.Embedding, latent_dim: int, tokens: int, max_age: int, flow_hidden: int,
                 flow_blocks: int) -> None:
        super().__init__()
        width = embed.weight.shape[1]
        self.embed = embed
        self.context = MonologueContext(tokens, max_age, width, width)
        self.state = nn.Sequential(nn.Linear(2 * latent_dim, 512), nn.SiLU(), nn.Linear(512, width))
        self.flow = FlowHead(FlowHeadConfig(hidden_size=flow_hidden, num_blocks=flow_blocks, objective="mean_flow"),
                             latent_dim, width)
        self.readout = nn.Linear(width, latent_dim)

    def condition(self, history: torch.Tensor, ages: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """``history``/``ages [N, K]``, ``previous [N, 2, D]`` (latents t-1, t-2) -> ``[N, width]``."""
        return self.state(previous.flatten(1)) + self.context(self.embed(history), ages)


def _monologue(words, tokenizer, frames: int, frame: int) -> torch.Tensor:  # noqa: ANN001
    """Each frame's monologue input (the token said the frame before), as the step feeds it."""
    said = frame_tokens(words, tokenizer, frames, frame, MONOLOGUE_LEAD_FRAMES)
    return torch.cat([torch.tensor([tokenizer.tokens.pad_id]), said[:-1]])


def _previous(latents: torch.Tensor) -> torch.Tensor:
    """``[F, D]`` -> ``[F, 2, D]``: each frame's latents t-1 and t-2 (zeros before the start)."""
    padded = torch.cat([torch.zeros(2, latents.shape[1]), latents], dim=0)
    return torch.stack([padded[1:-1], padded[:-2]], dim=1)


def _speak(probe: Probe, history: torch.Tensor, ages: torch.Tensor, true: torch.Tensor, mode: str,
           noise: torch.Generator) -> torch.Tensor:
    """One sentence's latents ``[F, D]``, frame by frame: each frame's condition reads the two
    previous latents, the true ones (``forced``) or what the probe said (``free``: its one-step
    sample, ``free-mean``: its readout)."""
    dim = true.shape[1]
    said = [torch.zeros(dim), torch.zeros(dim)]
    out = []
    for t in range(true.shape[0]):
        condition = probe.condition(history[t: t + 1], ages[t: t + 1], torch.stack([said[-1], said[-2]])[None])
        if mode == "free-mean":
            latent = probe.readout(condition)[0]
        else:
            latent = probe.flow.sample(condition, torch.randn(1, dim, generator=noise))[0]
        out.append(latent)
        said.append(true[t] if mode == "forced" else latent)
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint with the bot's codec")
    parser.add_argument("--manifest", type=Path, required=True, help="the bot's fluent corpus (exact timings)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256, help="frames per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--tokens", type=int, default=4, help="monologue tokens in the context")
    parser.add_argument("--max-age", type=int, default=24)
    parser.add_argument("--input-noise", type=float, default=0.25, help="noise on the previous latents in training")
    parser.add_argument("--flow-hidden", type=int, default=384)
    parser.add_argument("--flow-blocks", type=int, default=4)
    parser.add_argument("--sentences", type=int, help="only the first N held-out answers")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-dir", type=Path, help="write the first sentences' audio as WAV")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model = load_checkpoint(args.checkpoint).eval()
    tokenizer = load_tokenizer(model.config, args.checkpoint)
    pad, frame, rate = model.config.tokens.pad_id, model.config.frame_samples, model.config.sample_rate_hz
    dim, delay = model.config.codec.latent_dim, model.config.codec.decoder_delay_samples

    started = time.perf_counter()
    histories, ages, previous, targets = [], [], [], []
    for entry in read_manifest(args.manifest):
        with torch.no_grad():
            latents = model.codec.encode(read_framed_audio(entry, rate, frame)[None])[0].float()
        inputs = _monologue(entry.words, tokenizer, latents.shape[0], frame)
        history, age = history_over_frames(inputs[None], args.tokens, args.max_age, pad)
        histories.append(history[0])
        ages.append(age[0])
        previous.append(_previous(latents))
        targets.append(latents)
    history_all, age_all, previous_all, target_all = (torch.cat(x) for x in (histories, ages, previous, targets))
    print(f"corpus: {len(targets)} utterances, {target_all.shape[0]} frames, encoded in "
          f"{time.perf_counter() - started:.0f} s", flush=True)

    embed = nn.Embedding.from_pretrained(model.backbone.embed_tokens.weight.detach().float().clone(), freeze=True)
    probe = Probe(embed, dim, args.tokens, args.max_age, args.flow_hidden, args.flow_blocks)
    params = [p for p in probe.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        scale = min(1.0, step / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * scale
        rows = torch.randint(0, target_all.shape[0], (args.batch_size,), generator=generator)
        noisy = previous_all[rows] + args.input_noise * torch.randn(previous_all[rows].shape, generator=generator)
        condition = probe.condition(history_all[rows], age_all[rows], noisy)
        flow_loss = probe.flow.loss(condition, target_all[rows], generator)
        readout_loss = F.mse_loss(probe.readout(condition), target_all[rows])
        optimizer.zero_grad()
        (flow_loss + readout_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 250 == 0 or step == args.steps:
            print(f"step {step}: flow {flow_loss.item():.3f} readout mse {readout_loss.item():.3f} "
                  f"(latent mean square {target_all[rows].pow(2).mean().item():.2f}), "
                  f"{time.perf_counter() - started:.0f} s", flush=True)

    probe.eval()
    sentences = list(held_out_sentences("restaurant")[: args.sentences])
    clips: dict[str, list[np.ndarray]] = {"reference": [], "codec": [], **{mode: [] for mode in MODES}}
    noise = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for i, text in enumerate(sentences):
            wav, words = framed_speech(text, "slt", rate)
            wav = np.pad(wav, (0, -wav.size % frame))
            true = model.codec.encode(torch.from_numpy(wav)[None])[0].float()
            history, age = history_over_frames(_monologue(words, tokenizer, true.shape[0], frame)[None],
                                               args.tokens, args.max_age, pad)
            clips["reference"].append(wav)
            clips["codec"].append(model.codec.decode(true[None])[0].numpy()[delay:])
            for mode in MODES:
                latents = _speak(probe, history[0], age[0], true, mode, noise)
                clips[mode].append(model.codec.decode(latents[None])[0].numpy()[delay:])
            if args.save_dir is not None and i < 4:
                args.save_dir.mkdir(parents=True, exist_ok=True)
                for kind, audio in clips.items():
                    soundfile.write(args.save_dir / f"{i:02d}-{kind}.wav", audio[-1], rate)
    judge = OfflineWhisper(cpu_threads=args.threads)
    print(f"{len(sentences)} held-out restaurant answers (slt, exact timings), judge faster-whisper tiny.en:")
    for path, through in (("clean", lambda a: a), ("twilio", lambda a: twilio_path(a, rate))):
        heard = {kind: [judge.transcribe(soxr.resample(through(a), rate, WHISPER_RATE_HZ)) for a in audio]
                 for kind, audio in clips.items()}
        print(f"  {path:<7}" + "  ".join(f"{kind} {100 * wer(heard[kind], sentences):.1f}%" for kind in clips))


if __name__ == "__main__":
    main()
