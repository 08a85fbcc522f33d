"""What bf16, fp16 and int8 weights cost in quality against float32, next to what they save.

One seeded call (quiet noise from the caller, greedy text, the same flow noise, the model
speaking every frame) runs once in float32 and twice per mode: teacher-forced (fed float32's
text and latents, model/parity.py) for text top-1 agreement (share of frames with the same text
token), mean latent cosine and audio SNR against float32, and free-running for its text
agreement (where a flipped near-tie changes every later input). "ties" counts the teacher-forced
flips at frames where float32's runner-up token had at least half the top token's probability
(a coin toss that any rounding decides), over all flips. Each mode prints whether it
passes the serving bar (teacher-forced text >= 95 %, cosine >= 0.99) and its mean ms per step
over the call (CPU threads as given). Random weights for each preset, and the demo
checkpoint (a random codec barely depends on the latent, so audio SNR only means something for
trained weights).

    .venv/bin/python benchmarks/quantize_quality.py --threads 2
    .venv/bin/python benchmarks/quantize_quality.py --presets michi-530m --checkpoints --threads 2
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from pipecat_michi.engine.config import DEMO_CHECKPOINT, NANO_LISTENING_CHECKPOINT
from pipecat_michi.model.checkpoint import load_checkpoint
from pipecat_michi.model.config import MichiConfig
from pipecat_michi.model.michi import MichiModel
from pipecat_michi.model.parity import compare, flips_at_near_ties, recorded_text_top2, run_call, seeded_call_audio
from pipecat_michi.model.quantize import quantize_model, weight_bytes
from pipecat_michi.model.runtime import prepare_model_thread, resolve_dtype

DEFAULT_MODES = ("bfloat16:none", "float16:none", "float32:int8", "bfloat16:int8", "float32:int8-dynamic",
                 "bfloat16:int8-dynamic")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="*", default=["tiny", "michi-530m"], help="presets, random weights")
    parser.add_argument("--checkpoints", nargs="*", type=Path, default=[DEMO_CHECKPOINT, NANO_LISTENING_CHECKPOINT],
                        help="trained checkpoints (default: the shipped ones)")
    parser.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), help="DTYPE:QUANTIZE pairs")
    parser.add_argument("--frames", type=int, default=50,
                        help="frames of the seeded call (at 25, one frame is 4 %% of the text agreement)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def timed_call(model: MichiModel, audio: torch.Tensor, seed: int):  # noqa: ANN201 - (trace, ms per step)
    run_call(model, audio[:2], seed)  # warm-up: first-call allocations
    start = time.perf_counter()
    trace = run_call(model, audio, seed)
    return trace, (time.perf_counter() - start) * 1000 / len(audio)


def measure(name: str, reference: MichiModel, args: argparse.Namespace) -> None:
    audio = seeded_call_audio(reference, args.frames, args.seed)
    with recorded_text_top2(reference) as records:
        expected, reference_ms = timed_call(reference, audio, args.seed)
    top2 = torch.cat(records[-len(audio):])  # the timed call's frames (after the warm-up's)
    print(f"\n== {name}: {args.frames} frames, seed {args.seed}; float32 {weight_bytes(reference) / 1e6:.0f} MB "
          f"of weights, {reference_ms:.1f} ms/step")
    print(f"median top-token probability (float32): {top2[:, 0].median().item():.4f}")
    print(f"{'mode':<22} {'text agree':>10} {'free-run':>8} {'ties':>6} {'latent cos':>10} {'audio SNR':>10} "
          f"{'bar':>5} {'MB':>6} {'ms/step':>8} {'speed-up':>8}")
    for mode in args.modes:
        dtype_name, quantize = mode.split(":")
        candidate = quantize_model(copy.deepcopy(reference).to(resolve_dtype(dtype_name, reference.device)), quantize)
        trace, ms = timed_call(candidate, audio, args.seed)
        free_running = compare(expected, trace)
        forced = run_call(candidate, audio, args.seed, forced=expected)
        agreement = compare(expected, forced)
        ties, flips = flips_at_near_ties(expected, forced, top2)
        print(f"{mode:<22} {agreement.text_agreement:10.3f} {free_running.text_agreement:8.3f} {ties:>3}/{flips:<2} "
              f"{agreement.latent_cosine:10.5f} {agreement.audio_snr_db:8.1f}dB "
              f"{'pass' if agreement.passes() else 'FAIL':>5} "
              f"{weight_bytes(candidate) / 1e6:6.0f} {ms:8.1f} {reference_ms / ms:7.2f}x")
        del candidate


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prepare_model_thread()
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads. Bar: text agreement >= 0.95 "
          "and latent cosine >= 0.99 against float32.")
    with torch.inference_mode():
        for preset in args.presets:
            torch.manual_seed(args.seed)
            measure(f"{preset} (random weights, seed {args.seed})", MichiModel(MichiConfig.preset(preset)).eval(), args)
        for checkpoint in args.checkpoints:
            measure(f"checkpoint {checkpoint.name}", load_checkpoint(checkpoint), args)


if __name__ == "__main__":
    main()
