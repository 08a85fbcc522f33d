"""The Python client of a MichiAI worker: ``RemoteWorker`` (a ``DuplexBackend``) opens
``RemoteCall``s (``DuplexCall``s) over the WebSocket protocol of ``docs/protocol.md``.

``MichiLLMService`` uses it exactly as it uses the in-process ``LocalEngine``. Each call owns
one background reader task that routes the worker's messages: STEPs to a bounded queue (oldest
dropped, counted, when the caller does not keep up), ``injected``/``error`` answers to the
waiting ``inject_text``, and the end of the connection to every waiter as a
``WorkerConnectionError``, so nothing ever waits on a dead socket. Over 400 lines: the call's
reader, its answer routing and the handshake share one connection state machine, kept together.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
import weakref
from collections.abc import Sequence
from typing import Final

import numpy as np
from loguru import logger
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.uri import parse_uri

from pipecat_michi.contract import FrameOrderError, InjectResult, SessionClosedError, SessionIdleError, StepResult
from pipecat_michi.engine.settings import SessionSettingsUpdate
from pipecat_michi.pcm import float_to_pcm16
from pipecat_michi.worker.retry import RetryPolicy
from pipecat_michi.worker.protocol import (
    DEFAULT_FRAME_SAMPLES,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    AudioFrame,
    CloseCode,
    EndedMessage,
    EndMessage,
    ErrorMessage,
    HelloMessage,
    InjectedMessage,
    InjectTextMessage,
    ProtocolError,
    ReadyMessage,
    ResetMessage,
    StepMessage,
    UpdateSettingsMessage,
    WorkerMessage,
    decode_worker_message,
    encode_message,
    encode_voice_prompt,
    close_reason,
)

# Close codes after which another attempt (the next worker) may succeed.
_RETRYABLE_CODES: Final = frozenset(
    {
        CloseCode.GOING_AWAY,
        CloseCode.INTERNAL_ERROR,
        CloseCode.TRY_AGAIN_LATER,
        CloseCode.HANDSHAKE_TIMEOUT,
        1006,  # abnormal closure: the connection dropped
        1012,  # service restart
    }
)


class WorkerError(Exception):
    """Base of the client's errors; ``code`` is the protocol close/error code when there is one."""

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(message if code is None else f"{message} (code {code})")
        self.code = code
        self.message = message


class WorkerAuthError(WorkerError):
    """The worker refused the token (HTTP 403). Retrying, or another worker, will not help."""


class WorkerUnavailableError(WorkerError):
    """No worker took the call: unreachable, full (1013) or shutting down, on every attempt."""


class WorkerProtocolError(WorkerError):
    """The worker and this client do not understand each other (4001: another protocol
    version; 4000/4004: a message one side sent is invalid)."""


class WorkerConnectionError(WorkerError, SessionClosedError):
    """The call's connection is over: ``code`` and ``reason`` say why (the worker's fatal
    ``error`` message when it sent one, else the WebSocket close). Also a
    ``SessionClosedError``, so callers can treat local and remote calls alike."""

    code: int

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.reason = reason

    @classmethod
    def for_close(cls, code: int, reason: str) -> WorkerConnectionError:
        """The error for a call the worker ended with ``code``."""
        kind = WorkerIdleError if code == CloseCode.IDLE_TIMEOUT else cls
        return kind(code, reason)

    def copy(self) -> WorkerConnectionError:
        """A fresh instance to raise (one instance raised again and again piles up tracebacks)."""
        return type(self)(self.code, self.reason)


class WorkerIdleError(WorkerConnectionError, SessionIdleError):
    """The worker ended the call for want of client messages (close code 4003)."""


class _Retryable(Exception):
    """One attempt failed in a way another attempt (or worker) may not."""


