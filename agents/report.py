"""A call report: what the caller said (as the model heard it), what the bot said, and when."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pipecat.frames.frames import (
    InterimTranscriptionFrame,
    MetricsFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSTextFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData
from pipecat.observers.base_observer import BaseObserver, FramePushed

from pipecat_michi.service import MichiLLMService


@dataclass(eq=False)  # observers are kept in sets: identity hash
class CallReport(BaseObserver):
    """Observes one call's pipeline; only frames that ``MichiLLMService`` pushes count."""

    transcript_pieces: list[str] = field(default_factory=list)
    final_transcripts: list[str] = field(default_factory=list)
    bot_text: list[str] = field(default_factory=list)
    bot_audio_frames: int = 0
    ttfb_s: list[float] = field(default_factory=list)
    first_bot_audio_at: float | None = None
    printer: object = None  # a callable(str) to echo pieces live, or None

    def __post_init__(self) -> None:
        super().__init__()

    def _echo(self, line: str) -> None:
        if callable(self.printer):
            self.printer(line)

    async def on_push_frame(self, data: FramePushed) -> None:
        if not isinstance(data.source, MichiLLMService) or not data.first_push:
            return
        frame = data.frame
        if isinstance(frame, InterimTranscriptionFrame):
            self.transcript_pieces.append(frame.text)  # the turn so far: too chatty to echo
        elif isinstance(frame, TranscriptionFrame):
            self.final_transcripts.append(frame.text)
            self._echo(f"  caller said: {frame.text!r}")
        elif isinstance(frame, TTSTextFrame):
            self.bot_text.append(frame.text)
            self._echo(f"  bot text:    {frame.text!r}")
        elif isinstance(frame, TTSAudioRawFrame):
            self.bot_audio_frames += 1
            if self.first_bot_audio_at is None:
                self.first_bot_audio_at = time.monotonic()
        elif isinstance(frame, MetricsFrame):
            self.ttfb_s += [d.value for d in frame.data if isinstance(d, TTFBMetricsData)]
