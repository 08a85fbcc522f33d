"""A call report as a person hears it: who spoke when, what they said, how the turns went.

``CallReport`` observes a call's pipeline and prints one line per turn (``caller: ...`` when
the model finalises a caller turn, ``bot: ...`` when the bot's turn ends). ``CallTimeline``
works on the two audio tracks as the caller's side had them (caller left, bot right, one
clock) and counts what a listener notices: turns, the bot speaking over the caller, barge-ins
(the agent clearing the bot's audio), gaps and time to first audio after each caller turn;
it writes the stereo WAV and a who-spoke-when PNG. ``CallRecorder`` builds the same for a
live call of the WebRTC or Twilio agent (``--record DIR``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile
import soxr
from loguru import logger
from pipecat.frames.frames import (
    AudioRawFrame,
    CancelFrame,
    EndFrame,
    Frame,
    InputAudioRawFrame,
    InterimTranscriptionFrame,
    InterruptionFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pydantic import BaseModel, ConfigDict

from pipecat_michi.service import MichiLLMService

# Speech activity on 20 ms windows: louder than this RMS (of full scale) is sound, and pauses
# shorter than MERGE_GAP_S stay inside one turn (a breath is not a turn).
WINDOW_S = 0.02
SPEECH_RMS = 0.001  # -60 dBFS: the demo model speaks quietly; silence here is digital zero
MERGE_GAP_S = 0.3


@dataclass
class Utterance:
    """One finalised turn as the pipeline saw it (monotonic clock)."""

    speaker: str  # "caller" or "bot"
    at: float
    text: str


@dataclass(eq=False)  # observers are kept in sets: identity hash
class CallReport(BaseObserver):
    """Observes one call's pipeline; only frames that ``MichiLLMService`` pushes count."""

    transcript_pieces: list[str] = field(default_factory=list)
    final_transcripts: list[str] = field(default_factory=list)
    utterances: list[Utterance] = field(default_factory=list)
    printer: object = None  # a callable(str) to echo each turn live, or None
    _bot_turn: list[str] = field(default_factory=list)
    _bot_turn_at: float = 0.0

    def __post_init__(self) -> None:
        super().__init__()

    def _finish(self, speaker: str, at: float, text: str) -> None:
        self.utterances.append(Utterance(speaker, at, text))
        if callable(self.printer):
            self.printer(f"{speaker}: {text!r}")

    def finish_bot_turn(self) -> None:
        """End the bot's open turn (its TTSStoppedFrame, or the end of the call)."""
        if self._bot_turn:
            self._finish("bot", self._bot_turn_at, "".join(self._bot_turn))
            self._bot_turn = []

    async def on_push_frame(self, data: FramePushed) -> None:
        if not isinstance(data.source, MichiLLMService) or not data.first_push:
            return
        frame = data.frame
        if isinstance(frame, InterimTranscriptionFrame):
            self.transcript_pieces.append(frame.text)  # the turn so far: too chatty to echo
        elif isinstance(frame, TranscriptionFrame):
            self.final_transcripts.append(frame.text)
            self._finish("caller", time.monotonic(), frame.text)
        elif isinstance(frame, TTSStartedFrame):
            self.finish_bot_turn()
            self._bot_turn_at = time.monotonic()
        elif isinstance(frame, TTSTextFrame):
            self._bot_turn.append(frame.text)
        elif isinstance(frame, TTSStoppedFrame):
            self.finish_bot_turn()


def _play_out(chunks: list[tuple[float, np.ndarray]], rate_hz: int) -> np.ndarray:
    pieces: list[tuple[int, np.ndarray]] = []
    cursor = 0
    for at, chunk in chunks:
        cursor = max(cursor, int(at * rate_hz))
        pieces.append((cursor, chunk))
        cursor += len(chunk)
    track = np.zeros(cursor, dtype=np.int16)
    for start, chunk in pieces:
        track[start : start + len(chunk)] = chunk
    return track


