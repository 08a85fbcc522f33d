"""The worker wire protocol: round trips, malformed input, and a seeded fuzz loop."""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable

import numpy as np
import pytest
from pydantic import ValidationError

from pipecat_michi.engine.settings import SessionSettings, SessionSettingsUpdate
from pipecat_michi.worker.protocol import (
    DEFAULT_FRAME_SAMPLES,
    KIND_AUDIO,
    KIND_CONTROL,
    KIND_STEP,
    MAX_MESSAGE_BYTES,
    MAX_TEXT_CHARS,
    MAX_VOICE_PROMPT_BYTES,
    PROTOCOL_VERSION,
    AudioFrame,
    CloseCode,
    ControlMessage,
    EndedMessage,
    EndMessage,
    ErrorMessage,
    HelloMessage,
    InjectedMessage,
    InjectTextMessage,
    ProtocolError,
    ReadyMessage,
    ResetMessage,
    StepMessage,
    UpdateSettingsMessage,
    decode_client_message,
    decode_worker_message,
    encode_message,
    encode_voice_prompt,
)

FRAME = DEFAULT_FRAME_SAMPLES
Decoder = Callable[[bytes, int], object]


def _pcm(rng: np.random.Generator, samples: int = FRAME) -> np.ndarray:
    return rng.integers(-32768, 32768, size=samples, dtype=np.int16)


def _control(obj: object) -> bytes:
    return bytes((KIND_CONTROL,)) + json.dumps(obj).encode()


def _step_bytes(
    flags: int,
    speak_prob: float = 0.5,
    bot_text: bytes = b"",
    transcript: bytes = b"",
    pcm_samples: int = 0,
    frame_index: int = 0,
) -> bytes:
    header = struct.pack("<IBfHH", frame_index, flags, speak_prob, len(bot_text), len(transcript))
    return bytes((KIND_STEP,)) + header + bot_text + transcript + b"\x00\x00" * pcm_samples


def _expect_error(decoder: Decoder, data: bytes, code: CloseCode) -> None:
    with pytest.raises(ProtocolError) as info:
        decoder(data, FRAME)
    assert info.value.code is code, info.value


# Round trips.

_VOICE = encode_voice_prompt(np.arange(-200, 200, dtype=np.int16))

CLIENT_CONTROL = [
    HelloMessage(protocol_version=PROTOCOL_VERSION),
    HelloMessage(
        protocol_version=PROTOCOL_VERSION,
        session=SessionSettingsUpdate(
            temperature=0.0, top_k=0, flow_steps=4, speak_threshold=0.9, seed=7
        ),
        system_prompt="Tu es Michi. Réponds brièvement 🙂",
        voice_prompt_pcm_b64=_VOICE,
    ),
    InjectTextMessage(text="Paris is the capital.", role="document", pinned=True, request_id="r1"),
    InjectTextMessage(text="{}", role="tool"),
    UpdateSettingsMessage(session=SessionSettingsUpdate(temperature=1.2)),
    UpdateSettingsMessage(session=SessionSettingsUpdate(seed=None)),
    ResetMessage(),
    EndMessage(),
]
WORKER_CONTROL = [
    ReadyMessage(protocol_version=PROTOCOL_VERSION, session_id="c-1", slot=3, capacity=4),
    ReadyMessage(
        protocol_version=PROTOCOL_VERSION, session_id="c-2", frame_samples=960, slot=0, capacity=1
    ),
    InjectedMessage(request_id="r1", token_count=12, kv_length=340),
    InjectedMessage(token_count=0, kv_length=0),
    ErrorMessage(code=CloseCode.TRY_AGAIN_LATER, message="worker full", fatal=True),
    ErrorMessage(code=4000, message="text too long", fatal=False, request_id="r2"),
    EndedMessage(reason="client_end", frames=125),
]


@pytest.mark.parametrize("message", CLIENT_CONTROL, ids=lambda m: m.type)
def test_client_control_round_trip(message: ControlMessage) -> None:
    data = encode_message(message)
    assert data[0] == KIND_CONTROL
    assert decode_client_message(data, FRAME) == message


