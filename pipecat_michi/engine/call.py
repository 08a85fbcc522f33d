"""One interface for a duplex call, whether the engine runs in-process or on a GPU worker.

``MichiLLMService`` talks only to ``DuplexBackend``/``DuplexCall``. ``LocalEngine`` (here) runs
the engine in this process, the embedded CPU default; ``RemoteWorker``
(``pipecat_michi.worker.client``) speaks the worker protocol over a WebSocket.
"""

from __future__ import annotations

import asyncio

import numpy as np

from pipecat_michi.contract import DuplexBackend, DuplexCall  # re-exported: the contract's old home
from pipecat_michi.engine.config import EngineConfig
from pipecat_michi.engine.engine import DuplexEngine, EngineSession, InjectResult, StepResult
from pipecat_michi.engine.settings import SessionSettingsUpdate


class LocalCall:
    """``DuplexCall`` over an in-process ``EngineSession``."""

    def __init__(self, session: EngineSession, engine: DuplexEngine) -> None:
        self._session = session
        self.session_id = session.session_id
        self.frame_samples = engine.frame_samples
        self.sample_rate_hz = engine.sample_rate_hz

    @property
    def session(self) -> EngineSession:
        return self._session

    async def send_audio(self, pcm: np.ndarray, frame_index: int | None = None) -> None:
        self._session.push_audio(pcm, frame_index)

    async def receive(self, timeout: float | None = None) -> StepResult:
        return await self._session.receive(timeout)

    async def inject_text(self, text: str, role: str = "system", pinned: bool = False) -> InjectResult:
        return await self._session.inject_text(text, role, pinned)

    async def update_settings(self, update: SessionSettingsUpdate) -> None:
        self._session.update_settings(update)

    async def reset(self) -> None:
        await self._session.reset()

    async def close(self) -> None:
        await self._session.close()


class LocalEngine:
    """The embedded default: a ``DuplexEngine`` in this process (the demo checkpoint on CPU unless told).

    Started on the first call, shared by every call of the process.

    Args:
        config: What engine to build (ignored when ``engine`` is given); ``None`` loads the demo
            checkpoint (``EngineConfig(checkpoint="demo")``).
        engine: An engine to use instead.
        open_timeout_s: Limit on opening one call once the engine runs (the system prompt's prefill).
        load_timeout_s: Limit on ``start()``, the model load (and the step's compilation when
            configured), whether at a server's startup or on the first call. Generous: the first
            load of a GGUF backbone converts it (about 30 s on an idle CPU core, several times that
            on a busy 2-core machine), and compiling the step on a small CPU takes minutes; later
            loads read the converted copy.
    """

    def __init__(
        self,
        config: EngineConfig | None = None,
        engine: DuplexEngine | None = None,
        *,
        open_timeout_s: float = 60.0,
        load_timeout_s: float = 600.0,
    ) -> None:
        # No config: the demo checkpoint, so the embedded default speaks trained weights.
        self.engine = engine or DuplexEngine(config or EngineConfig(checkpoint="demo"))
        self._open_timeout_s = open_timeout_s
        self.load_timeout_s = load_timeout_s

    async def start(self) -> None:
        """Load the model now (a server's startup), so the first caller does not wait for it."""
        async with asyncio.timeout(self.load_timeout_s):
            await self.engine.start()

    async def open_call(
        self,
        settings: SessionSettingsUpdate | None = None,
        system_prompt: str | None = None,
        voice_prompt: np.ndarray | None = None,
    ) -> LocalCall:
        # The model load is not the call's: a first call waits for it under the load limit (a
        # compiled step takes minutes on a small CPU), then opens under its own.
        await self.start()
        async with asyncio.timeout(self._open_timeout_s):
            session = await self.engine.open_session(settings, system_prompt, voice_prompt)
        return LocalCall(session, self.engine)

    async def close(self) -> None:
        await self.engine.stop()
