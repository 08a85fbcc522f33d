"""The call contract: what a duplex backend promises, whether it runs here or on a worker.

Protocols (``DuplexBackend``/``DuplexCall``), results and errors, in a module that imports
neither torch nor Pipecat, so ``MichiLLMService`` over a ``RemoteWorker`` runs on the core
install. ``engine.engine`` and ``engine.call`` re-export these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from pipecat_michi.engine.settings import SessionSettingsUpdate


class EngineError(RuntimeError):
    """Base of the engine's errors."""


class EngineFullError(EngineError):
    """Every slot is taken; try another worker."""


class SessionClosedError(EngineError):
    """The call was closed (by its owner, or because the engine stopped)."""


class SessionIdleError(SessionClosedError):
    """The backend ended the call because the caller sent nothing for its idle limit: a new
    call is worth opening only once the caller sends audio again."""


class FrameOrderError(EngineError):
    """A frame index did not increase."""


@dataclass(frozen=True)
class StepResult:
    """The model's output for one frame of one call."""

    frame_index: int
    filled: bool  # the input frame was missing and silence was used instead
    late: bool  # the tick took longer than one frame
    speaking: bool
    speak_prob: float
    bot_text: str
    transcript: str
    audio: np.ndarray | None  # int16 [frame_samples] when speaking
    kv_length: int | None  # None when the engine is remote (the worker protocol does not carry it)


@dataclass(frozen=True)
class InjectResult:
    token_count: int
    kv_length: int


class DuplexCall(Protocol):
    """A live call: 24 kHz PCM16 frames in, one ``StepResult`` per frame out."""

    session_id: str
    frame_samples: int
    sample_rate_hz: int

    async def send_audio(self, pcm: np.ndarray, frame_index: int | None = None) -> None:
        """Send one frame of ``frame_samples`` int16 samples (24 kHz mono)."""
        ...

    async def receive(self, timeout: float | None = None) -> StepResult:
        """The next step result; raises ``SessionClosedError`` (local) or ``WorkerConnectionError``
        (remote) when the call is over."""
        ...

    async def inject_text(self, text: str, role: str = "system", pinned: bool = False) -> InjectResult: ...

    async def update_settings(self, update: SessionSettingsUpdate) -> None: ...

    async def reset(self) -> None: ...

    async def close(self) -> None: ...


class DuplexBackend(Protocol):
    """Opens calls. One backend serves many calls (one per pipeline)."""

    async def open_call(
        self,
        settings: SessionSettingsUpdate | None = None,
        system_prompt: str | None = None,
        voice_prompt: np.ndarray | None = None,
    ) -> DuplexCall:
        """Open a call. ``settings`` holds what differs from the model's defaults
        (``DuplexEngine.session_defaults``: a checkpoint's calibrated speak threshold and onset frames)."""
        ...

    async def close(self) -> None: ...
