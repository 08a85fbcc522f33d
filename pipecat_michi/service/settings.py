"""Settings of ``MichiLLMService``: the runtime-updatable ``MichiSettings`` and the ``MichiServiceParams`` tunables."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, Literal

from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
from pipecat.audio.resamplers.base_audio_resampler import SoxrQuality
from pipecat.services.settings import LLMSettings
from pipecat.utils.types import NOT_GIVEN, NotGiven, is_given
from pydantic import BaseModel, ConfigDict, Field

from pipecat_michi.engine.settings import SessionSettings, SessionSettingsUpdate
from pipecat_michi.service.audio import DEFAULT_QUALITY
from pipecat_michi.service.tools import ToolPromptFormat

#: What the bot does while a tool call runs: ``hold`` (its audio and text are held back until the
#: call's result is in or the call is cancelled) or ``filler`` (it goes on speaking, e.g. "let me
#: check").
ToolCallBehavior = Literal["hold", "filler"]


# LLMSettings already has temperature, top_k and seed; the other SessionSettings fields are
# added here, so a new session setting is declared once, in SessionSettings.
_LLM_FIELDS = {f.name for f in fields(LLMSettings)}
_MichiSessionFields = make_dataclass(
    "_MichiSessionFields",
    [
        (name, info.annotation | None | NotGiven, field(default_factory=lambda: NOT_GIVEN))
        for name, info in SessionSettings.model_fields.items()
        if name not in _LLM_FIELDS
    ],
    bases=(LLMSettings,),
)

#: The ``MichiSettings`` fields that are the call's ``SessionSettings``.
SESSION_FIELDS: tuple[str, ...] = tuple(SessionSettings.model_fields)


@dataclass
class MichiSettings(_MichiSessionFields):  # type: ignore[misc,valid-type]
    """Runtime-updatable settings of ``MichiLLMService``.

    Every ``SessionSettings`` field (``temperature``, ``top_k``, ``seed`` from ``LLMSettings``;
    ``flow_steps``, ``speak_threshold`` and any later one added from ``SessionSettings``) maps
    onto the call's settings and changes live with an
    ``LLMUpdateSettingsFrame(delta=MichiSettings(...))``; ``None`` leaves the model's default
    (a checkpoint's calibrated ``speak_threshold`` and ``speak_onset_frames``). A new ``system_instruction`` is injected
    into the running call as a system turn. The other ``LLMSettings`` fields (``max_tokens``,
    ``top_p``, penalties) do not apply to a duplex model and are ``None``.

    Function calling (``docs/function_calling.md``): ``tools`` are the tools the model may call
    when the ``LLMContext`` has none of its own; ``tool_call_behavior`` is what the bot does while
    a call runs. A change of either applies to the live call.
    """

    tools: ToolsSchema | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    tool_call_behavior: ToolCallBehavior | NotGiven = field(default_factory=lambda: NOT_GIVEN)

    @classmethod
    def initial(cls, system_instruction: str | None) -> MichiSettings:
        """Every field set, as Pipecat requires: session fields ``None`` (the model's defaults)."""
        return cls(
            model="michi",
            system_instruction=system_instruction,
            max_tokens=None,
            top_p=None,
            frequency_penalty=None,
            presence_penalty=None,
            filter_incomplete_user_turns=False,
            user_turn_completion_config=None,
            use_provider_thinking_default=False,
            tools=None,
            tool_call_behavior="hold",
            **dict.fromkeys(SESSION_FIELDS),
        )

    def session_update(self, changed: Iterable[str] | None = None) -> SessionSettingsUpdate:
        """These settings as the call's ``SessionSettingsUpdate``. Raises ``ValueError`` when invalid.

        ``changed`` ``None`` (opening a call): every field that is set; the rest take the
        model's defaults. ``changed`` names (a live update): those fields, where ``None`` keeps
        the call's value, except for ``seed``: ``None`` draws a new one. Validated in lax mode,
        as ``LLMSettings`` values may be ``1`` for ``1.0``; the wire's strictness is the worker
        protocol's business.
        """
        values: dict[str, Any] = {}
        for name in SESSION_FIELDS if changed is None else changed:
            value = getattr(self, name)
            if is_given(value) and (value is not None or (changed is not None and name == "seed")):
                values[name] = value
        return SessionSettingsUpdate.model_validate(values, strict=False)


class MichiServiceParams(BaseModel):
    """Tunables of ``MichiLLMService`` (timings in frames are of the call's 80 ms frames).

    Parameters:
        user_turn_gap_frames: Frames without new transcript text that end the user's turn.
        barge_in_window_frames: The model yielding the floor counts as a barge-in when the user
            was heard within this many frames of it.
        text_lead_frames: Bot text produced while silent is kept for this many frames and
            spoken with the next turn (inner-monologue text may lead its audio); older is dropped.
        step_timeout_s: No step this long while frames are outstanding means the backend is lost.
        inject_timeout_s: Limit on one context injection.
        drain_timeout_s: On ``EndFrame``, how long to wait for the steps of frames already sent.
        close_timeout_s: Limit on closing a call.
        max_held_frames: Caller frames held back while a pinned prompt is prefilled.
        resampler_quality: soxr quality of the input and output resamplers; see
            ``pipecat_michi.service.audio.DEFAULT_QUALITY`` for the latency each costs.
        tool_prompt_format: How tools are written into the prompt: ``hermes`` for subword
            backbones (SmolLM2), ``compact`` for the byte tokenizer's small context.
        max_tool_call_frames: A tool call still open after this many frames is reported to the
            model as unterminated, so a call the model never closes cannot silence the bot.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    user_turn_gap_frames: int = Field(default=7, ge=1)
    barge_in_window_frames: int = Field(default=3, ge=1)
    text_lead_frames: int = Field(default=4, ge=0)
    step_timeout_s: float = Field(default=5.0, gt=0)
    inject_timeout_s: float = Field(default=10.0, gt=0)
    drain_timeout_s: float = Field(default=2.0, ge=0)
    close_timeout_s: float = Field(default=5.0, gt=0)
    max_held_frames: int = Field(default=25, ge=1)
    resampler_quality: SoxrQuality = DEFAULT_QUALITY
    tool_prompt_format: ToolPromptFormat = "hermes"
    max_tool_call_frames: int = Field(default=50, ge=1)