def speech_segments(pcm: np.ndarray, rate_hz: int) -> list[tuple[float, float]]:
    """``(start_s, end_s)`` of each stretch of speech in int16 audio."""
    window = int(WINDOW_S * rate_hz)
    count = len(pcm) // window
    if count == 0:
        return []
    frames = pcm[: count * window].astype(np.float32).reshape(count, window) / 32768.0
    loud = np.sqrt((frames**2).mean(axis=1)) > SPEECH_RMS
    segments: list[tuple[float, float]] = []
    for index in np.flatnonzero(loud):
        start, end = index * WINDOW_S, (index + 1) * WINDOW_S
        if segments and start - segments[-1][1] < MERGE_GAP_S:
            segments[-1] = (segments[-1][0], end)
        else:
            segments.append((start, end))
    return segments


class TurnFigures(BaseModel):
    """What a listener notices, from the two tracks."""

    model_config = ConfigDict(frozen=True)

    caller_turns: int
    bot_turns: int
    bot_over_caller: int  # bot turns that started while the caller was speaking
    barge_ins: int  # times the agent cleared the bot's audio (the caller talked over it)
    ttfa_ms: list[float | None]  # per caller turn: its end to the bot's next start (None: no answer)
    longest_gap_ms: float  # the longest silence between two turns


@dataclass
class CallTimeline:
    """The call on one clock (seconds from connect), 8 kHz int16 per side."""

    rate_hz: int
    caller: np.ndarray
    bot: np.ndarray
    utterances: list[tuple[float, str, str]]  # (seconds, speaker, text)
    clears: int = 0

    @classmethod
    def from_chunks(
        cls,
        rate_hz: int,
        caller: list[tuple[float, np.ndarray]],
        bot: list[tuple[float, np.ndarray]],
        utterances: list[tuple[float, str, str]],
        clears: int,
    ) -> CallTimeline:
        """Each side's ``(seconds, int16 chunk)`` placed where it arrived; a chunk that arrives
        while the previous one still plays waits for it (the listener's playout), so bursts sent
        ahead of time are heard in order, not on top of each other."""
        tracks = [_play_out(chunks, rate_hz) for chunks in (caller, bot)]
        length = max(len(track) for track in tracks)
        caller_track, bot_track = (np.pad(track, (0, length - len(track))) for track in tracks)
        return cls(rate_hz, caller_track, bot_track, utterances, clears)

    def figures(self) -> TurnFigures:
        caller = speech_segments(self.caller, self.rate_hz)
        bot = speech_segments(self.bot, self.rate_hz)
        over = sum(any(c0 <= b0 < c1 for c0, c1 in caller) for b0, _ in bot)
        ttfa: list[float | None] = []
        for _, c1 in caller:
            # The caller's turn ends where no caller speech follows before the bot's next start.
            answer = next((b0 for b0, _ in bot if b0 >= c1), None)
            ttfa.append(None if answer is None else 1000 * (answer - c1))
        edges = sorted([*caller, *bot])
        gaps = [b[0] - a[1] for a, b in zip(edges, edges[1:]) if b[0] > a[1]]
        return TurnFigures(
            caller_turns=len(caller),
            bot_turns=len(bot),
            bot_over_caller=over,
            barge_ins=self.clears,
            ttfa_ms=ttfa,
            longest_gap_ms=1000 * max(gaps, default=0.0),
        )

    def write_wav(self, path: Path) -> None:
        """Stereo: the caller left, the bot right."""
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(path, np.stack([self.caller, self.bot], axis=1), self.rate_hz, subtype="PCM_16")

    def write_png(self, path: Path) -> None:
        """Who spoke when, one row per side, each turn's transcript beside it."""
        import matplotlib

        matplotlib.use("Agg")  # files only: no display, no GUI toolkit
        import matplotlib.pyplot as plt

        seconds = len(self.caller) / self.rate_hz
        fig, ax = plt.subplots(figsize=(10, 2.6), dpi=100)
        for row, (name, track, colour) in enumerate((("caller", self.caller, "tab:blue"), ("bot", self.bot, "tab:orange"))):
            spans = [(s, e - s) for s, e in speech_segments(track, self.rate_hz)]
            ax.broken_barh(spans, (1 - row - 0.3, 0.6), color=colour)
            for at, speaker, text in self.utterances:
                if speaker == name and text.strip():
                    # Random weights emit control bytes, which no font draws.
                    shown = "".join(ch if ch.isprintable() else "?" for ch in text)
                    short = shown if len(shown) <= 40 else shown[:39] + "…"
                    ax.text(at, 1 - row + 0.35, short, fontsize=7, va="bottom")
        ax.set_yticks([1, 0], ["caller", "bot"])
        ax.set_ylim(-0.6, 1.9)
        ax.set_xlim(0, seconds)
        ax.set_xlabel("seconds from connect")
        ax.set_title("who spoke when (bars: audio heard; text: transcripts)", fontsize=9)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)


