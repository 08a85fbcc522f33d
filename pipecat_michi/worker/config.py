"""The worker's configuration: ``WorkerConfig`` (environment ``MICHI_WORKER_*`` and flags), the
checks no served config may fail, and the flag-overrides helper ``michi-worker`` and
``michi-serve`` share."""

from __future__ import annotations

from typing import Any, Final

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipecat_michi.engine.config import EngineConfig
from pipecat_michi.serving import ServerLimits
from pipecat_michi.worker.protocol import HANDSHAKE_TIMEOUT_S, IDLE_TIMEOUT_S, MAX_MESSAGE_BYTES

# Per-call socket send buffer: ~16 STEPs with audio, about 1.3 s of speech (see WorkerConfig).
SEND_BUFFER_BYTES: Final = 64 * 1024
# Default bound on one call's length: a client streaming forever would hold its slot forever.
MAX_CALL_S: Final = 3600.0
# A token anyone could guess in a few thousand tries is no token: 16 characters at least.
MIN_TOKEN_CHARS: Final = 16


class WorkerConfigError(ValueError):
    """The worker's configuration cannot be served as given."""


class WorkerConfig(BaseSettings):
    """How a worker serves: address, auth, limits and its engine.

    Read from the environment with the prefix ``MICHI_WORKER_`` (``MICHI_WORKER_TOKEN``,
    ``MICHI_WORKER_PORT``, ...); nested engine settings use ``__``, for instance
    ``MICHI_WORKER_ENGINE__SLOT_CAPACITY=32``. Keyword arguments win over the environment.

    Parameters:
        host: Interface to bind; loopback unless told otherwise.
        port: TCP port.
        token: Bearer token every call and ``/v1/stats`` must present. ``None`` refuses to
            start unless ``allow_unauthenticated`` (or ``tenant_tokens`` are set).
        tenant_tokens: More accepted tokens, e.g. one per customer, each counted on its own by
            ``max_calls_per_token`` (``MICHI_WORKER_TENANT_TOKENS='["...", "..."]'``).
        allow_unauthenticated: Serve without a token (development on loopback only).
        engine: The engine's configuration (model, device, slots, clocks).
        handshake_timeout_s: Upgrade to ``hello``; then close 4002.
        idle_timeout_s: Silence from a client after ``ready``; then close 4003.
        max_message_bytes: Largest WebSocket message accepted; larger ones close with 1009.
        send_buffer_bytes: Kernel send buffer of each call's socket (Linux doubles it). Small on
            purpose: a call needs ~50 kB/s, and a client that stops reading should make the
            worker drop its oldest STEPs (it gets recent audio when it recovers) after about a
            second, not after the OS's autotuned megabytes of stale audio. ``None``: the OS's.
        max_call_s: Longest a call may last from ``ready``; then ``ended(max_duration)`` and
            close 1000. ``None``: no limit.
        max_calls_per_token: Calls one bearer token (``token`` or one of ``tenant_tokens``) may
            hold on this worker at once; one more gets a fatal ``error`` 1013 (the client tries
            another worker). ``None``: no limit beyond the slots.
        max_call_opens_per_minute: Calls one token may open per minute (a sliding window); more
            get 1013. Opening a call prefills prompts, which delays every other call's ticks.
        max_flow_steps: Most ``flow_steps`` a call may ask for: every call in the batch waits
            for the slowest one's flow head. More is refused with 4000.
        server: HTTP limits (header timeout, keep-alive, max connections) against slow clients.
    """

    model_config = SettingsConfigDict(
        env_prefix="MICHI_WORKER_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535)
    token: SecretStr | None = None
    tenant_tokens: list[SecretStr] = Field(default_factory=list)
    allow_unauthenticated: bool = False
    engine: EngineConfig = EngineConfig()
    handshake_timeout_s: float = Field(default=HANDSHAKE_TIMEOUT_S, gt=0)
    idle_timeout_s: float = Field(default=IDLE_TIMEOUT_S, gt=0)
    max_message_bytes: int = Field(default=MAX_MESSAGE_BYTES, ge=1024, le=MAX_MESSAGE_BYTES)
    send_buffer_bytes: int | None = Field(default=SEND_BUFFER_BYTES, ge=4096)
    max_call_s: float | None = Field(default=MAX_CALL_S, gt=0)
    max_calls_per_token: int | None = Field(default=None, ge=1)
    max_call_opens_per_minute: int | None = Field(default=120, ge=1)
    max_flow_steps: int = Field(default=4, ge=1)
    server: ServerLimits = ServerLimits()


def check_config(config: WorkerConfig) -> None:
    """Refuse a configuration no worker may serve.

    Raises:
        WorkerConfigError: No token and ``allow_unauthenticated`` is not set, or a token shorter
            than ``MIN_TOKEN_CHARS``.
    """
    if config.token is None and not config.tenant_tokens and not config.allow_unauthenticated:
        raise WorkerConfigError(
            "no token: set MICHI_WORKER_TOKEN (or --token), or allow unauthenticated calls for local "
            "development (--allow-unauthenticated, MICHI_WORKER_ALLOW_UNAUTHENTICATED=1)"
        )
    if config.token is not None and len(config.token.get_secret_value().strip()) < MIN_TOKEN_CHARS:
        raise WorkerConfigError(
            f"the token is shorter than {MIN_TOKEN_CHARS} characters: set a long random MICHI_WORKER_TOKEN "
            "(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    if any(len(secret.get_secret_value().strip()) < MIN_TOKEN_CHARS for secret in config.tenant_tokens):
        raise WorkerConfigError(
            f"a tenant token is shorter than {MIN_TOKEN_CHARS} characters: every one of "
            "MICHI_WORKER_TENANT_TOKENS must be long and random"
        )


def given_flags(**flags: Any) -> dict[str, Any]:
    """The command-line flags that were given (not ``None``): settings overrides, so that what
    is left out still comes from the environment."""
    return {name: value for name, value in flags.items() if value is not None}