class RemoteCall:
    """A call on a worker (``DuplexCall``). Made by ``RemoteWorker.open_call``.

    Attributes:
        session_id: The worker's id of the call (from ``ready``).
        frame_samples: Samples per audio frame, both directions.
        sample_rate_hz: 24000.
        slot: The worker's slot serving the call.
        dropped_steps: STEPs dropped because ``receive`` was not called fast enough.
    """

    def __init__(
        self,
        websocket: ClientConnection,
        ready: ReadyMessage,
        url: str,
        *,
        send_timeout_s: float,
        request_timeout_s: float,
        close_timeout_s: float,
        max_pending_steps: int,
    ) -> None:
        self._ws = websocket
        self.session_id = ready.session_id
        self.frame_samples = ready.frame_samples
        self.sample_rate_hz = ready.sample_rate_hz
        self.slot = ready.slot
        self.url = url
        self.dropped_steps = 0
        self._send_timeout_s = send_timeout_s
        self._request_timeout_s = request_timeout_s
        self._close_timeout_s = close_timeout_s
        self._steps: collections.deque[StepResult] = collections.deque()
        self._max_pending_steps = max_pending_steps
        self._steps_ready = asyncio.Event()
        self._pending: dict[str, asyncio.Future[InjectResult]] = {}
        self._next_frame_index = 0
        self._fatal: ErrorMessage | None = None
        self._ended: EndedMessage | None = None
        self._failure: WorkerConnectionError | None = None
        self._log = logger.bind(session=self.session_id[:8], worker=url)
        self._reader = asyncio.create_task(self._read(), name=f"michi-remote-call-{self.session_id[:8]}")

    @property
    def closed(self) -> bool:
        """Whether the connection is over (closed by either side)."""
        return self._failure is not None

    # --- DuplexCall --------------------------------------------------------------------------

    async def send_audio(self, pcm: np.ndarray, frame_index: int | None = None) -> None:
        """Send one frame: ``frame_samples`` int16 samples (float32 in [-1, 1] is converted).

        ``frame_index`` must increase; ``None`` takes the next one. Waits while the socket's
        write buffer is full (back-pressure), at most the send timeout.

        Raises:
            WorkerConnectionError: The call is over.
            FrameOrderError: ``frame_index`` did not increase.
            TimeoutError: The worker did not take the frame in time.
        """
        self._raise_if_over()
        index = self._next_frame_index if frame_index is None else frame_index
        if index < self._next_frame_index:
            raise FrameOrderError(f"frame index {index} after {self._next_frame_index - 1}: indices must increase")
        data = encode_message(AudioFrame(frame_index=index, pcm=_as_pcm16(pcm, self.frame_samples)))
        self._next_frame_index = index + 1
        await self._send(data)

    async def receive(self, timeout: float | None = None) -> StepResult:
        """The next step result, in frame order. Results that arrived before the connection
        ended are still returned; after them, ``WorkerConnectionError`` at once.

        Raises:
            WorkerConnectionError: The call is over and no result is left.
            TimeoutError: None arrived within ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            while not self._steps:
                self._raise_if_over()
                self._steps_ready.clear()
                await self._steps_ready.wait()
        return self._steps.popleft()

    async def inject_text(self, text: str, role: str = "system", pinned: bool = False) -> InjectResult:
        """Prefill ``text`` as a ``role`` turn into the call's context; returns when it is in.

        Raises:
            WorkerError: The worker refused it (for instance longer than the context).
            WorkerConnectionError: The call ended first.
            TimeoutError: No answer within the request timeout.
        """
        self._raise_if_over()
        request_id = uuid.uuid4().hex
        message = InjectTextMessage(text=text, role=role, pinned=pinned, request_id=request_id)
        answer: asyncio.Future[InjectResult] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = answer
        try:
            await self._send(encode_message(message))
            async with asyncio.timeout(self._request_timeout_s):
                return await answer
        finally:
            self._pending.pop(request_id, None)

    async def update_settings(self, update: SessionSettingsUpdate) -> None:
        """Change sampling settings from the worker's next step."""
        self._raise_if_over()
        await self._send(encode_message(UpdateSettingsMessage(session=update)))

    async def reset(self) -> None:
        """Forget the conversation (prompts and settings stay). Frame indexes continue."""
        self._raise_if_over()
        await self._send(encode_message(ResetMessage()))

    async def close(self) -> None:
        """End the call (``end``, wait briefly for ``ended``) and close the socket. Idempotent;
        results not yet received are discarded."""
        if self._failure is None:
            try:
                await self._send(encode_message(EndMessage()))
            except (WorkerError, TimeoutError):
                pass  # the connection is gone or stuck: closing below is all that is left
            await asyncio.wait([self._reader], timeout=self._close_timeout_s)
        self._fail(WorkerConnectionError(CloseCode.NORMAL, "the call was closed by this client"))
        self._steps.clear()
        if not self._reader.done():
            self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self._ws.close()

    # --- internals ---------------------------------------------------------------------------

    async def _send(self, data: bytes) -> None:
        try:
            async with asyncio.timeout(self._send_timeout_s):
                await self._ws.send(data)
        except TimeoutError:
            raise TimeoutError(
                f"the worker did not take a message within {self._send_timeout_s:g} s (its socket is "
                "full: the worker or the network is stalled)"
            ) from None
        except ConnectionClosed:
            # The reader turns the close into the call's failure; give it a moment to.
            await asyncio.wait([self._reader], timeout=self._close_timeout_s)
            self._raise_if_over()
            raise WorkerConnectionError(1006, "the connection closed while sending") from None

    def _raise_if_over(self) -> None:
        if self._failure is not None:
            raise self._failure.copy()

    async def _read(self) -> None:
        try:
            async for data in self._ws:
                try:
                    message = decode_worker_message(data, self.frame_samples)  # type: ignore[arg-type]
                except ProtocolError as exc:
                    self._log.warning(f"Bad message from the worker: {exc}")
                    self._fail(WorkerConnectionError(exc.code, f"bad message from the worker: {exc.message}"))
                    await self._ws.close(exc.code, close_reason(exc.message))
                    return
                self._route(message)
        except ConnectionClosed:
            pass
        finally:
            self._fail(self._connection_outcome())

    def _route(self, message: WorkerMessage) -> None:
        if isinstance(message, StepMessage):
            if len(self._steps) >= self._max_pending_steps:
                self._steps.popleft()
                self.dropped_steps += 1
            self._steps.append(_step_result(message))
            self._steps_ready.set()
        elif isinstance(message, InjectedMessage):
            self._answer(
                message.request_id, InjectResult(token_count=message.token_count, kv_length=message.kv_length)
            )
        elif isinstance(message, ErrorMessage):
            if message.fatal:
                self._fatal = message  # the close follows; its reason is a shortened copy
            elif message.request_id is not None and message.request_id in self._pending:
                self._answer(message.request_id, WorkerError(message.code, message.message))
            else:
                self._log.warning(f"Worker error ({message.code}): {message.message}")
        elif isinstance(message, EndedMessage):
            self._ended = message
        else:
            self._log.warning(f"Ignored an unexpected {message.type} from the worker")

    def _answer(self, request_id: str | None, outcome: InjectResult | WorkerError) -> None:
        future = self._pending.get(request_id) if request_id is not None else None
        if future is None or future.done():
            return  # its inject_text timed out and left
        if isinstance(outcome, WorkerError):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def _connection_outcome(self) -> WorkerConnectionError:
        code = self._ws.close_code if self._ws.close_code is not None else 1006
        if self._fatal is not None:
            return WorkerConnectionError.for_close(self._fatal.code, self._fatal.message)
        if self._ended is not None:
            return WorkerConnectionError.for_close(code, f"the worker ended the call: {self._ended.reason}")
        reason = self._ws.close_reason or "the connection closed"
        return WorkerConnectionError.for_close(code, reason)

    def _fail(self, failure: WorkerConnectionError) -> None:
        """The call is over: every current and future waiter gets ``failure``."""
        if self._failure is None:
            self._failure = failure
            if failure.code not in (CloseCode.NORMAL,):
                self._log.info(f"Call over: {failure}")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(self._failure.copy())
        self._steps_ready.set()


