"""Where and how the model runs: device, dtype and per-thread CPU setup."""

from __future__ import annotations

import torch


def resolve_device(spec: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU; anything else is passed to torch."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``"auto"``: bfloat16 on CUDA, float32 on CPU (CPU bf16 matmuls are not faster here)."""
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec]
    except KeyError:
        raise ValueError(f"unknown dtype {spec!r}: use auto, float32, bfloat16 or float16") from None


def prepare_model_thread() -> None:
    """Per-thread CPU setup for the thread that runs the model.

    Flush denormals to zero: small activations decaying through the vocoder's many layers
    become denormal floats, which x86 handles ~100x slower (a tiny-preset step went from
    ~4 ms to ~500 ms). The flag lives in the thread's MXCSR register, hence per thread.
    """
    torch.set_flush_denormal(True)
