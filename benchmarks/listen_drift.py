"""How far has the streaming listening head drifted from the Whisper it started from?

For each test set of ``listen_eval.py`` (held-out synthetic, the human clips of
``pocketsphinx-testdata``), the mean cosine between the head's streaming encoder tokens (its
block-causal mask, as in a call) and the offline Whisper encoder's (the distillation teacher:
original weights, full attention) ``--lag`` tokens earlier, beside the same figure for the
original weights under the streaming mask (where fine-tuning started). A head that learned
TTS-specific features scores below its own starting point on human speech.

    .venv/bin/python benchmarks/listen_drift.py --checkpoint pipecat_michi/assets/michi-nano-listening --twilio
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from pipecat_michi.model.checkpoint import load_checkpoint
from pipecat_michi.model.whisper.encoder import WhisperListeningHead, whisper_offline_encode
from pipecat_michi.train.judge import Clip, human_clips, twilio_path

from listen_eval import synthetic_clips  # noqa: I001 (a sibling script: run from benchmarks/ or the repo root)


def streaming_tokens(head: WhisperListeningHead, mel: torch.Tensor) -> torch.Tensor:
    x = head.encoder.stem(mel, "stream")
    x = head.encoder.add_positions(x, torch.arange(x.shape[1])[None])
    return head.encoder(x, head.block_causal_mask(x.shape[1], mel.device)[None])


@torch.no_grad()
def drift(head: WhisperListeningHead, original: WhisperListeningHead, clips: list[Clip], rate: int,
          lag: int) -> tuple[float, float]:
    """Mean cosine to the teacher of the head's tokens and of the original weights' (streaming mask)."""
    ours, start = [], []
    for clip in clips:
        audio = torch.from_numpy(clip.resampled(rate))
        wav = F.pad(audio, (0, (-audio.numel()) % head.frame_samples))[None]
        mel, _ = head.front_end(wav, head.front_end.init_state(1, wav.device))
        teacher = whisper_offline_encode(original.encoder, mel)[0, :-lag]
        ours.append(F.cosine_similarity(streaming_tokens(head, mel)[0, lag:], teacher, dim=-1).mean())
        start.append(F.cosine_similarity(streaming_tokens(original, mel)[0, lag:], teacher, dim=-1).mean())
    return float(torch.stack(ours).mean()), float(torch.stack(start).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint with a Whisper listening head")
    parser.add_argument("--twilio", action="store_true", help="8 kHz mu-law round trip first, as a phone caller")
    parser.add_argument("--sentences", type=int, default=24, help="held-out synthetic sentences")
    parser.add_argument("--lag", type=int, default=2, help="teacher lag in 20 ms tokens (training's default)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint).eval()
    head = model.listening
    if not isinstance(head, WhisperListeningHead) or head.config.whisper_weights is None:
        parser.error("the checkpoint's listening head is not a Whisper head with known original weights")
    original = copy.deepcopy(head)
    original.load_whisper(head.config.whisper_weights)
    for name, clips in (("held-out synthetic", synthetic_clips(args.sentences)), ("human clips", human_clips())):
        if args.twilio:
            clips = [Clip(c.name, twilio_path(c.audio, c.sample_rate_hz), c.sample_rate_hz, c.text) for c in clips]
        ours, start = drift(head, original, clips, model.config.sample_rate_hz, args.lag)
        print(f"{name:<20} {len(clips):3d} clips{' (Twilio)' if args.twilio else ''}: cosine to the offline "
              f"teacher {ours:.3f} (the original weights, streaming: {start:.3f})")


if __name__ == "__main__":
    main()
