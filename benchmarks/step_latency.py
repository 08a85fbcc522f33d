"""Duplex step latency: ms per 80 ms frame for each preset, and how it scales with the batch.

Each measurement steps ``batch`` calls together through ``MichiModel.step`` with random weights,
every call's KV cache pre-filled to ``--kv-length`` entries of text (a few minutes of a call),
temperature/top-k sampling on and random caller audio in. Only the model step is timed (noise is
drawn beforehand); on CUDA each step is synchronised.

    .venv/bin/python benchmarks/step_latency.py
    .venv/bin/python benchmarks/step_latency.py --presets michi-530m --batches 1 8 32 --steps 20
    .venv/bin/python benchmarks/step_latency.py --presets michi-530m --batches 1 --threads 2 --quantize int8

Each preset also prints the bandwidth floor of a batch-1 step: the bytes of weights it must
read (model/quantize.py ``weight_bytes``) over the read bandwidth measured here (summing a
tensor much larger than the caches), and p50's ratio to it.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from pipecat_michi.model.runtime import prepare_model_thread, resolve_device, resolve_dtype
from pipecat_michi.model.config import MichiConfig
from pipecat_michi.model.kv_cache import SlotKVCache
from pipecat_michi.model import michi as michi_module
from pipecat_michi.model.michi import MichiModel, Sampling, StepNoise
from pipecat_michi.model.quantize import QUANTIZE_MODES, quantize_model, weight_bytes

DEFAULT_BATCHES = (1, 8, 32)
# Timed steps at batch 1 on CPU; larger batches run fewer (see steps_for_batch). CUDA: 200.
CPU_DEFAULT_STEPS = {"tiny": 200, "michi-530m": 40}
# Batches above this are skipped on CPU for these presets unless --batches names them.
CPU_MAX_DEFAULT_BATCH = {"michi-530m": 8}
MIN_STEPS = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "michi-530m"], help="model presets to time")
    parser.add_argument("--batches", nargs="+", type=int, default=None,
                        help=f"batch sizes (default {' '.join(map(str, DEFAULT_BATCHES))}; "
                             "michi-530m on CPU stops at 8 unless named here)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps at batch 1 (default: 200 for tiny, 40 for michi-530m on CPU, "
                             f"200 on CUDA); batch B runs max({MIN_STEPS}, steps // B)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--kv-length", type=int, default=300, help="KV entries pre-filled per call")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:1")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    parser.add_argument("--quantize", default="none", choices=QUANTIZE_MODES, help="weight quantization")
    parser.add_argument("--split", action="store_true",
                        help="after the table, time each part of a batch-1 step (eager only)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the step (CUDA graphs on CUDA); compiling happens in the warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def read_bandwidth_gbs(device: torch.device, megabytes: int = 1024, repeats: int = 5) -> float:
    """Memory read bandwidth: the best of ``repeats`` sums of a tensor far larger than any cache."""
    data = torch.ones(megabytes * 2**20 // 4, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass also faults the pages in
        synchronize(device)
        start = time.perf_counter()
        data.sum()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9


def steps_for_batch(steps: int, batch: int) -> int:
    return max(min(steps, MIN_STEPS), steps // batch)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_params(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count >= 1e6 else f"{count / 1e3:.1f}k"


def prefilled_cache(model: MichiModel, template: SlotKVCache, batch: int, extra: int) -> SlotKVCache:
    """A ``batch``-slot cache whose every slot holds a copy of ``template``'s slot 0."""
    cache = model.new_cache(batch, capacity=template.host_lengths[0] + extra)
    for slot in range(batch):
        cache.copy_slot(template, 0, slot)
    return cache


def time_steps(model: MichiModel, template: SlotKVCache, batch: int, warmup: int, steps: int,
               seed: int) -> np.ndarray:
    """Milliseconds of each of ``steps`` timed duplex steps for ``batch`` calls."""
    config, device = model.config, model.device
    cache = prefilled_cache(model, template, batch, extra=warmup + steps)
    state = model.init_state(batch)
    sampling = Sampling(
        temperature=torch.full((batch,), 0.8, device=device),
        top_k=torch.full((batch,), 50, dtype=torch.long, device=device),
        speak_threshold=torch.full((batch,), config.speak_threshold, device=device),
        # As the engine: an eager step knows every call's top_k bound, a compiled one sorts all.
        max_top_k=None if model.step_is_compiled else 50,
    )
    generators = [torch.Generator().manual_seed(seed + row) for row in range(batch)]
    audio_generator = torch.Generator().manual_seed(seed)
    timings = []
    for index in range(warmup + steps):
        user_audio = (0.1 * torch.randn(batch, config.frame_samples, generator=audio_generator)).to(device)
        noise = StepNoise.draw(generators, config.codec.latent_dim, device)
        synchronize(device)
        start = time.perf_counter()
        # Compiled: attend over the whole cache, one shape every step (as the engine does).
        key_count = cache.capacity if model.step_is_compiled else None
        _, state = model.step(user_audio, state, cache, sampling, noise, key_count=key_count)
        synchronize(device)
        if index >= warmup:
            timings.append((time.perf_counter() - start) * 1000)
    return np.array(timings)