RECORD_RATE_HZ = 16000


class CallRecorder:
    """The report for a live call (``--record DIR``): two taps in the pipeline, one before the
    service (the caller's audio down, the model's transcripts up) and one after it (the bot's
    audio and text); when the call ends, ``DIR/<call>.wav`` and ``DIR/<call>_timeline.png``."""

    def __init__(self, directory: Path, name: str) -> None:
        self._directory = directory
        self._name = name
        self._zero = time.monotonic()
        self._caller: list[tuple[float, np.ndarray]] = []
        self._bot: list[tuple[float, np.ndarray]] = []
        self._utterances: list[tuple[float, str, str]] = []
        self._bot_turn: list[str] = []
        self._interruptions = 0
        self._written = False

    def _now(self) -> float:
        return time.monotonic() - self._zero

    def _audio(self, frame: AudioRawFrame) -> np.ndarray:
        pcm = np.frombuffer(frame.audio, dtype=np.int16)
        if frame.num_channels > 1:
            pcm = pcm.reshape(-1, frame.num_channels)[:, 0]
        if frame.sample_rate != RECORD_RATE_HZ:
            pcm = soxr.resample(pcm, frame.sample_rate, RECORD_RATE_HZ)
        return pcm.astype(np.int16)

    def caller_tap(self) -> FrameProcessor:
        recorder = self

        class CallerTap(FrameProcessor):
            async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
                await super().process_frame(frame, direction)
                if isinstance(frame, InputAudioRawFrame):
                    recorder._caller.append((recorder._now(), recorder._audio(frame)))
                elif isinstance(frame, TranscriptionFrame):
                    recorder._utterances.append((recorder._now(), "caller", frame.text))
                await self.push_frame(frame, direction)

        return CallerTap()

    def bot_tap(self) -> FrameProcessor:
        recorder = self

        class BotTap(FrameProcessor):
            async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
                await super().process_frame(frame, direction)
                if isinstance(frame, TTSAudioRawFrame):
                    recorder._bot.append((recorder._now(), recorder._audio(frame)))
                elif isinstance(frame, TTSTextFrame):
                    recorder._bot_turn.append(frame.text)
                elif isinstance(frame, TTSStoppedFrame) and recorder._bot_turn:
                    recorder._utterances.append((recorder._now(), "bot", "".join(recorder._bot_turn)))
                    recorder._bot_turn = []
                elif isinstance(frame, InterruptionFrame):
                    recorder._interruptions += 1
                elif isinstance(frame, (EndFrame, CancelFrame)):
                    recorder.write()
                await self.push_frame(frame, direction)

        return BotTap()

    def write(self) -> tuple[Path, Path] | None:
        """Write the WAV and the PNG once (the first end of the call), and log the figures."""
        if self._written:
            return None
        self._written = True
        timeline = CallTimeline.from_chunks(RECORD_RATE_HZ, self._caller, self._bot, self._utterances, self._interruptions)
        wav, png = self._directory / f"{self._name}.wav", self._directory / f"{self._name}_timeline.png"
        timeline.write_wav(wav)
        timeline.write_png(png)
        logger.info(f"call report: {timeline.figures().model_dump()}; {wav}, {png}")
        return wav, png
