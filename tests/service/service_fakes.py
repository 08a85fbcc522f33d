"""Backends for the service tests: a scripted call (the edge cases) and a spy around a real one;
frames that each make exactly one model frame."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np
from pipecat.frames.frames import Frame, InputAudioRawFrame

from pipecat_michi.engine.call import DuplexBackend, DuplexCall
from pipecat_michi.engine.engine import InjectResult, SessionClosedError, StepResult
from pipecat_michi.engine.batch import ContextTooLongError
from pipecat_michi.engine.settings import SessionSettingsUpdate
from pipecat_michi.worker.client import WorkerConnectionError, WorkerUnavailableError

FRAME = 1920
RATE = 24000
_CLOSED = object()


@dataclass(frozen=True)
class Step:
    """One scripted step: what the model does on the frame it answers."""

    speaking: bool = False
    bot_text: str = ""
    transcript: str = ""


SILENT = Step()


@dataclass
class Injected:
    text: str
    role: str
    pinned: bool
    result: InjectResult


class ScriptedCall:
    """A ``DuplexCall`` that answers each frame sent with the next scripted step.

    ``die_after``: after that many steps, ``receive`` raises ``die_with`` (default: the worker died).
    ``refuse``: texts ``inject_text`` refuses as the engine does one too long for the context.
    """

    frame_samples = FRAME
    sample_rate_hz = RATE

    def __init__(
        self,
        script: list[Step] | None = None,
        die_after: int | None = None,
        refuse: set[str] | None = None,
        die_with: Exception | None = None,
    ) -> None:
        self.session_id = f"scripted{id(self):x}"
        self.script = list(script or [])
        self.die_after = die_after
        self.die_with = die_with or WorkerConnectionError(1006, "worker connection lost")
        self.refuse = refuse or set()
        self.sent: list[int | None] = []
        self.injected: list[Injected] = []
        self.updates: list[SessionSettingsUpdate] = []
        self.resets = 0
        self.closed = False
        self.delivered = 0
        self._kv = 0
        self._results: asyncio.Queue = asyncio.Queue()

    async def send_audio(self, pcm: np.ndarray, frame_index: int | None = None) -> None:
        if self.closed:
            raise SessionClosedError("closed")
        assert pcm.shape == (FRAME,) and pcm.dtype == np.int16
        index = len(self.sent)
        self.sent.append(frame_index)
        step = self.script[index] if index < len(self.script) else SILENT
        self._kv += 1
        audio = np.full(FRAME, 1000, dtype=np.int16) if step.speaking else None
        self._results.put_nowait(
            StepResult(
                frame_index=frame_index if frame_index is not None else index,
                filled=False,
                late=False,
                speaking=step.speaking,
                speak_prob=0.9 if step.speaking else 0.1,
                bot_text=step.bot_text,
                transcript=step.transcript,
                audio=audio,
                kv_length=self._kv,
            )
        )

    async def receive(self, timeout: float | None = None) -> StepResult:
        if self.die_after is not None and self.delivered >= self.die_after:
            raise self.die_with
        item = await asyncio.wait_for(self._results.get(), timeout)
        if item is _CLOSED:
            self._results.put_nowait(_CLOSED)
            raise SessionClosedError("closed")
        self.delivered += 1
        return item

    async def inject_text(self, text: str, role: str = "system", pinned: bool = False) -> InjectResult:
        if text in self.refuse:
            raise ContextTooLongError(f"{len(text)} tokens do not fit the context")
        self._kv += len(text)
        result = InjectResult(token_count=len(text), kv_length=self._kv)
        self.injected.append(Injected(text, role, pinned, result))
        return result

    async def update_settings(self, update: SessionSettingsUpdate) -> None:
        self.updates.append(update)

    async def reset(self) -> None:
        self.resets += 1

    async def close(self) -> None:
        self.closed = True
        self._results.put_nowait(_CLOSED)


class ScriptedBackend:
    """Opens the given calls in order; an exception in the list (or running out) fails the open."""

    def __init__(self, *calls: ScriptedCall | Exception) -> None:
        self.pending = list(calls)
        self.opened: list[ScriptedCall] = []
        self.prompts: list[str | None] = []
        self.settings: list[SessionSettingsUpdate | None] = []
        self.open_attempts = 0

    async def open_call(
        self,
        settings: SessionSettingsUpdate | None = None,
        system_prompt: str | None = None,
        voice_prompt: np.ndarray | None = None,
    ) -> ScriptedCall:
        self.open_attempts += 1
        if not self.pending:
            raise WorkerUnavailableError(None, "no worker took the call")
        call = self.pending.pop(0)
        if isinstance(call, Exception):
            raise call
        self.prompts.append(system_prompt)
        self.settings.append(settings)
        self.opened.append(call)
        return call

    async def close(self) -> None:
        pass


@dataclass
class SpyCall:
    """Wraps any ``DuplexCall``, recording what the service did with it and what it returned."""

    inner: DuplexCall
    steps: list[StepResult] = field(default_factory=list)
    injected: list[Injected] = field(default_factory=list)
    updates: list[SessionSettingsUpdate] = field(default_factory=list)
    resets: int = 0

    def __getattr__(self, name: str):  # session_id, frame_samples, sample_rate_hz, session
        return getattr(self.inner, name)

    async def send_audio(self, pcm: np.ndarray, frame_index: int | None = None) -> None:
        await self.inner.send_audio(pcm, frame_index)

    async def receive(self, timeout: float | None = None) -> StepResult:
        result = await self.inner.receive(timeout)
        self.steps.append(result)
        return result

    async def inject_text(self, text: str, role: str = "system", pinned: bool = False) -> InjectResult:
        result = await self.inner.inject_text(text, role, pinned)
        self.injected.append(Injected(text, role, pinned, result))
        return result

    async def update_settings(self, update: SessionSettingsUpdate) -> None:
        self.updates.append(update)
        await self.inner.update_settings(update)

    async def reset(self) -> None:
        self.resets += 1
        await self.inner.reset()

    async def close(self) -> None:
        await self.inner.close()


class SpyBackend:
    """Wraps any ``DuplexBackend``; ``calls`` are the ``SpyCall``s it opened."""

    def __init__(self, inner: DuplexBackend) -> None:
        self.inner = inner
        self.calls: list[SpyCall] = []

    async def open_call(
        self,
        settings: SessionSettingsUpdate | None = None,
        system_prompt: str | None = None,
        voice_prompt: np.ndarray | None = None,
    ) -> SpyCall:
        call = SpyCall(await self.inner.open_call(settings, system_prompt, voice_prompt))
        self.calls.append(call)
        return call

    async def close(self) -> None:
        pass  # the fixture owns the inner backend


def model_frames(count: int) -> list[Frame]:
    """Exactly one 24 kHz model frame each: one scripted step per frame."""
    return [InputAudioRawFrame(audio=bytes(FRAME * 2), sample_rate=RATE, num_channels=1) for _ in range(count)]
