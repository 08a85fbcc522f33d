"""What makes a media stream trustworthy: a call the signed webhook saw, a token it handed out.

Twilio's media stream WebSocket itself carries no signature we can rely on behind every proxy,
so the signed ``POST /twiml`` answer hands the stream a short-lived HMAC token in
``<Stream><Parameter>``; Twilio echoes it in ``start.customParameters``. The token is bound to
the ``CallSid`` the webhook saw and expires; the registry of those calls is bounded and
forgets them, so neither a guessed ``callSid`` nor an old token opens a stream.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import Final

from fastapi import Request

CALL_SID_PATTERN: Final = re.compile(r"^CA[0-9a-f]{32}$")
ACCOUNT_SID_PATTERN: Final = re.compile(r"^AC[0-9a-f]{32}$")
STREAM_TOKEN_PARAMETER: Final = "michi_stream_token"


class BodyTooLargeError(Exception):
    """A request body over the limit (answer 413)."""


def valid_call_sid(value: object) -> bool:
    return isinstance(value, str) and CALL_SID_PATTERN.fullmatch(value) is not None


class StreamTokens:
    """HMAC-SHA256 tokens ``<expiry>.<hex mac>`` over ``<call sid>.<expiry>``.

    ``secret`` defaults to a random one per process: set it (``MICHI_STREAM_TOKEN_SECRET``)
    when several replicas sit behind one webhook URL.
    """

    def __init__(self, secret: bytes | None, ttl_s: float) -> None:
        self._secret = secret or secrets.token_bytes(32)
        self.ttl_s = ttl_s

    def _mac(self, call_sid: str, expires: int) -> str:
        return hmac.new(self._secret, f"{call_sid}.{expires}".encode(), hashlib.sha256).hexdigest()

    def issue(self, call_sid: str, now: float | None = None) -> str:
        expires = int((now if now is not None else time.time()) + self.ttl_s)
        return f"{expires}.{self._mac(call_sid, expires)}"

    def check(self, call_sid: str, token: object, now: float | None = None) -> str | None:
        """``None`` when ``token`` is valid for ``call_sid``, else why not (for the close reason)."""
        if not isinstance(token, str) or not token:
            return "no stream token"
        expires_text, _, mac = token.partition(".")
        if not expires_text.isdigit() or len(expires_text) > 12 or len(mac) != 64:
            return "malformed stream token"
        expires = int(expires_text)
        # Compare first, in constant time, so timing tells nothing about the MAC.
        if not hmac.compare_digest(mac.encode(), self._mac(call_sid, expires).encode()):
            return "invalid stream token"
        if expires < (now if now is not None else time.time()):
            return "expired stream token"
        return None


@dataclass
class _SeenCall:
    expires_at: float
    streaming: bool = False


class CallRegistry:
    """Calls the signed webhook answered: bounded (oldest forgotten first) and expiring.

    A stream may claim a call once; the call stays known (for the bot's hang-up) until
    ``forget``. Only calls in here are ever hung up through Twilio's API.
    """

    def __init__(self, max_calls: int, ttl_s: float) -> None:
        self._calls: collections.OrderedDict[str, _SeenCall] = collections.OrderedDict()
        self._max_calls = max_calls
        self._ttl_s = ttl_s

    def __len__(self) -> int:
        return len(self._calls)

    def _expire(self, now: float) -> None:
        # A full scan (at most max_calls): a long call streaming at the front must not keep
        # the expired ones behind it. Only signed webhooks and stream starts get here.
        for sid in [sid for sid, call in self._calls.items() if not call.streaming and call.expires_at < now]:
            del self._calls[sid]

    def saw(self, call_sid: str) -> None:
        now = time.monotonic()
        self._expire(now)
        if call_sid not in self._calls:
            while len(self._calls) >= self._max_calls:
                self._calls.popitem(last=False)  # oldest first; its stream, if any, runs on
            self._calls[call_sid] = _SeenCall(expires_at=now + self._ttl_s)

    def claim(self, call_sid: str) -> str | None:
        """Mark the call as streaming; ``None`` if it may stream, else why not."""
        now = time.monotonic()
        self._expire(now)
        call = self._calls.get(call_sid)
        if call is None or (not call.streaming and call.expires_at < now):
            return "unknown call: the signed webhook did not answer it"
        if call.streaming:
            return "this call already has a media stream"
        call.streaming = True
        return None

    def knows(self, call_sid: str) -> bool:
        return call_sid in self._calls

    def forget(self, call_sid: str) -> None:
        self._calls.pop(call_sid, None)


async def read_capped_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused (``BodyTooLargeError``) past ``max_bytes``: by its declared
    ``Content-Length`` before reading anything, and while reading a body without one."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit() or int(declared) > max_bytes:
            raise BodyTooLargeError(f"body of {declared} bytes is over {max_bytes}")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > max_bytes:
            raise BodyTooLargeError(f"body is over {max_bytes} bytes")
    return bytes(body)


def masked(value: str, keep: int = 4) -> str:
    """A phone number or identifier for the logs: its last ``keep`` characters only."""
    return "…" + value[-keep:] if len(value) > keep else "…"


def clipped(value: str, max_chars: int = 64) -> str:
    return value if len(value) <= max_chars else value[:max_chars] + f"… ({len(value)} chars)"
