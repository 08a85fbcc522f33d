"""Call supervision: one live duplex call behind a Pipecat service, kept open through failures.
(Just over 400 lines: open, send, inject and reconnect share the call's locks and state.)

``CallSupervisor`` opens the call (system prompt pinned, the known context replayed), frames and
sends the caller's audio, holds that audio back while pinned text is prefilled, injects context
messages, and reads the step results. It knows nothing of frames or turns: each step goes to
``on_step`` and the service makes frames of it.

Failures: when the call is lost (the connection drops, the backend ends the call, no step comes
for ``step_timeout_s``) it opens one new call, and when that open fails it reports the backend
unusable. It never retries an open itself: the backend owns that policy (``RemoteWorker``'s
``RetryPolicy``, whose budget covers a worker restart; a local engine has nothing to wait for),
so there is one schedule and no outer timeout cutting an attempt short. A call the backend ended
for idleness (``SessionIdleError``) is reopened only when the caller sends audio again.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable

import numpy as np
from loguru import logger
from pipecat.processors.aggregators.llm_context import LLMContext

from pipecat_michi.contract import DuplexBackend, DuplexCall, InjectResult, SessionClosedError, SessionIdleError, StepResult
from pipecat_michi.engine.settings import SessionSettingsUpdate
from pipecat_michi.service.audio import InputFramer
from pipecat_michi.service.context import ContextSync, Injection, is_pending_tool_result
from pipecat_michi.service.settings import MichiServiceParams
from pipecat_michi.worker.client import WorkerProtocolError
from pipecat_michi.worker.protocol import CloseCode

# Frames the engine dropped as late never get a step; past this many outstanding, forget old ones.
_MAX_TRACKED_SENDS = 64


class BackendStalledError(RuntimeError):
    """The backend took frames but returned no step for ``step_timeout_s``."""


def backend_lost(error: BaseException) -> bool:
    """Whether an injection failed because the call is gone, rather than refused.

    Both backends end a call with ``SessionClosedError`` (the remote's
    ``WorkerConnectionError`` is one); a dropped connection or a request left unanswered
    (``OSError``, ``TimeoutError``) means the same. Anything else is a refusal of that message.
    """
    return isinstance(error, (SessionClosedError, OSError, TimeoutError))


def prompt_refused(error: BaseException) -> bool:
    """Whether opening a call failed because the backend refused its prompts (too long for the
    KV window): ``ValueError`` (``ContextTooLongError``) locally, close 4000 from a worker."""
    if isinstance(error, WorkerProtocolError):
        return error.code == CloseCode.BAD_MESSAGE
    return isinstance(error, ValueError)


class CallSupervisor:
    """Owns one pipeline's duplex call: open, send, inject, receive, reconnect, close.

    The service runs ``run()`` as its receive task and reacts through the callbacks:

    - ``on_step(result, sent_time)``: a step of the live call (``sent_time``: when its frame was
      sent, ``None`` when unknown);
    - ``on_call_opened(call)``: a call is open and its context replayed;
    - ``on_call_lost()``: the live call failed (close the open turns) before a reconnect;
    - ``on_injected(result)``: a message was prefilled (usage metrics);
    - ``on_refused(injection, error)``: the backend refused a message (too long); it was skipped;
    - ``on_gave_up(message, error)``: opening a call failed; the service is unusable.

    Args:
        backend: Where calls run.
        params: Timeouts, held-frame bound, resampler quality.
        voice_prompt: Zero-shot voice of every call opened.
        session_settings: The settings a new call opens with, over the model's defaults (read at
            each open).
        system_prompt: The system prompt a new call pins (read at each open).
        name: The service's name, for logs.
    """

    def __init__(
        self,
        backend: DuplexBackend,
        params: MichiServiceParams,
        *,
        voice_prompt: np.ndarray | None,
        session_settings: Callable[[], SessionSettingsUpdate],
        system_prompt: Callable[[], str | None],
        on_step: Callable[[StepResult, float | None], Awaitable[None]],
        on_call_opened: Callable[[DuplexCall], Awaitable[None]],
        on_call_lost: Callable[[], Awaitable[None]],
        on_injected: Callable[[InjectResult], Awaitable[None]],
        on_refused: Callable[[Injection, Exception], Awaitable[None]],
        on_gave_up: Callable[[str, Exception], Awaitable[None]],
        name: str,
    ) -> None:
        self._backend = backend
        self._params = params
        self._voice_prompt = voice_prompt
        self._session_settings = session_settings
        self._system_prompt = system_prompt
        self._on_step = on_step
        self._on_call_opened = on_call_opened
        self._on_call_lost = on_call_lost
        self._on_injected = on_injected
        self._on_refused = on_refused
        self._on_gave_up = on_gave_up
        self._name = name

        self._call: DuplexCall | None = None
        self._ready = False  # opened and its context replayed
        self._call_lock = asyncio.Lock()  # opening, replaying and injecting: one at a time
        self._send_lock = asyncio.Lock()  # frame indices are given in send order
        self._closing = False
        self._gave_up = False
        self._failure: BaseException | None = None  # what lost the last call
        self._caller_audio = asyncio.Event()  # set by caller audio while no call is open

        self._context: LLMContext | None = None
        self._sync = ContextSync()
        self._unpinned_sent = False
        self._hold_audio = False
        self._held: collections.deque[np.ndarray] = collections.deque(maxlen=params.max_held_frames)

        self._framer: InputFramer | None = None
        self._next_index = 0
        self._last_result_index = -1
        self._sent_at: dict[int, float] = {}
        self._caught_up = asyncio.Event()
        self._caught_up.set()

    def __str__(self) -> str:
        return self._name

    @property
    def call(self) -> DuplexCall | None:
        """The live call, ``None`` between calls (before start, while reconnecting, after end)."""
        return self._call

    def record_own(self, role: str, text: str) -> None:
        """Text the call produced itself as a ``role`` turn: not injected when the context echoes it."""
        self._sync.record_own(role, text)

    def record_own_tool_call(self, tool_call_id: str) -> None:
        """A tool call the call wrote itself: its assistant message in the context is not injected."""
        self._sync.record_own_tool_call(tool_call_id)

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the first call; when that fails (the backend retried), give up."""
        self._closing = False
        try:
            await self.open()
        except Exception as e:
            await self._give_up(e)

    async def open(self) -> None:
        """Open a call, then replay the context known so far. Raises when either fails."""
        async with self._call_lock:
            prompt = self._system_prompt()
            unpinned_prompt: str | None = None
            # No timeout here: the backend bounds (and retries) its own attempts.
            try:
                call = await self._backend.open_call(self._session_settings(), prompt, self._voice_prompt)
            except Exception as e:
                if not prompt or not prompt_refused(e):
                    raise
                # A prompt longer than the KV window allows pinned (e.g. tools on the small
                # embedded demo model) must not turn into a reconnect loop: open without it,
                # then prefill it like any context system message (unpinned when it must be).
                logger.warning(f"{self}: the system prompt cannot open a call ({e}); opening without it")
                call = await self._backend.open_call(self._session_settings(), None, self._voice_prompt)
                unpinned_prompt = prompt
            self._call, self._ready = call, False
            self._framer = InputFramer(call.sample_rate_hz, call.frame_samples, self._params.resampler_quality)
            self._next_index, self._last_result_index = 0, -1
            self._sent_at.clear()
            self._caught_up.set()
            self._unpinned_sent = False
            self._sync.reset()
            if prompt:
                self._sync.record_own("system", prompt)
            try:
                if unpinned_prompt is not None:
                    await self._inject(call, Injection(role="system", text=unpinned_prompt))
                if self._context is not None:
                    await self._sync_context(call)
            except BaseException:
                self._call = None
                await self._close_quietly(call)
                raise
            self._ready = True
        logger.info(f"{self}: MichiAI call {call.session_id[:8]} open")
        await self._on_call_opened(call)

    async def drain(self) -> None:
        """Wait (up to ``drain_timeout_s``) for the steps of the frames already sent."""
        if self._call is None or not self._ready:
            return
        try:
            await asyncio.wait_for(self._caught_up.wait(), self._params.drain_timeout_s)
        except TimeoutError:
            logger.debug(f"{self}: ending without the last steps (drain timed out)")

    def stop_receiving(self) -> None:
        """From now on a failing call is not reconnected (the service is ending)."""
        self._closing = True

    async def close(self) -> None:
        """Close the live call, if any. Call ``stop_receiving`` (and end ``run``) first."""
        self._closing = True
        call, self._call, self._ready = self._call, None, False
        if call is not None:
            await self._close_quietly(call)

    # --- caller audio --------------------------------------------------------------------

    async def send_audio(self, audio: bytes, sample_rate: int, num_channels: int) -> None:
        """Frame a chunk of caller audio and send the frames it completes.

        With no call (starting, reconnecting, given up, closed for idleness) the caller's audio
        is lost; after an idle close it opens the next call.
        """
        call, framer = self._call, self._framer
        if call is None or not self._ready or framer is None:
            self._caller_audio.set()
            return
        for pcm in await framer.push(audio, sample_rate, num_channels):
            await self._send_frame(call, pcm)

    async def _send_frame(self, call: DuplexCall, pcm: np.ndarray) -> None:
        async with self._send_lock:
            if self._hold_audio:
                self._held.append(pcm)
                return
            await self._send_now(call, pcm)

    async def _release_audio(self, call: DuplexCall) -> None:
        async with self._send_lock:
            self._hold_audio = False
            while self._held:
                await self._send_now(call, self._held.popleft())

    async def _send_now(self, call: DuplexCall, pcm: np.ndarray) -> None:
        """Send one frame. Holds ``_send_lock``."""
        if self._call is not call:
            return
        index = self._next_index
        self._next_index += 1
        self._sent_at[index] = time.time()
        self._caught_up.clear()
        try:
            await call.send_audio(pcm, index)
        except Exception as e:
            logger.warning(f"{self}: sending audio failed: {e!r}")
            await self._drop_call(call, e)

    # --- context and settings ------------------------------------------------------------

    async def set_context(self, context: LLMContext) -> None:
        """Inject what of ``context`` the live call has not read (all of it on the next open)."""
        self._context = context
        async with self._call_lock:
            call = self._call
            if call is None or not self._ready:
                return  # replayed when the call (re)opens
            try:
                await self._sync_context(call)
            except Exception as e:
                logger.warning(f"{self}: context injection failed: {e!r}")
                await self._drop_call(call, e)

    async def inject(self, injection: Injection) -> None:
        """Inject one message into the live call (dropped when there is none)."""
        async with self._call_lock:
            call = self._call
            if call is None or not self._ready:
                return
            try:
                await self._inject(call, injection)
            except Exception as e:
                await self._drop_call(call, e)

    async def update_settings(self, update: SessionSettingsUpdate) -> None:
        """Change the live call's settings; without a call they apply at the next open."""
        call = self._call
        if call is None:
            return
        try:
            await asyncio.wait_for(call.update_settings(update), self._params.inject_timeout_s)
        except Exception as e:
            logger.warning(f"{self}: settings update did not reach the call ({e!r}); it applies on reconnect")

    async def _sync_context(self, call: DuplexCall) -> None:
        """Inject what of ``self._context`` the call has not read. Holds ``_call_lock``."""
        assert self._context is not None
        for fingerprint, message in self._sync.new_messages(self._context.messages):
            if is_pending_tool_result(message):
                # Its result replaces it in place: stop here and inject from it on once the
                # result is in, rather than read "IN_PROGRESS" and then a rewritten context.
                break
            injection = self._sync.take(message)
            if injection is not None:
                await self._inject(call, injection)
            self._sync.commit(fingerprint)

    async def _inject(self, call: DuplexCall, injection: Injection) -> None:
        """Prefill one message. Leading system text is pinned (kept through KV eviction) while
        no audio has entered the call; caller frames arriving meanwhile wait, in order.

        A message the backend refuses (too long for the KV window: ``ValueError`` locally, a
        ``WorkerError`` remotely) is reported and skipped, after one unpinned retry for pinned
        text; a lost backend (``backend_lost``) propagates.
        """
        async with self._send_lock:
            pinned = injection.role == "system" and self._next_index == 0 and not self._unpinned_sent
            self._hold_audio = pinned
        try:
            try:
                result = await self._inject_once(call, injection, pinned)
            except Exception as e:
                if backend_lost(e) or not pinned:
                    raise
                logger.warning(f"{self}: system text cannot be pinned ({e}); injecting it unpinned")
                pinned = False
                result = await self._inject_once(call, injection, pinned)
        except Exception as e:
            if backend_lost(e):
                raise
            await self._on_refused(injection, e)
            return
        finally:
            if self._hold_audio:
                await self._release_audio(call)
        self._unpinned_sent |= not pinned
        logger.debug(f"{self}: injected {result.token_count} tokens as {injection.role} (pinned={pinned})")
        await self._on_injected(result)

    async def _inject_once(self, call: DuplexCall, injection: Injection, pinned: bool) -> InjectResult:
        return await asyncio.wait_for(
            call.inject_text(injection.text, injection.role, pinned), self._params.inject_timeout_s
        )

    # --- receiving and reconnecting ------------------------------------------------------

    async def run(self) -> None:
        """The receive loop: steps to ``on_step``, and a new call when the call is lost."""
        while not self._closing and not self._gave_up:
            call = self._call
            if call is None:
                await self._reopen()
                continue
            try:
                result = await call.receive(timeout=self._params.step_timeout_s)
            except TimeoutError:
                if self._call is call and self._last_result_index < self._next_index - 1:
                    await self._drop_call(call, BackendStalledError(f"no step for {self._params.step_timeout_s} s"))
                continue
            except Exception as e:
                if self._closing:
                    return
                await self._drop_call(call, e)
                continue
            if self._call is call:
                await self._handle_step(result)

    async def _handle_step(self, result: StepResult) -> None:
        sent = self._sent_at.pop(result.frame_index, None)
        if len(self._sent_at) > _MAX_TRACKED_SENDS:
            for index in [i for i in self._sent_at if i < result.frame_index]:
                del self._sent_at[index]
        await self._on_step(result, sent)
        self._last_result_index = max(self._last_result_index, result.frame_index)
        if self._last_result_index >= self._next_index - 1:
            self._caught_up.set()

    async def _drop_call(self, call: DuplexCall, failure: BaseException) -> None:
        """Let go of a failed call: close its open turns, close it; the receive loop reopens."""
        if self._call is not call:
            return
        self._call, self._ready, self._failure = None, False, failure
        await self._on_call_lost()
        await self._close_quietly(call)

    async def _reopen(self) -> None:
        """Open a new call after a loss (after an idle close: once caller audio comes again)."""
        if isinstance(self._failure, SessionIdleError):
            logger.info(f"{self}: the backend closed the idle call; a new one opens when the caller speaks")
            self._caller_audio.clear()
            await self._caller_audio.wait()  # cancelled with the receive task at shutdown
        else:
            logger.warning(f"{self}: MichiAI backend lost ({self._failure!r}); opening a new call")
        try:
            await self.open()
        except Exception as e:
            await self._give_up(e)
            return
        logger.info(f"{self}: reconnected")

    async def _give_up(self, failure: Exception) -> None:
        """Opening a call failed after the backend's own retries: the service is unusable."""
        self._gave_up = True
        lost = f"the call was lost ({self._failure!r}) and " if self._failure is not None else ""
        await self._on_gave_up(f"MichiAI backend unavailable: {lost}opening a call failed: {failure!r}", failure)

    async def _close_quietly(self, call: DuplexCall) -> None:
        try:
            await asyncio.wait_for(call.close(), self._params.close_timeout_s)
        except Exception as e:
            logger.debug(f"{self}: closing call {call.session_id[:8]}: {e!r}")
