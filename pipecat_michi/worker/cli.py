"""``michi-worker``: the worker's command line (flags over ``MICHI_WORKER_*``), served until stopped."""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import ValidationError

from pipecat_michi.engine.config import QUANTIZE_MODES
from pipecat_michi.serving import configure_production_logging
from pipecat_michi.worker.app import create_app
from pipecat_michi.worker.config import WorkerConfig, WorkerConfigError, given_flags
from pipecat_michi.worker.harness import bind_listener, create_server


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="michi-worker",
        description="Serve MichiAI calls over WebSockets (docs/protocol.md). Settings also come "
        "from MICHI_WORKER_* environment variables; flags win.",
    )
    parser.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (default 8765)")
    parser.add_argument("--token", help="bearer token; prefer MICHI_WORKER_TOKEN, flags show up in ps")
    parser.add_argument("--allow-unauthenticated", action="store_true", help="serve without a token (local only)")
    parser.add_argument("--preset", help="model preset with random weights (tiny, michi-530m)")
    parser.add_argument("--checkpoint", type=Path, help="MichiAI checkpoint directory, or demo (wins over --preset)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", help="auto, float32, bfloat16, float16")
    parser.add_argument("--quantize", choices=(*QUANTIZE_MODES, "auto"),
                        help="weight quantization: none, int8, int8-dynamic, auto (default: int8-dynamic for a big model on CPU)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the step (CUDA graphs on CUDA); compiles before /readyz is ready")
    parser.add_argument("--slots", type=int, help="slot capacity: concurrent calls")
    parser.add_argument("--transcript-decoder", choices=("auto", "greedy", "lexicon"),
                        help="user transcript: lexicon (CTC beam search, ~0.8 ms of Python per speaking call "
                             "per step), greedy (letters as heard), auto (lexicon for a CTC head)")
    parser.add_argument("--log-level", default="info", help="uvicorn log level")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """``michi-worker``: build the config from the environment and flags, serve until stopped."""
    args = _parse_args(argv)
    configure_production_logging(args.log_level)
    overrides = given_flags(
        host=args.host, port=args.port, token=args.token, allow_unauthenticated=args.allow_unauthenticated or None
    )
    engine_overrides = given_flags(
        preset=args.preset, checkpoint=args.checkpoint, device=args.device, dtype=args.dtype,
        quantize=args.quantize, compile=args.compile or None, slot_capacity=args.slots,
        transcript_decoder=args.transcript_decoder,
    )
    if engine_overrides:
        overrides["engine"] = engine_overrides  # merged with MICHI_WORKER_ENGINE__* by pydantic-settings
    try:
        config = WorkerConfig(**overrides)
        app = create_app(config)
    except (ValidationError, WorkerConfigError) as exc:
        raise SystemExit(f"michi-worker: {exc}") from None
    try:
        sock = bind_listener(config.host, config.port, config.send_buffer_bytes)
    except OSError as exc:
        raise SystemExit(f"michi-worker: cannot listen on {config.host}:{config.port}: {exc}") from None
    create_server(app, config, log_level=args.log_level).run(sockets=[sock])


if __name__ == "__main__":
    main()
