"""The one retry policy for opening a call on a worker: jittered, capped exponential back-off
within a time budget that covers a worker restart.

``RemoteWorker`` is its only user: it knows which failures another attempt may cure (a worker
full, restarting or unreachable; not a wrong token) and which workers to try. Nothing wraps it
in a second loop: the service opens a call once per loss and gives up when that open fails.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RetryPolicy(BaseModel):
    """When to try opening a call again.

    Attempts go over the worker URLs in turn; a pass over all of them runs without pauses (a
    full or dead worker sends the call to the next at once), and before each later pass the
    client sleeps ``min(max_delay_s, first_delay_s * 2**n)``, jittered down by up to
    ``jitter`` of it (so that calls a restart dropped together do not come back together).
    No pass starts once ``budget_s`` has gone by since the first attempt: the default covers
    a worker restart (a cold start measured 2.7 s) several times over.

    Parameters:
        first_delay_s: Pause before the second pass.
        max_delay_s: Longest pause between passes.
        jitter: Fraction of each pause drawn at random (0: none, 1: anywhere in [0, pause]).
        budget_s: Time after which no new pass starts; 0 makes one pass.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    first_delay_s: float = Field(default=0.25, ge=0)
    max_delay_s: float = Field(default=2.0, ge=0)
    jitter: float = Field(default=0.5, ge=0, le=1)
    budget_s: float = Field(default=15.0, ge=0)

    @model_validator(mode="after")
    def _check_cap(self) -> RetryPolicy:
        if self.max_delay_s < self.first_delay_s:
            raise ValueError(f"max_delay_s ({self.max_delay_s}) is below first_delay_s ({self.first_delay_s})")
        return self

    @classmethod
    def once(cls) -> RetryPolicy:
        """One pass over the URLs, no retry (benchmarks, tests of a single refusal)."""
        return cls(budget_s=0)

    def pauses(self, rng: random.Random | None = None) -> Iterator[float]:
        """The pause before each pass after the first, forever; the caller checks the budget."""
        draw = rng or random.Random()
        delay = self.first_delay_s
        while True:
            yield delay * (1 - self.jitter * draw.random())
            delay = min(self.max_delay_s, delay * 2)
