"""Settings of ``MichiLLMService``: the runtime-updatable ``MichiSettings`` and the ``MichiServiceParams`` tunables."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipecat.audio.resamplers.base_audio_resampler import SoxrQuality
from pipecat.services.settings import LLMSettings
from pipecat.utils.types import NOT_GIVEN, NotGiven
from pydantic import BaseModel, ConfigDict, Field

from pipecat_michi.service.audio import DEFAULT_QUALITY


@dataclass
class MichiSettings(LLMSettings):
    """Runtime-updatable settings of ``MichiLLMService``.

    ``temperature``, ``top_k`` and ``seed`` (from ``LLMSettings``) and ``flow_steps``,
    ``speak_threshold`` map onto the call's ``SessionSettings`` and change live with an
    ``LLMUpdateSettingsFrame(delta=MichiSettings(...))``. A new ``system_instruction`` is
    injected into the running call as a system turn. The other ``LLMSettings`` fields
    (``max_tokens``, ``top_p``, penalties) do not apply to a duplex model and are ``None``.

    Parameters:
        flow_steps: Euler steps of the flow-matching speaking head per frame.
        speak_threshold: Speak probability above which the model takes the turn.
    """

    flow_steps: int | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    speak_threshold: float | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)


class MichiServiceParams(BaseModel):
    """Tunables of ``MichiLLMService`` (timings in frames are of the call's 80 ms frames).

    Parameters:
        user_turn_gap_frames: Frames without new transcript text that end the user's turn.
        barge_in_window_frames: The model yielding the floor counts as a barge-in when the user
            was heard within this many frames of it.
        text_lead_frames: Bot text produced while silent is kept for this many frames and
            spoken with the next turn (inner-monologue text may lead its audio); older is dropped.
        step_timeout_s: No step this long while frames are outstanding means the backend is lost.
        open_timeout_s: Limit on opening a call (model load on the first local call included).
        inject_timeout_s: Limit on one context injection.
        drain_timeout_s: On ``EndFrame``, how long to wait for the steps of frames already sent.
        close_timeout_s: Limit on closing a call.
        reconnect_attempts: New calls tried after the backend is lost, before giving up.
        reconnect_backoff_s: Wait before the first attempt; doubled for each next one.
        max_held_frames: Caller frames held back while a pinned prompt is prefilled.
        resampler_quality: soxr quality of the input and output resamplers; see
            ``pipecat_michi.service.audio.DEFAULT_QUALITY`` for the latency each costs.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    user_turn_gap_frames: int = Field(default=7, ge=1)
    barge_in_window_frames: int = Field(default=3, ge=1)
    text_lead_frames: int = Field(default=4, ge=0)
    step_timeout_s: float = Field(default=5.0, gt=0)
    open_timeout_s: float = Field(default=60.0, gt=0)
    inject_timeout_s: float = Field(default=10.0, gt=0)
    drain_timeout_s: float = Field(default=2.0, ge=0)
    close_timeout_s: float = Field(default=5.0, gt=0)
    reconnect_attempts: int = Field(default=3, ge=0)
    reconnect_backoff_s: float = Field(default=0.5, ge=0)
    max_held_frames: int = Field(default=25, ge=1)
    resampler_quality: SoxrQuality = DEFAULT_QUALITY