class RemoteWorker:
    """Opens calls on MichiAI workers (``DuplexBackend``).

    Args:
        url: The worker's call URL (``ws://host:8765/v1/call``), or several: each attempt
            takes the next, so a full or dead worker sends the call to the following one.
        token: The workers' bearer token.
        connect_timeout_s: Limit for the TCP + WebSocket handshake of one attempt.
        retry: When to try again after a pass over the URLs found none to take the call;
            the default's budget covers a worker restart.
        ready_timeout_s: Limit from ``hello`` to ``ready`` (prompt prefill on the worker).
        send_timeout_s: Limit on one send while the socket's buffer is full.
        request_timeout_s: Limit on an ``inject_text`` answer.
        close_timeout_s: How long ``close`` waits for the worker's ``ended``.
        max_pending_steps: Unread results a call keeps; beyond, the oldest are dropped.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        token: str,
        connect_timeout_s: float = 5.0,
        *,
        retry: RetryPolicy | None = None,
        ready_timeout_s: float = 60.0,
        send_timeout_s: float = 2.0,
        request_timeout_s: float = 60.0,
        close_timeout_s: float = 2.0,
        max_pending_steps: int = 50,
    ) -> None:
        self._urls = [url] if isinstance(url, str) else list(url)
        if not self._urls:
            raise ValueError("RemoteWorker needs at least one worker URL")
        for each in self._urls:
            try:
                parse_uri(each)
            except InvalidURI as exc:
                raise ValueError(f"not a WebSocket URL: {each!r} ({exc})") from None
        self._token = token
        self._connect_timeout_s = connect_timeout_s
        self._retry = retry or RetryPolicy()
        self._ready_timeout_s = ready_timeout_s
        self._call_options = {
            "send_timeout_s": send_timeout_s,
            "request_timeout_s": request_timeout_s,
            "close_timeout_s": close_timeout_s,
            "max_pending_steps": max_pending_steps,
        }
        self._next_url = 0
        self._calls: weakref.WeakSet[RemoteCall] = weakref.WeakSet()

    async def open_call(
        self,
        settings: SessionSettingsUpdate | None = None,
        system_prompt: str | None = None,
        voice_prompt: np.ndarray | None = None,
    ) -> RemoteCall:
        """Open a call on the first worker that takes it.

        Raises:
            WorkerAuthError: A worker refused the token (at once, no retry).
            WorkerProtocolError: A worker refused the protocol version or the hello.
            WorkerUnavailableError: Every attempt failed (unreachable, full, shutting down).
        """
        hello = encode_message(
            HelloMessage(
                protocol_version=PROTOCOL_VERSION,
                session=settings or SessionSettingsUpdate(),
                system_prompt=system_prompt,
                voice_prompt_pcm_b64=None if voice_prompt is None else encode_voice_prompt(_as_pcm16(voice_prompt)),
            )
        )
        failures: list[str] = []
        started = time.monotonic()
        pauses = self._retry.pauses()
        while True:
            for _ in self._urls:  # one pass, starting after the URL the last call took
                url = self._urls[self._next_url % len(self._urls)]
                self._next_url += 1
                try:
                    call = await self._open_on(url, hello)
                except _Retryable as exc:
                    logger.info(f"Worker {url} did not take the call: {exc}")
                    failures.append(f"{url}: {exc}")
                    continue
                self._calls.add(call)
                return call
            pause = next(pauses)
            if time.monotonic() - started + pause > self._retry.budget_s:
                break
            await asyncio.sleep(pause)
        raise WorkerUnavailableError(
            None,
            f"no worker took the call in {len(failures)} attempt(s) over {time.monotonic() - started:.1f} s; "
            "last: " + "; ".join(failures[-len(self._urls) :]),
        )

    async def close(self) -> None:
        """Close every call this backend opened and still open."""
        await asyncio.gather(*(call.close() for call in list(self._calls)), return_exceptions=True)

    async def _open_on(self, url: str, hello: bytes) -> RemoteCall:
        try:
            websocket = await connect(
                url,
                additional_headers={"Authorization": f"Bearer {self._token}"},
                max_size=MAX_MESSAGE_BYTES,
                compression=None,  # PCM does not compress
                open_timeout=self._connect_timeout_s,
                close_timeout=self._call_options["close_timeout_s"],
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise WorkerAuthError(
                    CloseCode.POLICY_VIOLATION, f"{url} refused the token (HTTP {status}): check the worker's token"
                ) from None
            raise _Retryable(f"HTTP {status} on the upgrade") from None
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise _Retryable(f"cannot connect: {exc!r}") from None
        try:
            return await self._handshake(websocket, url, hello)
        except BaseException:
            await websocket.close()
            raise

    async def _handshake(self, websocket: ClientConnection, url: str, hello: bytes) -> RemoteCall:
        try:
            await websocket.send(hello)
            async with asyncio.timeout(self._ready_timeout_s):
                data = await websocket.recv()
            answer = decode_worker_message(data, DEFAULT_FRAME_SAMPLES)  # type: ignore[arg-type]
        except TimeoutError:
            raise _Retryable(f"no ready within {self._ready_timeout_s:g} s") from None
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else 1006
            reason = exc.rcvd.reason if exc.rcvd is not None else "the connection dropped"
            _raise_refusal(url, code, reason or "closed before ready")
        except ProtocolError as exc:
            await websocket.close(exc.code, close_reason(exc.message))
            raise WorkerProtocolError(exc.code, f"{url} answered hello with a bad message: {exc.message}") from None
        if isinstance(answer, ErrorMessage):
            _raise_refusal(url, answer.code, answer.message)
        if not isinstance(answer, ReadyMessage):
            raise WorkerProtocolError(CloseCode.UNEXPECTED_MESSAGE, f"{url} answered hello with {answer.type}")
        call = RemoteCall(websocket, answer, url, **self._call_options)
        logger.bind(session=call.session_id[:8]).info(f"Call open on {url} (slot {answer.slot}/{answer.capacity})")
        return call


def _raise_refusal(url: str, code: int, message: str) -> None:
    if code in _RETRYABLE_CODES:
        raise _Retryable(f"refused with {code}: {message}")
    if code == CloseCode.POLICY_VIOLATION:
        raise WorkerAuthError(code, f"{url} refused the token: {message}")
    raise WorkerProtocolError(code, f"{url} refused the call: {message}")


def _step_result(step: StepMessage) -> StepResult:
    return StepResult(
        frame_index=step.frame_index,
        filled=step.filled_silence,
        late=step.late,
        speaking=step.speaking,
        speak_prob=step.speak_prob,
        bot_text=step.bot_text,
        transcript=step.transcript,
        audio=step.pcm,
        kv_length=None,  # the worker does not send it
    )


def _as_pcm16(pcm: np.ndarray, frame_samples: int | None = None) -> np.ndarray:
    """``pcm`` as 1-D int16: int16 as is, floats in [-1, 1] scaled."""
    if pcm.ndim != 1 or (frame_samples is not None and pcm.shape[0] != frame_samples):
        expected = f"{frame_samples} samples" if frame_samples is not None else "1-D samples"
        raise ValueError(f"an audio frame must be {expected}, got shape {pcm.shape}")
    if pcm.dtype == np.int16:
        return pcm
    if np.issubdtype(pcm.dtype, np.floating):
        return float_to_pcm16(pcm)
    raise ValueError(f"audio must be int16 or float samples, got {pcm.dtype}")
