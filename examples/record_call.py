"""Record a MichiAI call: both sides as a stereo WAV (caller left, bot right) and a transcript.

Pipecat's ``AudioBufferProcessor`` after ``transport.output()`` sees the caller's input audio
and the bot's output audio there; the transcript comes from the context aggregators' events,
so it holds exactly the turns the conversation context recorded::

    recorder = CallRecorder(context, "call.wav", "call.jsonl")
    pipeline = Pipeline([
        transport.input(),
        context.user(),
        MichiLLMService(...),
        transport.output(),
        recorder.audio,
        context.assistant(),
    ])

Each transcript line is one turn: ``{"role", "text", "started_at", "offset_s"}`` (``offset_s``:
seconds into the recording when the turn was written), plus ``"interrupted"`` for the bot.

    .venv/bin/python -m examples.record_call     # a 2.5 s transport-free call -> artifacts/

The smoke call runs the embedded engine's tiny random model, with a lower speak threshold so
it talks and both channels have audio; the words in the transcript are noise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import wave
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.processors.aggregators.llm_context import LLMContext  # noqa: E402
from pipecat.processors.aggregators.llm_response_universal import (  # noqa: E402
    AssistantTurnStoppedMessage,
    LLMAssistantAggregator,
    LLMContextAggregatorPair,
    LLMUserAggregator,
    UserTurnMessageAddedMessage,
)
from pipecat.processors.audio.audio_buffer_processor import AudioBufferProcessor  # noqa: E402

from pipecat_michi.engine.call import DuplexBackend  # noqa: E402
from examples.smoke import run_smoke_call  # noqa: E402
from pipecat_michi.service import MichiLLMService, MichiSettings  # noqa: E402

SYSTEM = "You are Michi, a friendly voice assistant. Keep answers short."
# The random tiny model with this seed and threshold talks after a moment of listening.
TALKATIVE = MichiSettings(seed=1, speak_threshold=0.45)


class CallRecorder:
    """Writes a call to a stereo WAV (caller left, bot right) and a JSONL transcript of its turns.

    Put ``audio`` (an ``AudioBufferProcessor``) after ``transport.output()``. Audio is written
    every ``chunk_s`` seconds, so a long call is not held in memory; the WAV is complete when
    the pipeline ends (``EndFrame``/``CancelFrame`` stop the recording). Transcript lines are
    written as the aggregators record each user and bot turn.
    """

    def __init__(
        self,
        context: LLMContextAggregatorPair,
        wav_path: str | Path,
        transcript_path: str | Path,
        *,
        sample_rate_hz: int = 24000,
        chunk_s: float = 1.0,
    ) -> None:
        self.wav_path, self.transcript_path = Path(wav_path), Path(transcript_path)
        self.audio = AudioBufferProcessor(
            sample_rate=sample_rate_hz,
            num_channels=2,
            buffer_size=int(sample_rate_hz * 2 * chunk_s),  # bytes of one 16-bit mono track
            auto_start_recording=True,
        )
        self._wav: wave.Wave_write | None = None
        self._started = time.monotonic()
        # Handlers are plain functions: each event's task runs them whole, in event order.
        self.audio.add_event_handler("on_recording_started", self._on_recording_started)
        self.audio.add_event_handler("on_audio_data", self._on_audio_data)
        self.audio.add_event_handler("on_recording_stopped", self._on_recording_stopped)
        context.user().add_event_handler("on_user_turn_message_added", self._on_user_turn)
        context.assistant().add_event_handler("on_assistant_turn_stopped", self._on_assistant_turn)

    def _on_recording_started(self, _processor: AudioBufferProcessor) -> None:
        self._started = time.monotonic()
        self.wav_path.parent.mkdir(parents=True, exist_ok=True)
        self.transcript_path.parent.mkdir(parents=True, exist_ok=True)
        self.transcript_path.write_text("")
        self._wav = wave.open(str(self.wav_path), "wb")
        self._wav.setnchannels(2)
        self._wav.setsampwidth(2)
        self._wav.setframerate(self.audio.sample_rate)

    def _on_audio_data(self, _processor: AudioBufferProcessor, audio: bytes, sample_rate: int, channels: int) -> None:
        if self._wav is not None:
            self._wav.writeframes(audio)

    def _on_recording_stopped(self, _processor: AudioBufferProcessor) -> None:
        if self._wav is not None:
            self._wav.close()
            self._wav = None

    def _on_user_turn(self, _aggregator: LLMUserAggregator, message: UserTurnMessageAddedMessage) -> None:
        self._write_turn({"role": "user", "text": message.content, "started_at": message.timestamp})

    def _on_assistant_turn(self, _aggregator: LLMAssistantAggregator, message: AssistantTurnStoppedMessage) -> None:
        turn = {"role": "assistant", "text": message.content, "started_at": message.timestamp}
        self._write_turn({**turn, "interrupted": message.interrupted})

    def _write_turn(self, turn: dict[str, object]) -> None:
        turn["offset_s"] = round(time.monotonic() - self._started, 3)
        with self.transcript_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(turn, ensure_ascii=False) + "\n")


async def record_smoke_call(
    out_dir: str | Path = "artifacts",
    seconds: float = 2.5,
    backend: DuplexBackend | None = None,
    settings: MichiSettings | None = TALKATIVE,
) -> CallRecorder:
    """A transport-free call of ``seconds`` of synthetic caller audio, recorded into ``out_dir``.

    ``backend``: ``None`` embeds the default engine (tiny preset, random weights, CPU).
    """
    out = Path(out_dir)
    context = LLMContextAggregatorPair(LLMContext([{"role": "system", "content": SYSTEM}]))
    recorder = CallRecorder(context, out / "recording.wav", out / "transcript.jsonl")
    service = MichiLLMService(backend, settings=settings, system_instruction=SYSTEM)
    # Without a transport the service's output goes straight on to the recorder.
    pipeline = Pipeline([context.user(), service, recorder.audio, context.assistant()])
    await run_smoke_call(pipeline, seconds, audio_out_sample_rate=24000)
    return recorder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.5, help="caller audio to send")
    parser.add_argument("--out", default="artifacts", help="folder for recording.wav and transcript.jsonl")
    args = parser.parse_args()
    recorder = asyncio.run(record_smoke_call(args.out, args.seconds))

    with wave.open(str(recorder.wav_path), "rb") as wav:
        rate, channels = wav.getframerate(), wav.getnchannels()
        stereo = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16).reshape(-1, channels)
    print(f"{recorder.wav_path}: {len(stereo) / rate:.2f} s, {channels} channels, {rate} Hz")
    for side, track in (("caller (left)", stereo[:, 0]), ("bot (right)", stereo[:, 1])):
        print(f"  {side:>13}: {np.count_nonzero(track) / rate:.2f} s of non-silent samples")
    turns = [json.loads(line) for line in recorder.transcript_path.read_text(encoding="utf-8").splitlines()]
    print(f"{recorder.transcript_path}: {len(turns)} turns")
    for turn in turns:
        print(f"  {turn['offset_s']:6.2f} s {turn['role']:>9}: {turn['text'][:48]!r}")


if __name__ == "__main__":
    main()
