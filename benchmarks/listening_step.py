"""Listening head step cost at batch 1: ms per 80 ms frame, per preset's head (random weights).

    .venv/bin/python benchmarks/listening_step.py --presets michi-nano michi-530m --steps 100
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pipecat_michi.model.config import MichiConfig
from pipecat_michi.model.listening_head import ListeningHead
from pipecat_michi.model.whisper.encoder import WhisperListeningHead


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "michi-nano", "michi-530m"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    for name in args.presets:
        cfg = MichiConfig.preset(name)
        cls = WhisperListeningHead if cfg.listening.kind == "whisper" else ListeningHead
        head = cls(cfg.listening, cfg.frame_samples, cfg.sample_rate_hz, cfg.backbone.hidden_size,
                   cfg.backbone.vocab_size).eval().to(dtype)
        state = head.init_state(1)
        frame = torch.randn(1, cfg.frame_samples, generator=torch.Generator().manual_seed(0)).to(dtype) * 0.1
        times = []
        with torch.inference_mode():
            for i in range(args.steps + 5):
                start = time.perf_counter()
                _, state = head.step(frame, state)
                if i >= 5:
                    times.append(1000 * (time.perf_counter() - start))
        params = sum(p.numel() for p in head.parameters()) / 1e6
        print(f"{name:11s} {cfg.listening.kind:7s} {params:6.1f}M params  {args.dtype}  "
              f"step p50 {np.percentile(times, 50):6.2f} ms  p99 {np.percentile(times, 99):6.2f} ms")


if __name__ == "__main__":
    main()