@pytest.mark.parametrize("message", WORKER_CONTROL, ids=lambda m: m.type)
def test_worker_control_round_trip(message: ControlMessage) -> None:
    assert decode_worker_message(encode_message(message), FRAME) == message


def test_update_settings_keeps_absent_fields_and_accepts_null_seed() -> None:
    settings = SessionSettings(temperature=0.3, seed=9)
    for message in CLIENT_CONTROL:
        if isinstance(message, UpdateSettingsMessage):
            decoded = decode_client_message(encode_message(message), FRAME)
            assert isinstance(decoded, UpdateSettingsMessage)
            settings = settings.updated(decoded.session)
    assert settings == SessionSettings(temperature=1.2, seed=None)


def test_settings_update_sends_only_present_fields() -> None:
    update = UpdateSettingsMessage(session=SessionSettingsUpdate(top_k=5, seed=None))
    sent = json.loads(encode_message(update)[1:])
    assert sent == {"type": "update_settings", "session": {"top_k": 5, "seed": None}}


def test_settings_update_mirrors_settings() -> None:
    assert SessionSettingsUpdate.model_fields.keys() == SessionSettings.model_fields.keys()


def test_voice_prompt_round_trip() -> None:
    pcm = _pcm(np.random.default_rng(0), 24_000 * 3)
    hello = HelloMessage(
        protocol_version=PROTOCOL_VERSION, voice_prompt_pcm_b64=encode_voice_prompt(pcm)
    )
    decoded = decode_client_message(encode_message(hello), FRAME)
    assert isinstance(decoded, HelloMessage)
    np.testing.assert_array_equal(decoded.voice_prompt_pcm(), pcm)
    assert HelloMessage(protocol_version=PROTOCOL_VERSION).voice_prompt_pcm() is None


@pytest.mark.parametrize("frame_samples", [FRAME, 1, 960])
def test_audio_round_trip(frame_samples: int) -> None:
    frame = AudioFrame(frame_index=0xFFFF_FFFF, pcm=_pcm(np.random.default_rng(1), frame_samples))
    data = encode_message(frame)
    assert data[0] == KIND_AUDIO
    assert len(data) == 1 + 4 + 2 * frame_samples
    assert data[1:5] == b"\xff\xff\xff\xff"
    decoded = decode_client_message(data, frame_samples)
    assert decoded == frame
    assert isinstance(decoded, AudioFrame) and decoded.pcm.dtype == np.int16


def test_audio_is_little_endian_on_the_wire() -> None:
    data = encode_message(AudioFrame(frame_index=1, pcm=np.array([1, -2], dtype=np.int16)))
    assert data == b"\x02\x01\x00\x00\x00\x01\x00\xfe\xff"


@pytest.mark.parametrize("speaking", [False, True])
@pytest.mark.parametrize("filled_silence", [False, True])
@pytest.mark.parametrize("late", [False, True])
def test_step_round_trip(speaking: bool, filled_silence: bool, late: bool) -> None:
    step = StepMessage(
        frame_index=41,
        speaking=speaking,
        filled_silence=filled_silence,
        late=late,
        speak_prob=0.75,  # exact in float32, so == holds after the trip
        bot_text="Bonjour ",
        transcript="こんにちは",
        pcm=_pcm(np.random.default_rng(2)) if speaking else None,
    )
    data = encode_message(step)
    assert data[0] == KIND_STEP
    assert data[5] == speaking | filled_silence << 1 | late << 2
    assert decode_worker_message(data, FRAME) == step


def test_step_layout() -> None:
    step = StepMessage(frame_index=2, speaking=False, speak_prob=0.5, bot_text="a", transcript="bc")
    assert encode_message(step) == _step_bytes(0, 0.5, b"a", b"bc", frame_index=2)


def test_step_speak_prob_is_float32() -> None:
    step = StepMessage(frame_index=0, speaking=False, speak_prob=0.1)
    decoded = decode_worker_message(encode_message(step), FRAME)
    assert isinstance(decoded, StepMessage)
    assert decoded.speak_prob == pytest.approx(0.1, abs=1e-7)


