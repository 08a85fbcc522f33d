"""Per-call sampling settings: shared by the engine, the worker protocol and the service."""

from __future__ import annotations

from typing import Annotated, Any, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    create_model,
    model_serializer,
    model_validator,
)

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopK = Annotated[int, Field(ge=0, le=1000)]
FlowSteps = Annotated[int, Field(ge=1, le=32)]
FlowTemperature = Annotated[float, Field(ge=0.0, le=2.0)]
SpeakThreshold = Annotated[float, Field(gt=0.0, lt=1.0)]
SpeakOnsetFrames = Annotated[int, Field(ge=1, le=25)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]

# Strict: the wire has one spelling per value ("1" is not 1, 1 is not true). Frozen: a
# settings object is a value, shared between tasks.
_SETTINGS_CONFIG = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class SessionSettings(BaseModel):
    """Sampling settings of one call.

    Parameters:
        temperature: Sampling temperature of text tokens; 0 is greedy.
        top_k: Sample among the ``top_k`` likeliest tokens; 0 disables the cut.
        flow_steps: Euler steps of the flow-matching speaking head per frame.
        flow_temperature: Scale of the speaking head's starting noise, relative to the
            checkpoint's (``flow.noise_scale``): 1 samples the voice as trained, lower is
            steadier and plainer (0: the same latent for the same context), higher more varied.
        speak_threshold: Speak probability above which the model takes the turn.
        speak_onset_frames: Frames (80 ms each) in a row the speak probability must stay above
            ``speak_threshold`` before the model takes the turn: 1 takes it at once; more let
            the short pauses inside a caller's sentence pass, each frame adding 80 ms of delay.
        seed: Seed of the call's sampler; ``None`` draws one.
    """

    model_config = _SETTINGS_CONFIG

    temperature: Temperature = 0.8
    top_k: TopK = 50
    flow_steps: FlowSteps = 1
    flow_temperature: FlowTemperature = 1.0
    speak_threshold: SpeakThreshold = 0.5
    speak_onset_frames: SpeakOnsetFrames = 1
    seed: Seed | None = None

    def updated(self, update: SessionSettingsUpdate) -> SessionSettings:
        """Return these settings with the fields present in ``update`` replaced."""
        return self.model_copy(update=update.model_dump(exclude_unset=True))


def _optional_fields(schema: type[BaseModel]) -> dict[str, Any]:
    """``schema``'s fields, each optional with the same constraints: absent (or null) by default."""
    fields: dict[str, Any] = {}
    for name, info in schema.model_fields.items():
        kind = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
        fields[name] = (kind | None, None)
    return fields


class _PartialSettings(BaseModel):
    model_config = _SETTINGS_CONFIG

    @model_validator(mode="after")
    def _reject_null_for_required(self) -> Self:
        nullable = {n for n, f in SessionSettings.model_fields.items() if f.default is None}
        nulls = sorted(n for n in self.model_fields_set - nullable if getattr(self, n) is None)
        if nulls:
            raise ValueError(f"{', '.join(nulls)} cannot be null; leave a field out to keep it")
        return self

    @model_serializer(mode="wrap")
    def _dump_present_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Absent means "keep"; writing the unset fields as null would change their meaning.
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}


# SessionSettings' own fields, made optional: a new setting is declared once, in SessionSettings.
_SessionSettingsFields = create_model(
    "_SessionSettingsFields", __base__=_PartialSettings, **_optional_fields(SessionSettings)
)


class SessionSettingsUpdate(_SessionSettingsFields):  # type: ignore[misc,valid-type]
    """A partial ``SessionSettings``: only the fields present change.

    An absent field leaves the setting as it is (when opening a call: the model's default);
    ``null`` is accepted only where ``SessionSettings`` allows it (``seed``: draw a new one).
    """
