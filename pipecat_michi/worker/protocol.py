"""Wire protocol between a MichiAI GPU worker and its clients, version ``PROTOCOL_VERSION``.

One WebSocket per call, binary messages only: a one-byte kind, then a payload.

- ``KIND_CONTROL``: UTF-8 JSON, one of the pydantic control messages below (both directions).
- ``KIND_AUDIO`` (client -> worker): one 80 ms frame of the user's PCM16 24 kHz audio.
- ``KIND_STEP`` (worker -> client): the model's output for one input frame.

This module is pure: encoding, decoding and validation, no I/O, so that the server and the
Python client share one definition. ``docs/protocol.md`` is the full specification (handshake,
flow rules, limits, close codes); keep the two in step. It is over 400 lines because it is the
whole wire format in one place (every message a documented pydantic model, the binary codecs
and the decoders' error mapping); splitting it would split one specification.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Callable
from enum import IntEnum
from typing import Annotated, Any, Final, Literal, Self, TypeVar

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from pipecat_michi.engine.settings import SessionSettingsUpdate

PROTOCOL_VERSION: Final = 1
CALL_PATH: Final = "/v1/call"

# The one named place for the call's audio format: protocol version 1 carries 24 kHz mono
# PCM16 in both directions (a model with another codec rate is refused when a worker starts).
# ``ready`` announces both; clients take the frame size from it.
SAMPLE_RATE_HZ: Final = 24_000
DEFAULT_FRAME_SAMPLES: Final = 1920
# Frames longer than a second make no sense for a full-duplex model; the bound keeps the
# largest STEP far below MAX_MESSAGE_BYTES.
MAX_FRAME_SAMPLES: Final = SAMPLE_RATE_HZ

KIND_CONTROL: Final = 0x01
KIND_AUDIO: Final = 0x02
KIND_STEP: Final = 0x03

MAX_TEXT_CHARS: Final = 32_768
MAX_ID_CHARS: Final = 256
MAX_VOICE_PROMPT_S: Final = 30
MAX_VOICE_PROMPT_BYTES: Final = MAX_VOICE_PROMPT_S * SAMPLE_RATE_HZ * 2
MAX_VOICE_PROMPT_B64_CHARS: Final = 4 * -(-MAX_VOICE_PROMPT_BYTES // 3)
# The largest message is a hello with a 30 s voice prompt (1.92 MB of base64) and a full
# system prompt (at most 4 UTF-8 bytes a character): 2 MiB holds both.
MAX_MESSAGE_BYTES: Final = 2 * 1024 * 1024
# How far a client may run ahead of the worker's clock, in frames (2 s); see docs/protocol.md.
MAX_BUFFERED_FRAMES: Final = 25

# RFC 6455: a close frame's payload is at most 125 bytes, 2 of them the code.
MAX_CLOSE_REASON_BYTES: Final = 123

HANDSHAKE_TIMEOUT_S: Final = 10.0
IDLE_TIMEOUT_S: Final = 30.0

_AUDIO_HEADER: Final = struct.Struct("<I")
_STEP_HEADER: Final = struct.Struct("<IBfHH")
_MAX_UINT16: Final = 0xFFFF
_MAX_UINT32: Final = 0xFFFF_FFFF
# ``frame_index`` is a uint32 on the wire; a call whose steps would pass it ends with 4004.
MAX_FRAME_INDEX: Final = _MAX_UINT32

STEP_FLAG_SPEAKING: Final = 0x01
STEP_FLAG_FILLED_SILENCE: Final = 0x02
STEP_FLAG_LATE: Final = 0x04
_STEP_FLAGS_KNOWN: Final = STEP_FLAG_SPEAKING | STEP_FLAG_FILLED_SILENCE | STEP_FLAG_LATE


class CloseCode(IntEnum):
    """WebSocket close codes of the protocol; ``error`` messages use the same numbers."""

    NORMAL = 1000
    """The call ended: the client sent ``end``, or the worker ended it after ``ended``."""
    GOING_AWAY = 1001
    """The worker is shutting down."""
    POLICY_VIOLATION = 1008
    """Missing or wrong bearer token; sent before accepting, so clients see HTTP 403."""
    MESSAGE_TOO_BIG = 1009
    """A message exceeded ``MAX_MESSAGE_BYTES``."""
    INTERNAL_ERROR = 1011
    """The worker failed; the call is lost, a new call may succeed."""
    TRY_AGAIN_LATER = 1013
    """The worker is full: a router should try another worker."""
    BAD_MESSAGE = 4000
    """Malformed message: unknown kind, wrong length, bad UTF-8 or JSON, failed validation."""
    UNSUPPORTED_VERSION = 4001
    """``hello.protocol_version`` is not one the worker speaks."""
    HANDSHAKE_TIMEOUT = 4002
    """No ``hello`` within ``HANDSHAKE_TIMEOUT_S`` of the upgrade."""
    IDLE_TIMEOUT = 4003
    """No message from the client for ``IDLE_TIMEOUT_S``."""
    UNEXPECTED_MESSAGE = 4004
    """A well-formed message at the wrong time: audio before ``ready``, a second ``hello``,
    a ``frame_index`` that does not increase."""


class ProtocolError(Exception):
    """A message broke the protocol; ``code`` is the close code the receiver should use."""

    def __init__(self, code: CloseCode, message: str) -> None:
        super().__init__(f"{code.name} ({code.value}): {message}")
        self.code = code
        self.message = message


def _check_utf8(text: str) -> str:
    # Python strings may hold lone surrogates, which UTF-8 cannot carry; fail at construction
    # rather than when the message is sent.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text is not valid Unicode: {exc.reason} at {exc.start}") from None
    return text


def _check_pcm16(pcm: np.ndarray) -> np.ndarray:
    if pcm.dtype != np.int16 or pcm.ndim != 1:
        raise ValueError(f"pcm must be a 1-D int16 array, got {pcm.ndim}-D {pcm.dtype}")
    return pcm


def _check_voice_prompt(b64: str) -> str:
    try:
        raw = base64.b64decode(b64, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"voice_prompt_pcm_b64 is not valid base64: {exc}") from None
    if not raw or len(raw) % 2:
        raise ValueError("voice_prompt_pcm_b64 must hold a whole, non-zero number of samples")
    if len(raw) > MAX_VOICE_PROMPT_BYTES:
        raise ValueError(f"voice prompt is over {MAX_VOICE_PROMPT_S} s at {SAMPLE_RATE_HZ} Hz")
    return b64


Text = Annotated[str, AfterValidator(_check_utf8)]
Identifier = Annotated[Text, Field(min_length=1, max_length=MAX_ID_CHARS)]
Pcm16 = Annotated[np.ndarray, AfterValidator(_check_pcm16)]
VoicePromptB64 = Annotated[
    str, Field(max_length=MAX_VOICE_PROMPT_B64_CHARS), AfterValidator(_check_voice_prompt)
]
FrameIndex = Annotated[int, Field(ge=0, le=_MAX_UINT32)]
# PROTOCOL_VERSION and nothing else: a StrictInt, because ``Literal[1]`` alone lets ``true`` and
# ``1.0`` through (they compare equal to 1), which the strict-types rule of the spec forbids.
# Another integer fails validation; the decoder reports that as UNSUPPORTED_VERSION.
ProtocolVersion = Annotated[StrictInt, Field(ge=PROTOCOL_VERSION, le=PROTOCOL_VERSION)]


# Strict: the wire has one spelling per value ("1" is not 1, 1 is not true). Frozen: a
# decoded message is a value, shared between tasks.
_WIRE_CONFIG = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class ControlMessage(BaseModel):
    """Base of the JSON control messages (``KIND_CONTROL``), told apart by ``type``."""

    model_config = _WIRE_CONFIG


# Client -> worker.


class HelloMessage(ControlMessage):
    """First message of a call: protocol version, settings and prompts.

    Parameters:
        protocol_version: Must equal ``PROTOCOL_VERSION``.
        session: Sampling settings of the call; absent fields take the model's defaults.
        system_prompt: Text prefilled (pinned) before the first frame.
        voice_prompt_pcm_b64: Base64 of a PCM16 LE mono 24 kHz reference clip (at most
            ``MAX_VOICE_PROMPT_S``) whose voice the model speaks with; see ``encode_voice_prompt``.
    """

    type: Literal["hello"] = "hello"
    # Required, so that absent never silently means "current".
    protocol_version: ProtocolVersion
    session: SessionSettingsUpdate = SessionSettingsUpdate()
    system_prompt: Annotated[Text, Field(max_length=MAX_TEXT_CHARS)] | None = None
    voice_prompt_pcm_b64: VoicePromptB64 | None = None

    def voice_prompt_pcm(self) -> np.ndarray | None:
        """The voice prompt as int16 samples, or ``None`` when there is none."""
        if self.voice_prompt_pcm_b64 is None:
            return None
        return np.frombuffer(base64.b64decode(self.voice_prompt_pcm_b64), dtype="<i2").astype(
            np.int16, copy=False
        )


class InjectTextMessage(ControlMessage):
    """Prefill text into the call's context between two frames; answered by ``injected``.

    Parameters:
        text: The text to inject.
        role: Whose text it is; the worker formats it accordingly.
        pinned: Keep it when the context window evicts old frames.
        request_id: Echoed in ``injected`` (or ``error``) to match the answer.
    """

    type: Literal["inject_text"] = "inject_text"
    text: Annotated[Text, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
    role: Literal["system", "user", "assistant", "tool", "document"]
    pinned: bool = False
    request_id: Identifier | None = None


class UpdateSettingsMessage(ControlMessage):
    """Change sampling settings from the next frame on."""

    type: Literal["update_settings"] = "update_settings"
    session: SessionSettingsUpdate


class ResetMessage(ControlMessage):
    """Forget the conversation: back to the state right after ``ready``."""

    type: Literal["reset"] = "reset"


class EndMessage(ControlMessage):
    """End the call; the worker answers ``ended`` and closes with 1000."""

    type: Literal["end"] = "end"


# Worker -> client.


class ReadyMessage(ControlMessage):
    """Answer to ``hello``: the call has a slot and audio may flow.

    Parameters:
        protocol_version: The version the worker speaks on this call.
        session_id: The worker's id of the call, for logs.
        frame_samples: Samples per audio frame, in both directions.
        sample_rate_hz: Sample rate of all audio, 24000 in version 1.
        slot: Index of the engine slot serving the call.
        capacity: Number of slots of the worker.
    """

    type: Literal["ready"] = "ready"
    protocol_version: ProtocolVersion
    session_id: Identifier
    frame_samples: Annotated[int, Field(ge=1, le=MAX_FRAME_SAMPLES)] = DEFAULT_FRAME_SAMPLES
    sample_rate_hz: Literal[24000] = SAMPLE_RATE_HZ
    slot: Annotated[int, Field(ge=0)]
    capacity: Annotated[int, Field(ge=1)]

    @model_validator(mode="after")
    def _check_slot(self) -> Self:
        if self.slot >= self.capacity:
            raise ValueError(f"slot {self.slot} is out of range for capacity {self.capacity}")
        return self


class InjectedMessage(ControlMessage):
    """Acknowledges an ``inject_text``: the text is in the context.

    Parameters:
        request_id: The ``request_id`` of the ``inject_text``.
        token_count: Tokens the text took.
        kv_length: Positions in the call's context after the injection.
    """

    type: Literal["injected"] = "injected"
    request_id: Identifier | None = None
    token_count: Annotated[int, Field(ge=0)]
    kv_length: Annotated[int, Field(ge=0)]


class ErrorMessage(ControlMessage):
    """Something went wrong. When ``fatal``, the worker closes with ``code`` right after.

    Parameters:
        code: A ``CloseCode`` value.
        message: What happened and what to do about it.
        fatal: Whether the call ends.
        request_id: The ``request_id`` of the message that failed, if it had one.
    """

    type: Literal["error"] = "error"
    code: Annotated[int, Field(ge=1000, le=4999)]
    message: Annotated[Text, Field(max_length=MAX_TEXT_CHARS)]
    fatal: bool
    request_id: Identifier | None = None


class EndedMessage(ControlMessage):
    """The call is over; the worker closes right after.

    Parameters:
        reason: ``"client_end"``, ``"idle_timeout"`` or ``"shutdown"``.
        frames: STEP messages the worker sent on the call.
    """

    type: Literal["ended"] = "ended"
    reason: Annotated[Text, Field(min_length=1, max_length=MAX_ID_CHARS)]
    frames: Annotated[int, Field(ge=0)]


ClientControlMessage = Annotated[
    HelloMessage | InjectTextMessage | UpdateSettingsMessage | ResetMessage | EndMessage,
    Field(discriminator="type"),
]
WorkerControlMessage = Annotated[
    ReadyMessage | InjectedMessage | ErrorMessage | EndedMessage,
    Field(discriminator="type"),
]
_CLIENT_CONTROL: TypeAdapter[ClientControlMessage] = TypeAdapter(ClientControlMessage)
_WORKER_CONTROL: TypeAdapter[WorkerControlMessage] = TypeAdapter(WorkerControlMessage)


class _VersionProbe(BaseModel):
    """Just enough of a ``hello``/``ready`` to tell a version mismatch from a bad message."""

    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["hello", "ready"]
    protocol_version: int


_VERSION_PROBE: TypeAdapter[_VersionProbe] = TypeAdapter(_VersionProbe)


# Binary messages.


class _BinaryMessage(BaseModel):
    model_config = ConfigDict(_WIRE_CONFIG, arbitrary_types_allowed=True)

    def __eq__(self, other: object) -> bool:
        # BaseModel's __eq__ compares arrays with ==, whose truth value is ambiguous.
        if type(other) is not type(self):
            return NotImplemented
        return all(
            np.array_equal(mine, theirs) if isinstance(mine, np.ndarray) else mine == theirs
            for mine, theirs in zip(self.__dict__.values(), other.__dict__.values(), strict=True)
        )


class AudioFrame(_BinaryMessage):
    """One frame of the user's audio (``KIND_AUDIO``).

    Parameters:
        frame_index: The client's frame counter: 0 for the first frame, then increasing.
        pcm: Exactly ``frame_samples`` int16 samples, mono 24 kHz. Decoded frames hold a
            read-only view of the message.
    """

    frame_index: FrameIndex
    pcm: Pcm16


class StepMessage(_BinaryMessage):
    """The model's output for one input frame (``KIND_STEP``).

    Parameters:
        frame_index: ``frame_index`` of the input frame this step consumed.
        speaking: The model emits audio this frame; then ``pcm`` is set.
        filled_silence: The input frame was missing and silence was used instead.
        late: The worker's tick for this step started after its deadline.
        speak_prob: The listening head's probability that the model should speak.
        bot_text: Text the model produced this frame (a piece of a word, often empty).
        transcript: Transcript of the user's frame (a piece of a word, often empty).
        pcm: ``frame_samples`` int16 samples of the model's voice, or ``None`` when silent.
    """

    frame_index: FrameIndex
    speaking: bool
    filled_silence: bool = False
    late: bool = False
    speak_prob: Annotated[float, Field(ge=0.0, le=1.0)]
    bot_text: Text = ""
    transcript: Text = ""
    pcm: Pcm16 | None = None

    @model_validator(mode="after")
    def _check_consistency(self) -> Self:
        if self.speaking != (self.pcm is not None):
            raise ValueError("pcm must be set exactly when speaking")
        for name in ("bot_text", "transcript"):
            if len(getattr(self, name).encode("utf-8")) > _MAX_UINT16:
                raise ValueError(f"{name} is longer than {_MAX_UINT16} UTF-8 bytes")
        return self


ClientMessage = (
    HelloMessage
    | InjectTextMessage
    | UpdateSettingsMessage
    | ResetMessage
    | EndMessage
    | AudioFrame
)
WorkerMessage = ReadyMessage | InjectedMessage | ErrorMessage | EndedMessage | StepMessage


def close_reason(message: str) -> str:
    """``message`` shortened to fit a WebSocket close reason (``MAX_CLOSE_REASON_BYTES`` of
    UTF-8), cut on a character boundary; the ``error`` message carries it whole."""
    encoded = message.encode("utf-8")
    if len(encoded) <= MAX_CLOSE_REASON_BYTES:
        return message
    return encoded[: MAX_CLOSE_REASON_BYTES - 3].decode("utf-8", errors="ignore") + "..."


def encode_voice_prompt(pcm: np.ndarray) -> str:
    """Base64 of int16 24 kHz samples, the form ``HelloMessage.voice_prompt_pcm_b64`` takes."""
    return base64.b64encode(_check_pcm16(pcm).astype("<i2", copy=False).tobytes()).decode("ascii")


def encode_message(message: ClientMessage | WorkerMessage) -> bytes:
    """Encode any message of either direction as one binary WebSocket message.

    Raises:
        ProtocolError: ``MESSAGE_TOO_BIG`` if the result would exceed ``MAX_MESSAGE_BYTES``
            (only a hello whose system prompt is mostly JSON-escaped characters can).
    """
    if isinstance(message, AudioFrame):
        data = (
            bytes((KIND_AUDIO,))
            + _AUDIO_HEADER.pack(message.frame_index)
            + message.pcm.astype("<i2", copy=False).tobytes()
        )
    elif isinstance(message, StepMessage):
        data = _encode_step(message)
    elif isinstance(message, ControlMessage):
        data = bytes((KIND_CONTROL,)) + message.model_dump_json().encode("utf-8")
    else:
        raise TypeError(f"not a protocol message: {type(message).__name__}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(
            CloseCode.MESSAGE_TOO_BIG,
            f"{type(message).__name__} encodes to {len(data)} bytes, over {MAX_MESSAGE_BYTES}",
        )
    return data


def decode_client_message(data: bytes, frame_samples: int) -> ClientMessage:
    """Decode a message the worker received.

    Args:
        data: The binary WebSocket message.
        frame_samples: Samples an audio frame must hold (the value sent in ``ready``).

    Raises:
        ProtocolError: For any input that is not a valid client message; nothing else.
    """
    return _decode(data, frame_samples, "client", KIND_AUDIO, _decode_audio, _CLIENT_CONTROL)


def decode_worker_message(data: bytes, frame_samples: int) -> WorkerMessage:
    """Decode a message the client received.

    Args:
        data: The binary WebSocket message.
        frame_samples: Samples a speaking STEP must hold. Before ``ready`` only control
            messages arrive, so ``DEFAULT_FRAME_SAMPLES`` does until then.

    Raises:
        ProtocolError: For any input that is not a valid worker message; nothing else.
    """
    return _decode(data, frame_samples, "worker", KIND_STEP, _decode_step, _WORKER_CONTROL)


_Message = TypeVar("_Message")


def _decode(
    data: bytes,
    frame_samples: int,
    sender: str,
    binary_kind: int,
    decode_binary: Callable[[memoryview, int], _Message],
    control: TypeAdapter[_Message],
) -> _Message:
    if not 1 <= frame_samples <= MAX_FRAME_SAMPLES:
        raise ValueError(f"frame_samples must be in [1, {MAX_FRAME_SAMPLES}], got {frame_samples}")
    if not isinstance(data, bytes):
        raise ProtocolError(
            CloseCode.BAD_MESSAGE, f"expected a binary WebSocket message, got {type(data).__name__}"
        )
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(
            CloseCode.MESSAGE_TOO_BIG, f"message of {len(data)} bytes is over {MAX_MESSAGE_BYTES}"
        )
    if not data:
        raise ProtocolError(CloseCode.BAD_MESSAGE, "empty message: the first byte must be its kind")
    kind, payload = data[0], memoryview(data)[1:]
    if kind == binary_kind:
        return decode_binary(payload, frame_samples)
    if kind == KIND_CONTROL:
        return _decode_control(payload, control)
    raise ProtocolError(
        CloseCode.BAD_MESSAGE,
        f"kind 0x{kind:02x} is not a {sender} message kind "
        f"(expected 0x{KIND_CONTROL:02x} or 0x{binary_kind:02x})",
    )


def _decode_audio(payload: memoryview, frame_samples: int) -> AudioFrame:
    expected = _AUDIO_HEADER.size + 2 * frame_samples
    if len(payload) != expected:
        raise ProtocolError(
            CloseCode.BAD_MESSAGE,
            f"audio payload must be {expected} bytes (uint32 frame_index + {frame_samples} "
            f"PCM16 samples), got {len(payload)}",
        )
    (frame_index,) = _AUDIO_HEADER.unpack_from(payload)
    pcm = _pcm_view(payload, _AUDIO_HEADER.size, frame_samples)
    return AudioFrame(frame_index=frame_index, pcm=pcm)


def _encode_step(step: StepMessage) -> bytes:
    bot_text = step.bot_text.encode("utf-8")
    transcript = step.transcript.encode("utf-8")
    flags = (
        (STEP_FLAG_SPEAKING if step.speaking else 0)
        | (STEP_FLAG_FILLED_SILENCE if step.filled_silence else 0)
        | (STEP_FLAG_LATE if step.late else 0)
    )
    header = _STEP_HEADER.pack(
        step.frame_index, flags, step.speak_prob, len(bot_text), len(transcript)
    )
    pcm = b"" if step.pcm is None else step.pcm.astype("<i2", copy=False).tobytes()
    return b"".join((bytes((KIND_STEP,)), header, bot_text, transcript, pcm))


def _decode_step(payload: memoryview, frame_samples: int) -> StepMessage:
    if len(payload) < _STEP_HEADER.size:
        raise ProtocolError(
            CloseCode.BAD_MESSAGE,
            f"step payload of {len(payload)} bytes is shorter than its "
            f"{_STEP_HEADER.size}-byte header",
        )
    frame_index, flags, speak_prob, bot_text_len, transcript_len = _STEP_HEADER.unpack_from(payload)
    if flags & ~_STEP_FLAGS_KNOWN:
        raise ProtocolError(CloseCode.BAD_MESSAGE, f"step flags 0x{flags:02x} set reserved bits")
    speaking = bool(flags & STEP_FLAG_SPEAKING)
    text_end = _STEP_HEADER.size + bot_text_len + transcript_len
    expected = text_end + (2 * frame_samples if speaking else 0)
    if len(payload) != expected:
        raise ProtocolError(
            CloseCode.BAD_MESSAGE,
            f"step payload must be {expected} bytes (header, {bot_text_len} + {transcript_len} "
            f"bytes of text, {frame_samples if speaking else 0} PCM16 samples), got {len(payload)}",
        )
    texts = payload[_STEP_HEADER.size : text_end]
    try:
        bot_text = str(texts[:bot_text_len], "utf-8")
        transcript = str(texts[bot_text_len:], "utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(
            CloseCode.BAD_MESSAGE, f"step text is not valid UTF-8: {exc.reason}"
        ) from None
    try:
        return StepMessage(
            frame_index=frame_index,
            speaking=speaking,
            filled_silence=bool(flags & STEP_FLAG_FILLED_SILENCE),
            late=bool(flags & STEP_FLAG_LATE),
            speak_prob=speak_prob,
            bot_text=bot_text,
            transcript=transcript,
            pcm=_pcm_view(payload, text_end, frame_samples) if speaking else None,
        )
    except ValidationError as exc:
        raise ProtocolError(CloseCode.BAD_MESSAGE, f"invalid step: {_summarize(exc)}") from None


def _pcm_view(payload: memoryview, offset: int, frame_samples: int) -> np.ndarray:
    # No copy on little-endian hosts; astype only converts on big-endian ones.
    return np.frombuffer(payload, dtype="<i2", count=frame_samples, offset=offset).astype(
        np.int16, copy=False
    )


def _decode_control(payload: memoryview, adapter: TypeAdapter[_Message]) -> _Message:
    # pydantic parses bytes, not memoryviews; the copy is fine for rare control messages.
    json_bytes = bytes(payload)
    try:
        return adapter.validate_json(json_bytes)
    except ValidationError as exc:
        _raise_if_unsupported_version(json_bytes)
        raise ProtocolError(
            CloseCode.BAD_MESSAGE, f"invalid control message: {_summarize(exc)}"
        ) from None


def _raise_if_unsupported_version(json_bytes: bytes) -> None:
    # A hello/ready of another version may not fit this version's schema at all; say which
    # it is rather than "bad message", so the peer knows to upgrade.
    try:
        probe = _VERSION_PROBE.validate_json(json_bytes)
    except ValidationError:
        return
    if probe.protocol_version != PROTOCOL_VERSION:
        raise ProtocolError(
            CloseCode.UNSUPPORTED_VERSION,
            f"protocol version {probe.protocol_version} is not supported; this side speaks "
            f"version {PROTOCOL_VERSION}",
        )


def _summarize(exc: ValidationError, max_errors: int = 3) -> str:
    # Without inputs: they can be megabytes of base64, and error messages end up in logs.
    errors: list[Any] = exc.errors(include_url=False, include_input=False)
    parts = [
        f"{'.'.join(map(str, e['loc'])) or '<message>'}: {e['msg']}" for e in errors[:max_errors]
    ]
    if len(errors) > max_errors:
        parts.append(f"and {len(errors) - max_errors} more")
    return "; ".join(parts)
