"""Turn tracking: one call's step results -> user and bot turn events, with no Pipecat pipeline.

``TurnTracker`` is pure bookkeeping (no I/O, no asyncio): it reads each ``StepResult`` and says
what happened in the conversation as ``TurnEvent``s. ``MichiLLMService`` turns the events into
frames; tests drive the tracker directly.

The rules:

- the user's turn opens with the first transcript text that is not just whitespace and ends when
  the bot starts speaking or the transcript stays quiet for ``user_turn_gap_frames`` steps;
- a bot turn is a run of speaking steps; it ends when the model stops speaking. The model yielding
  the floor while the user was heard within ``barge_in_window_frames`` is a barge-in
  (``BotTurnEnded.interrupted_by_user``);
- bot text produced while silent (inner-monologue text may lead its audio) is kept for
  ``text_lead_frames`` steps and spoken with the next turn's first audio; older is dropped;
- after ``interrupt()`` nothing more of the current speaking run comes out.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np

from pipecat_michi.contract import StepResult


@dataclass(frozen=True)
class UserTurnStarted:
    """The model heard the user start speaking."""


@dataclass(frozen=True)
class UserTranscript:
    """The user's turn so far (interim transcript)."""

    text: str


@dataclass(frozen=True)
class UserTurnEnded:
    """The user's turn ended; ``text`` is its final transcript (may be empty)."""

    text: str


@dataclass(frozen=True)
class BotTurnStarted:
    """The model took the floor; ``speech_end_time`` (wall time) is when the user stopped, if known."""

    speech_end_time: float | None


@dataclass(frozen=True, eq=False)
class BotAudio:
    """One frame of bot audio at the call's rate."""

    audio: np.ndarray
    frame_index: int


@dataclass(frozen=True)
class BotText:
    """Bot text spoken with the audio of ``frame_index``."""

    text: str
    frame_index: int


@dataclass(frozen=True)
class BotTurnEnded:
    """The model stopped speaking.

    ``interrupted_by_user``: it yielded the floor to the user (a barge-in). ``muted``: an
    interruption already cut this run, so downstream the turn is over.
    """

    interrupted_by_user: bool
    muted: bool


TurnEvent = UserTurnStarted | UserTranscript | UserTurnEnded | BotTurnStarted | BotAudio | BotText | BotTurnEnded


@dataclass
class _UserTurn:
    open: bool = False
    text: str = ""
    quiet_frames: int = 0  # steps since the last transcript text


@dataclass
class _BotTurn:
    open: bool = False  # inside a run of speaking frames
    muted: bool = False  # interrupt() cut this run: forward nothing more of it


class TurnTracker:
    """Step results of one conversation -> ``TurnEvent``s (see the module docstring for the rules).

    Args:
        user_turn_gap_frames: Steps without new transcript text that end the user's turn.
        barge_in_window_frames: The model yielding counts as a barge-in when the user was heard
            within this many steps of it.
        text_lead_frames: Steps that bot text produced while silent is kept for the next turn.
    """

    def __init__(self, user_turn_gap_frames: int, barge_in_window_frames: int, text_lead_frames: int) -> None:
        self._user_turn_gap_frames = user_turn_gap_frames
        self._barge_in_window_frames = barge_in_window_frames
        self._user = _UserTurn()
        self._bot = _BotTurn()
        self._lead_text: collections.deque[str] = collections.deque(maxlen=text_lead_frames or None)
        self._keeps_lead_text = text_lead_frames > 0
        self._speech_end_time: float | None = None  # sent time of the last step with user text
        self._vad_speech_end_time: float | None = None  # from user_stopped_speaking()

    @property
    def bot_speaking(self) -> bool:
        """Inside a bot turn (muted or not)."""
        return self._bot.open

    def step(self, result: StepResult, sent_time: float) -> list[TurnEvent]:
        """The events of one step; ``sent_time`` is when its frame was sent (for TTFB)."""
        events: list[TurnEvent] = []
        self._track_user(result, sent_time, events)
        self._track_bot(result, events)
        return events

    def interrupt(self) -> bool:
        """Mute the rest of the current speaking run; True when a run was cut."""
        if self._bot.open and not self._bot.muted:
            self._bot.muted = True
            return True
        return False

    def user_stopped_speaking(self, now: float) -> None:
        """A VAD says the user stopped: the TTFB start when the model transcribed nothing."""
        if not self._bot.open:
            self._vad_speech_end_time = now

    def close(self) -> list[TurnEvent]:
        """End the open turns, keeping turn frames balanced (the call is over).

        The bot's first: a bot turn starting ends any open user turn, so when both are open
        the user's began during the bot's.
        """
        events: list[TurnEvent] = []
        if self._bot.open:
            self._end_bot_turn(events, interrupted_by_user=False)
        if self._user.open:
            self._end_user_turn(events)
        return events

    def _track_user(self, result: StepResult, sent_time: float, events: list[TurnEvent]) -> None:
        user, text = self._user, result.transcript
        if text and (user.open or text.strip()):
            if not user.open:
                user.open, user.text = True, ""
                events.append(UserTurnStarted())
            user.text += text
            user.quiet_frames = 0
            self._speech_end_time = sent_time
            events.append(UserTranscript(user.text.strip()))
        elif user.open:
            user.quiet_frames += 1
            if user.quiet_frames >= self._user_turn_gap_frames:
                self._end_user_turn(events)

    def _track_bot(self, result: StepResult, events: list[TurnEvent]) -> None:
        if not result.speaking:
            if self._bot.open:
                yielded = self._user.open and self._user.quiet_frames < self._barge_in_window_frames
                self._end_bot_turn(events, interrupted_by_user=yielded)
            if result.bot_text and self._keeps_lead_text:
                self._lead_text.append(result.bot_text)
            return
        if not self._bot.open:
            self._start_bot_turn(events)
        if self._bot.muted or result.audio is None:
            return
        events.append(BotAudio(result.audio, result.frame_index))
        text = "".join(self._lead_text) + result.bot_text
        self._lead_text.clear()
        if text:
            events.append(BotText(text, result.frame_index))

    def _start_bot_turn(self, events: list[TurnEvent]) -> None:
        if self._user.open:
            self._end_user_turn(events)  # the bot taking the floor ends the user's turn
        self._bot = _BotTurn(open=True)
        speech_end = self._speech_end_time or self._vad_speech_end_time
        self._speech_end_time = self._vad_speech_end_time = None
        events.append(BotTurnStarted(speech_end))

    def _end_bot_turn(self, events: list[TurnEvent], *, interrupted_by_user: bool) -> None:
        muted = self._bot.muted
        self._bot = _BotTurn()
        events.append(BotTurnEnded(interrupted_by_user=interrupted_by_user, muted=muted))
        if not muted and not interrupted_by_user:
            # User words heard during the turn the model kept were a backchannel, not a turn end.
            self._speech_end_time = None

    def _end_user_turn(self, events: list[TurnEvent]) -> None:
        text = self._user.text.strip()
        self._user = _UserTurn()
        events.append(UserTurnEnded(text))