def test_largest_hello_fits() -> None:
    hello = HelloMessage(
        protocol_version=PROTOCOL_VERSION,
        system_prompt="🙂" * MAX_TEXT_CHARS,
        voice_prompt_pcm_b64=encode_voice_prompt(np.zeros(MAX_VOICE_PROMPT_BYTES // 2, np.int16)),
    )
    data = encode_message(hello)
    assert len(data) <= MAX_MESSAGE_BYTES
    assert decode_client_message(data, FRAME) == hello


def test_encode_refuses_what_the_peer_would_refuse() -> None:
    # Control characters take 6 JSON bytes each: only such a prompt can overflow the limit.
    hello = HelloMessage(
        protocol_version=PROTOCOL_VERSION,
        system_prompt="\x00" * MAX_TEXT_CHARS,
        voice_prompt_pcm_b64=encode_voice_prompt(np.zeros(MAX_VOICE_PROMPT_BYTES // 2, np.int16)),
    )
    with pytest.raises(ProtocolError) as info:
        encode_message(hello)
    assert info.value.code is CloseCode.MESSAGE_TOO_BIG


# Models refuse what the wire cannot carry.


@pytest.mark.parametrize(
    "build",
    [
        lambda: AudioFrame(frame_index=0, pcm=np.zeros(FRAME, np.float32)),
        lambda: AudioFrame(frame_index=0, pcm=np.zeros((2, FRAME), np.int16)),
        lambda: AudioFrame(frame_index=-1, pcm=np.zeros(FRAME, np.int16)),
        lambda: AudioFrame(frame_index=2**32, pcm=np.zeros(FRAME, np.int16)),
        lambda: StepMessage(frame_index=0, speaking=True, speak_prob=0.5),
        lambda: StepMessage(
            frame_index=0, speaking=False, speak_prob=0.5, pcm=np.zeros(FRAME, np.int16)
        ),
        lambda: StepMessage(frame_index=0, speaking=False, speak_prob=float("nan")),
        lambda: StepMessage(frame_index=0, speaking=False, speak_prob=0.5, bot_text="é" * 40_000),
        lambda: StepMessage(frame_index=0, speaking=False, speak_prob=0.5, transcript="\ud800"),
        lambda: InjectTextMessage(text="", role="user"),
        lambda: ReadyMessage(protocol_version=1, session_id="s", slot=4, capacity=4),
        lambda: SessionSettingsUpdate(top_k=None),
    ],
)
def test_models_reject_unencodable_values(build: Callable[[], object]) -> None:
    with pytest.raises(ValidationError):
        build()


def test_bad_frame_samples_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        decode_client_message(b"\x02", 0)


# Malformed input: each case with its close code.

_AUDIO_OK = encode_message(AudioFrame(frame_index=5, pcm=np.zeros(FRAME, np.int16)))
_HELLO = {"type": "hello", "protocol_version": PROTOCOL_VERSION}

CLIENT_MALFORMED: list[tuple[str, bytes, CloseCode]] = [
    ("empty", b"", CloseCode.BAD_MESSAGE),
    ("kind_zero", b"\x00", CloseCode.BAD_MESSAGE),
    ("kind_step_from_client", _step_bytes(0), CloseCode.BAD_MESSAGE),
    ("kind_unknown", b"\xff{}", CloseCode.BAD_MESSAGE),
    ("too_big", b"\x02" + bytes(MAX_MESSAGE_BYTES), CloseCode.MESSAGE_TOO_BIG),
    ("too_big_control", b"\x01" + b" " * MAX_MESSAGE_BYTES, CloseCode.MESSAGE_TOO_BIG),
    ("audio_kind_only", b"\x02", CloseCode.BAD_MESSAGE),
    ("audio_truncated_header", b"\x02\x00\x00", CloseCode.BAD_MESSAGE),
    ("audio_no_samples", _AUDIO_OK[:5], CloseCode.BAD_MESSAGE),
    ("audio_one_sample_short", _AUDIO_OK[:-2], CloseCode.BAD_MESSAGE),
    ("audio_one_sample_long", _AUDIO_OK + b"\x00\x00", CloseCode.BAD_MESSAGE),
    ("audio_odd_bytes", _AUDIO_OK[:-1], CloseCode.BAD_MESSAGE),
    ("control_empty", b"\x01", CloseCode.BAD_MESSAGE),
    ("control_not_json", b"\x01hello", CloseCode.BAD_MESSAGE),
    ("control_bad_utf8", b'\x01{"type":"end\xff"}', CloseCode.BAD_MESSAGE),
    ("control_lone_surrogate", b'\x01{"type":"inject_text","role":"user","text":"\\ud800"}',
     CloseCode.BAD_MESSAGE),
    ("control_array", _control([1, 2]), CloseCode.BAD_MESSAGE),
    ("control_string", b'\x01"hello"', CloseCode.BAD_MESSAGE),
    ("control_deep", b"\x01" + b"[" * 10_000, CloseCode.BAD_MESSAGE),
    ("control_trailing", b'\x01{"type":"end"} x', CloseCode.BAD_MESSAGE),
    ("missing_type", _control({}), CloseCode.BAD_MESSAGE),
    ("unknown_type", _control({"type": "dance"}), CloseCode.BAD_MESSAGE),
    ("worker_type_from_client", _control({"type": "ended", "reason": "x", "frames": 0}),
     CloseCode.BAD_MESSAGE),
    ("extra_field", _control({"type": "reset", "hard": True}), CloseCode.BAD_MESSAGE),
    ("hello_version_2", _control({**_HELLO, "protocol_version": 2}), CloseCode.UNSUPPORTED_VERSION),
    ("hello_version_0_v2_shape", _control({"type": "hello", "protocol_version": 0, "x": []}),
     CloseCode.UNSUPPORTED_VERSION),
    ("hello_version_string", _control({**_HELLO, "protocol_version": "1"}), CloseCode.BAD_MESSAGE),
    ("hello_version_missing", _control({"type": "hello"}), CloseCode.BAD_MESSAGE),
    ("temperature_high", _control({**_HELLO, "session": {"temperature": 2.5}}),
     CloseCode.BAD_MESSAGE),
    ("temperature_string", _control({**_HELLO, "session": {"temperature": "0.5"}}),
     CloseCode.BAD_MESSAGE),
    ("temperature_nan", b'\x01{"type":"hello","protocol_version":1,"session":{"temperature":NaN}}',
     CloseCode.BAD_MESSAGE),
    ("top_k_negative", _control({**_HELLO, "session": {"top_k": -1}}), CloseCode.BAD_MESSAGE),
    ("top_k_float", _control({**_HELLO, "session": {"top_k": 5.0}}), CloseCode.BAD_MESSAGE),
    ("flow_steps_zero", _control({**_HELLO, "session": {"flow_steps": 0}}), CloseCode.BAD_MESSAGE),
    ("threshold_one", _control({**_HELLO, "session": {"speak_threshold": 1.0}}),
     CloseCode.BAD_MESSAGE),
    ("seed_negative", _control({**_HELLO, "session": {"seed": -1}}), CloseCode.BAD_MESSAGE),
    ("system_prompt_too_long", _control({**_HELLO, "system_prompt": "a" * (MAX_TEXT_CHARS + 1)}),
     CloseCode.BAD_MESSAGE),
    ("voice_not_base64", _control({**_HELLO, "voice_prompt_pcm_b64": "not base64!"}),
     CloseCode.BAD_MESSAGE),
    ("voice_odd_bytes", _control({**_HELLO, "voice_prompt_pcm_b64": "AAAA"}),
     CloseCode.BAD_MESSAGE),
    ("voice_empty", _control({**_HELLO, "voice_prompt_pcm_b64": ""}), CloseCode.BAD_MESSAGE),
    ("voice_too_long",
     _control({**_HELLO, "voice_prompt_pcm_b64": "AAAA" * (MAX_VOICE_PROMPT_BYTES // 3 + 2)}),
     CloseCode.BAD_MESSAGE),
    ("inject_empty", _control({"type": "inject_text", "text": "", "role": "user"}),
     CloseCode.BAD_MESSAGE),
    ("inject_too_long",
     _control({"type": "inject_text", "text": "a" * (MAX_TEXT_CHARS + 1), "role": "user"}),
     CloseCode.BAD_MESSAGE),
    ("inject_bad_role", _control({"type": "inject_text", "text": "a", "role": "narrator"}),
     CloseCode.BAD_MESSAGE),
    ("inject_pinned_string",
     _control({"type": "inject_text", "text": "a", "role": "user", "pinned": "yes"}),
     CloseCode.BAD_MESSAGE),
    ("update_null_top_k", _control({"type": "update_settings", "session": {"top_k": None}}),
     CloseCode.BAD_MESSAGE),
    ("update_missing_session", _control({"type": "update_settings"}), CloseCode.BAD_MESSAGE),
]


@pytest.mark.parametrize(("data", "code"), [c[1:] for c in CLIENT_MALFORMED],
                         ids=[c[0] for c in CLIENT_MALFORMED])
def test_client_malformed(data: bytes, code: CloseCode) -> None:
    _expect_error(decode_client_message, data, code)


_READY = {"type": "ready", "protocol_version": 1, "session_id": "s", "slot": 0, "capacity": 1}

WORKER_MALFORMED: list[tuple[str, bytes, CloseCode]] = [
    ("empty", b"", CloseCode.BAD_MESSAGE),
    ("audio_from_worker", _AUDIO_OK, CloseCode.BAD_MESSAGE),
    ("too_big", b"\x03" + bytes(MAX_MESSAGE_BYTES), CloseCode.MESSAGE_TOO_BIG),
    ("step_kind_only", b"\x03", CloseCode.BAD_MESSAGE),
    ("step_truncated_header", _step_bytes(0)[:-1], CloseCode.BAD_MESSAGE),
    ("step_reserved_flag", _step_bytes(0x08), CloseCode.BAD_MESSAGE),
    ("step_speaking_no_pcm", _step_bytes(0x01), CloseCode.BAD_MESSAGE),
    ("step_pcm_not_speaking", _step_bytes(0x00, pcm_samples=FRAME), CloseCode.BAD_MESSAGE),
    ("step_pcm_short", _step_bytes(0x01, pcm_samples=FRAME - 1), CloseCode.BAD_MESSAGE),
    ("step_pcm_odd", _step_bytes(0x01, pcm_samples=FRAME) + b"\x00", CloseCode.BAD_MESSAGE),
    ("step_text_len_past_end", _step_bytes(0, bot_text=b"ab")[:-1], CloseCode.BAD_MESSAGE),
    ("step_bot_text_bad_utf8", _step_bytes(0, bot_text=b"\xc3"), CloseCode.BAD_MESSAGE),
    ("step_transcript_bad_utf8", _step_bytes(0, transcript=b"\xed\xa0\x80"),
     CloseCode.BAD_MESSAGE),
    ("step_speak_prob_nan", _step_bytes(0, speak_prob=float("nan")), CloseCode.BAD_MESSAGE),
    ("step_speak_prob_above_one", _step_bytes(0, speak_prob=1.5), CloseCode.BAD_MESSAGE),
    ("step_speak_prob_negative", _step_bytes(0, speak_prob=-0.25), CloseCode.BAD_MESSAGE),
    ("client_type_from_worker", _control(_HELLO), CloseCode.BAD_MESSAGE),
    ("ready_version_2", _control({**_READY, "protocol_version": 2}), CloseCode.UNSUPPORTED_VERSION),
    ("ready_slot_out_of_range", _control({**_READY, "slot": 1}), CloseCode.BAD_MESSAGE),
    ("ready_frame_samples_zero", _control({**_READY, "frame_samples": 0}), CloseCode.BAD_MESSAGE),
    ("ready_sample_rate_16k", _control({**_READY, "sample_rate_hz": 16000}), CloseCode.BAD_MESSAGE),
    ("ready_version_null", _control({**_READY, "protocol_version": None}), CloseCode.BAD_MESSAGE),
    ("error_code_out_of_range",
     _control({"type": "error", "code": 7, "message": "x", "fatal": True}),
     CloseCode.BAD_MESSAGE),
    ("injected_negative", _control({"type": "injected", "token_count": -1, "kv_length": 0}),
     CloseCode.BAD_MESSAGE),
    ("ended_missing_frames", _control({"type": "ended", "reason": "x"}), CloseCode.BAD_MESSAGE),
]


@pytest.mark.parametrize(("data", "code"), [c[1:] for c in WORKER_MALFORMED],
                         ids=[c[0] for c in WORKER_MALFORMED])
def test_worker_malformed(data: bytes, code: CloseCode) -> None:
    _expect_error(decode_worker_message, data, code)


@pytest.mark.parametrize("decoder", [decode_client_message, decode_worker_message])
def test_text_frames_are_rejected(decoder: Decoder) -> None:
    _expect_error(decoder, '{"type": "end"}', CloseCode.BAD_MESSAGE)  # type: ignore[arg-type]


def test_error_message_leaves_out_inputs() -> None:
    # The offending value may be megabytes and ends up in logs and close reasons.
    data = _control({**_HELLO, "voice_prompt_pcm_b64": "!" * 100_000})
    with pytest.raises(ProtocolError) as info:
        decode_client_message(data, FRAME)
    assert len(info.value.message) < 300


# Fuzz: any bytes give a valid message or a ProtocolError, never another exception.

FUZZ_FRAME = 4  # small frames, so random lengths sometimes hit a valid audio or step size
_FUZZ_VALUES: list[object] = [None, True, 0, -1, 1, 2**40, 0.5, 1e308, "", "x", "🙂", [], {}]


def _check_decoded(decoder: Decoder, data: bytes) -> None:
    try:
        message = decoder(data, FUZZ_FRAME)
    except ProtocolError as exc:
        assert isinstance(exc.code, CloseCode)
        return
    # A valid message encodes back to a message that decodes to itself; binary ones byte-exact.
    again = encode_message(message)  # type: ignore[arg-type]
    assert decoder(again, FUZZ_FRAME) == message
    if data[0] != KIND_CONTROL:
        assert again == data


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(5)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf.insert(pos, rng.randrange(256))
        elif op == 2 and pos < len(buf):
            del buf[pos]
        elif op == 3:
            del buf[pos:]
        else:
            buf[pos:pos] = buf[rng.randrange(len(buf) + 1) :][: rng.randrange(8)]
    return bytes(buf)


def _mutate_json(rng: random.Random, data: bytes) -> bytes:
    obj = json.loads(data[1:])
    target = obj["session"] if "session" in obj and rng.random() < 0.5 else obj
    keys = [*target, "extra"]
    target[rng.choice(keys)] = rng.choice(_FUZZ_VALUES)
    return _control(obj)


def _fuzz_seeds() -> list[tuple[Decoder, bytes]]:
    rng = np.random.default_rng(3)
    client = [encode_message(m) for m in CLIENT_CONTROL] + [
        encode_message(AudioFrame(frame_index=9, pcm=_pcm(rng, FUZZ_FRAME)))
    ]
    worker = [encode_message(m) for m in WORKER_CONTROL] + [
        encode_message(StepMessage(frame_index=1, speaking=False, speak_prob=0.2, bot_text="é")),
        encode_message(
            StepMessage(
                frame_index=2, speaking=True, late=True, speak_prob=0.9, transcript="hi",
                pcm=_pcm(rng, FUZZ_FRAME),
            )
        ),
    ]
    return [(decode_client_message, d) for d in client] + [
        (decode_worker_message, d) for d in worker
    ]


def test_fuzz() -> None:
    rng = random.Random(0)
    decoders: list[Decoder] = [decode_client_message, decode_worker_message]
    for _ in range(2000):
        length = rng.choice([0, 1, 2, 5, 14, 15, 21, 23, rng.randrange(64)])
        data = bytes(rng.randrange(256) for _ in range(length))
        if data and rng.random() < 0.75:
            data = bytes((rng.choice([KIND_CONTROL, KIND_AUDIO, KIND_STEP]),)) + data[1:]
        _check_decoded(rng.choice(decoders), data)

    seeds = _fuzz_seeds()
    for _ in range(2000):
        decoder, data = rng.choice(seeds)
        if data[0] == KIND_CONTROL and rng.random() < 0.5:
            mutated = _mutate_json(rng, data)
        else:
            mutated = _mutate(rng, data)
        _check_decoded(decoder, mutated)
        _check_decoded(rng.choice(decoders), mutated)
