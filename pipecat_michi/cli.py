"""Console scripts: each imports its command only when run, so a missing extra is one line
that says what to install, not a ``ModuleNotFoundError`` traceback."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

# Modules that the core install lacks, and the extra that brings each.
_EXTRA_OF_MODULE: dict[str, str] = {
    "torch": "engine",
    "safetensors": "engine",
    "tokenizers": "engine",
    "soundfile": "engine",
    "fastapi": "worker",
    "uvicorn": "worker",
    "h11": "worker",
    "starlette": "worker",
    "pydantic_settings": "worker",
    "prometheus_client": "worker",
    "ray": "serve",
    "matplotlib": "train",
    "tqdm": "train",
    "transformers": "train",
    "gguf": "train",
    "accelerate": "train",
}


def _run(command: str, module: str, extra: str) -> None:
    """Import ``module`` and call its ``main``; when a dependency is missing, exit naming the extra."""
    try:
        main: Callable[[], None] = importlib.import_module(module).main
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        needed = _EXTRA_OF_MODULE.get(top, extra)
        sys.exit(f"{command} needs the [{needed}] extra (missing module {top!r}): pip install 'pipecat-michi[{needed}]'")
    main()


def worker() -> None:
    _run("michi-worker", "pipecat_michi.worker.cli", "worker")


def serve() -> None:
    _run("michi-serve", "pipecat_michi.worker.serve", "serve")


def simulate() -> None:
    _run("michi-simulate", "pipecat_michi.simulate", "engine")


def train() -> None:
    _run("michi-train", "pipecat_michi.train.cli", "train")
