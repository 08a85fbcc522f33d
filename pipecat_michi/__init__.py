"""MichiAI full-duplex speech LLM as a Pipecat speech-to-speech service.

``from pipecat_michi import MichiLLMService, MichiSettings, LocalEngine, RemoteWorker``. The
names load on first use, so ``import pipecat_michi`` stays light and a ``RemoteWorker`` app
never imports torch (``LocalEngine`` needs the ``[engine]`` extra).
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("pipecat-michi")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"

# Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "MichiLLMService": "pipecat_michi.service",
    "MichiServiceParams": "pipecat_michi.service",
    "MichiSettings": "pipecat_michi.service",
    "RemoteWorker": "pipecat_michi.worker.client",
    "LocalEngine": "pipecat_michi.engine.call",
    "EngineConfig": "pipecat_michi.engine.config",
}

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from pipecat_michi.engine.call import LocalEngine
    from pipecat_michi.engine.config import EngineConfig
    from pipecat_michi.service import MichiLLMService, MichiServiceParams, MichiSettings
    from pipecat_michi.worker.client import RemoteWorker


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipecat_michi' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value
