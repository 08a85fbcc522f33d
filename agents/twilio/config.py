"""The Twilio agent's configuration, from the environment (``MICHI_`` prefix) or arguments."""

from __future__ import annotations

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agents.common import BackendSettings


class TwilioAgentConfig(BaseSettings):
    """Everything the phone bot needs. Missing or contradictory values fail at start-up.

    Backend settings nest under ``MICHI_BACKEND__`` (``MICHI_BACKEND__WORKER_URL``, ...).

    ``public_host`` is the host Twilio reaches (ngrok or your domain): the TwiML points the
    media stream at ``wss://{public_host}/ws`` and signatures are checked against
    ``https://{public_host}/twiml``. With ``twilio_auth_token`` set, every webhook must carry a
    valid ``X-Twilio-Signature``, and the bot hangs up the call itself when its pipeline ends.
    """

    model_config = SettingsConfigDict(env_prefix="MICHI_", env_nested_delimiter="__", extra="forbid")

    backend: BackendSettings = BackendSettings()
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    public_host: str | None = None
    twilio_account_sid: str | None = None
    twilio_auth_token: SecretStr | None = None
    # Override Twilio's REST API host (tests point it at a loopback stand-in).
    twilio_api_base_url: str | None = None
    validate_signatures: bool = True

    @model_validator(mode="after")
    def _check_twilio(self) -> TwilioAgentConfig:
        if self.validate_signatures and self.twilio_auth_token is not None and not self.public_host:
            raise ValueError("signature validation needs public_host (the host Twilio calls)")
        if bool(self.twilio_account_sid) != bool(self.twilio_auth_token):
            raise ValueError("set both twilio_account_sid and twilio_auth_token, or neither")
        return self

    @property
    def can_hang_up(self) -> bool:
        return self.twilio_auth_token is not None
