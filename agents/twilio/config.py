"""The Twilio agent's configuration, from the environment (``MICHI_`` prefix) or arguments."""

from __future__ import annotations

import ipaddress

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agents.common import BackendSettings
from pipecat_michi.serving import ServerLimits

# Twilio's webhook form is a few hundred bytes; 16 KiB leaves room for every documented field.
MAX_WEBHOOK_BODY_BYTES = 16 * 1024
# Media messages are ~300 bytes of JSON; the start message a few KiB with custom parameters.
MAX_STREAM_MESSAGE_BYTES = 64 * 1024


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class TwilioAgentConfig(BaseSettings):
    """Everything the phone bot needs. Missing or contradictory values fail at start-up.

    Backend settings nest under ``MICHI_BACKEND__`` (``MICHI_BACKEND__WORKER_URL``, ...).

    ``public_host`` is the host Twilio reaches (ngrok or your domain): the TwiML points the
    media stream at ``wss://{public_host}/ws`` and signatures are checked against
    ``https://{public_host}/twiml``. With ``twilio_auth_token`` set, every webhook must carry a
    valid ``X-Twilio-Signature``, and the bot hangs up calls the webhook answered itself (time
    limit, backend gone) through Twilio's REST API. Without it the agent only starts on a
    loopback address, or with ``insecure`` (anyone who reaches it can then place calls).

    Every media stream must carry the short-lived token the webhook's answer gave it
    (``stream_token_ttl_s``; ``stream_token_secret`` when several replicas share one webhook).
    """

    model_config = SettingsConfigDict(env_prefix="MICHI_", env_nested_delimiter="__", extra="forbid")

    backend: BackendSettings = BackendSettings()
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    public_host: str | None = None
    twilio_account_sid: str | None = Field(default=None, pattern=r"^AC[0-9a-f]{32}$")
    twilio_auth_token: SecretStr | None = None
    # Override Twilio's REST API host (tests point it at a loopback stand-in).
    twilio_api_base_url: str | None = None
    validate_signatures: bool = True
    insecure: bool = False
    stream_token_secret: SecretStr | None = None
    # From the webhook's answer to Twilio's stream start: seconds, not minutes.
    stream_token_ttl_s: float = Field(default=60.0, gt=0, le=3600)
    # Calls answered and not yet streaming that are remembered (oldest forgotten first).
    max_pending_calls: int = Field(default=1024, ge=1)
    max_webhook_body_bytes: int = Field(default=MAX_WEBHOOK_BODY_BYTES, ge=1024)
    # Twilio streams 20 ms of audio all the time; a stream silent this long is dead or fake.
    caller_silence_timeout_s: float = Field(default=10.0, gt=0)
    server: ServerLimits = ServerLimits(max_ws_message_bytes=MAX_STREAM_MESSAGE_BYTES)

    @model_validator(mode="after")
    def _check_twilio(self) -> TwilioAgentConfig:
        if self.validate_signatures and self.twilio_auth_token is not None and not self.public_host:
            raise ValueError("signature validation needs public_host (the host Twilio calls)")
        if bool(self.twilio_account_sid) != bool(self.twilio_auth_token):
            raise ValueError("set both twilio_account_sid and twilio_auth_token, or neither")
        if not self.checks_signatures and not self.insecure and not is_loopback(self.host):
            raise ValueError(
                f"no Twilio auth token (MICHI_TWILIO_AUTH_TOKEN) while listening on {self.host}: anyone could "
                "post to /twiml. Set the token, bind 127.0.0.1, or pass --insecure (MICHI_INSECURE=1)"
            )
        return self

    @property
    def checks_signatures(self) -> bool:
        return self.twilio_auth_token is not None and self.validate_signatures

    @property
    def can_hang_up(self) -> bool:
        return self.twilio_auth_token is not None