def bench_preset(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    config = MichiConfig.preset(name)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model = MichiModel(config).to(device=device, dtype=dtype).eval()
    # Counted before quantizing: int8 weights are buffers, not parameters.
    parameters = model.num_parameters()
    parts = ", ".join(f"{part} {format_params(sum(p.numel() for p in module.parameters()))}"
                      for part, module in model.named_children())
    model = quantize_model(model, args.quantize)
    if args.compile:
        model.compile_step(mode="reduce-overhead" if device.type == "cuda" else None)
    print(f"\n== {name}: {parameters:,} parameters ({parts}); "
          f"built in {time.perf_counter() - start:.1f} s")
    floor_ms = weight_bytes(model) / (args.read_gbs * 1e9) * 1000
    print(f"weights read per step: {weight_bytes(model) / 1e6:.0f} MB (quantize {args.quantize}); "
          f"bandwidth floor at batch 1: {floor_ms:.1f} ms at {args.read_gbs:.1f} GB/s")

    template = model.new_cache(1, capacity=args.kv_length)
    token_ids = torch.randint(0, config.backbone.vocab_size, (args.kv_length,),
                              generator=torch.Generator().manual_seed(args.seed)).tolist()
    start = time.perf_counter()
    model.prefill_text(token_ids, template, slot=0)
    synchronize(device)
    print(f"KV cache pre-filled to {args.kv_length} entries per call in "
          f"{(time.perf_counter() - start) * 1000:.0f} ms (grows by one per step)")

    steps = args.steps or (200 if device.type == "cuda" else CPU_DEFAULT_STEPS.get(name, 40))
    batches = args.batches or list(DEFAULT_BATCHES)
    cap = CPU_MAX_DEFAULT_BATCH.get(name) if device.type == "cpu" and args.batches is None else None
    frame_ms = config.codec.frame_ms
    print(f"{'batch':>5} {'steps':>5} {'p50 ms':>8} {'p99 ms':>8} {'x batch 1':>9} "
          f"{'ms/call':>8}  p99 <= {frame_ms:.0f} ms  {'p50/floor':>9}")
    base_p50: float | None = None
    for batch in batches:
        if cap is not None and batch > cap:
            print(f"{batch:>5}  skipped on CPU (name it in --batches to run it)")
            continue
        batch_steps = steps_for_batch(steps, batch)
        timings = time_steps(model, template, batch, args.warmup, batch_steps, args.seed)
        p50, p99 = np.percentile(timings, [50, 99])
        if batch == 1:
            base_p50 = p50
        ratio = f"{p50 / base_p50:8.2f}x" if base_p50 else f"{'-':>9}"
        floor_ratio = f"{p50 / floor_ms:8.2f}x" if batch == 1 else f"{'':>9}"
        print(f"{batch:>5} {batch_steps:>5} {p50:8.2f} {p99:8.2f} {ratio} {p50 / batch:8.2f}  "
              f"{'yes' if p99 <= frame_ms else 'no ':>15}  {floor_ratio}")
    if args.split and not args.compile:
        time_split(model, template, args)


# The parts of a duplex step, as (label, object, method name): what --split times.
def step_parts(model: MichiModel) -> list[tuple[str, object, str]]:
    return [
        ("listening head", model.listening, "step"),
        ("backbone", model.backbone, "forward_kv"),
        ("LM head", model.backbone, "logits"),
        ("sampling", michi_module, "sample_tokens"),
        ("flow head", model.flow, "sample"),
        ("vocoder", model.codec.decoder, "step"),
    ]


def time_split(model: MichiModel, template: SlotKVCache, args: argparse.Namespace) -> None:
    """p50 ms of each part of a batch-1 step: each part's method is wrapped with a timer."""
    device = model.device
    spent: dict[str, list[float]] = {label: [] for label, _, _ in step_parts(model)}
    originals = []
    for label, owner, name in step_parts(model):
        method = getattr(owner, name)
        originals.append((owner, name, method))

        def timed(*call_args, _method=method, _label=label, **kwargs):  # noqa: ANN002, ANN003, ANN202
            synchronize(device)
            start = time.perf_counter()
            result = _method(*call_args, **kwargs)
            synchronize(device)
            spent[_label].append((time.perf_counter() - start) * 1000)
            return result

        setattr(owner, name, timed)
    try:
        steps = steps_for_batch(args.steps or CPU_DEFAULT_STEPS.get(model.config.name, 40), 1)
        total = time_steps(model, template, 1, args.warmup, steps, args.seed)
    finally:
        for owner, name, method in originals:
            if owner is michi_module:
                setattr(owner, name, method)
            else:
                delattr(owner, name)  # drop the instance attribute: the class method shows again
    parts = ", ".join(f"{label} {np.median(ms[args.warmup:]):.1f}" for label, ms in spent.items())
    print(f"split of a batch-1 step, p50 ms: {parts}; whole step {np.median(total):.1f}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prepare_model_thread()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    args.read_gbs = read_bandwidth_gbs(device)
    print(f"torch {torch.__version__}, device {device} ({where}), dtype {str(dtype).removeprefix('torch.')}, "
          f"quantize {args.quantize}{', compiled' if args.compile else ''}, {torch.get_num_threads()} threads, read bandwidth {args.read_gbs:.1f} GB/s")
    print("Columns: ms per duplex step (all calls of the batch together), p50/p99 over the timed steps; "
          "'x batch 1' = p50(batch B) / p50(batch 1); ms/call = p50 / B.")
    with torch.inference_mode():
        for name in args.presets:
            bench_preset(name, args, device, dtype)


if __name__ == "__main__":
    main()
