"""Who may call a worker: bearer tokens compared in constant time, known by index only, and a
per-token rate of call opens."""

from __future__ import annotations

import collections
import hmac
import time
from typing import Final

from pydantic import SecretStr

_OPEN_RATE_WINDOW_S: Final = 60.0


class TokenAuth:
    """The worker's accepted tokens (``token`` then ``tenant_tokens``) and their open rates.

    Args:
        tokens: The accepted tokens; none means unauthenticated (checked by ``check_config``).
        max_opens_per_minute: Calls one token may open per minute; ``None``: no limit.
    """

    def __init__(self, tokens: list[SecretStr], max_opens_per_minute: int | None) -> None:
        self._tokens = [secret.get_secret_value().encode("utf-8") for secret in tokens]
        self._max_opens_per_minute = max_opens_per_minute
        # Per token id: monotonic times of its recent call opens.
        self._opens: dict[int, collections.deque[float]] = {}

    def token_id(self, authorization: str | None) -> int | None:
        """Which accepted token an ``Authorization`` header carries (0: ``token``, then the
        ``tenant_tokens`` in order), ``None`` for none. Tokens are known by this index only:
        the secret itself is never kept with a call, logged or counted under."""
        if not self._tokens:
            return 0  # allow_unauthenticated, checked at creation
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        guess = presented.strip().encode("utf-8")
        match = None
        # Constant time, and every token compared: the timing tells neither how much of a guess
        # matched nor which token it was closest to.
        for index, token in enumerate(self._tokens):
            if hmac.compare_digest(guess, token) and match is None:
                match = index
        return match

    def authorized(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header carries one of the worker's bearer tokens."""
        return self.token_id(authorization) is not None

    def may_open(self, token_id: int) -> bool:
        """Count one call open for ``token_id``; ``False`` when it is over its per-minute rate."""
        limit = self._max_opens_per_minute
        if limit is None:
            return True
        now = time.monotonic()
        opens = self._opens.setdefault(token_id, collections.deque(maxlen=limit))
        while opens and now - opens[0] > _OPEN_RATE_WINDOW_S:
            opens.popleft()
        if len(opens) >= limit:
            return False
        opens.append(now)
        return True
