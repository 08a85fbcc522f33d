"""TurnTracker alone: step results in, turn events out, no pipeline."""

from __future__ import annotations

import numpy as np

from pipecat_michi.engine.engine import StepResult
from pipecat_michi.service.turns import (
    BotAudio,
    BotText,
    BotTurnEnded,
    BotTurnStarted,
    TurnTracker,
    UserTranscript,
    UserTurnEnded,
    UserTurnStarted,
)

AUDIO = np.full(1920, 1000, dtype=np.int16)


def step(index: int, *, speaking: bool = False, bot_text: str = "", transcript: str = "") -> StepResult:
    return StepResult(
        frame_index=index,
        filled=False,
        late=False,
        speaking=speaking,
        speak_prob=0.9 if speaking else 0.1,
        bot_text=bot_text,
        transcript=transcript,
        audio=AUDIO if speaking else None,
        kv_length=index + 1,
    )


def tracker(gap: int = 3, barge_in: int = 2, lead: int = 2) -> TurnTracker:
    return TurnTracker(user_turn_gap_frames=gap, barge_in_window_frames=barge_in, text_lead_frames=lead)


def kinds(events: list) -> list[type]:
    return [type(e) for e in events]


def test_a_user_turn_opens_on_text_and_ends_after_the_gap() -> None:
    turns = tracker(gap=2)
    assert turns.step(step(0, transcript=" "), 1.0) == []  # whitespace alone opens nothing
    assert turns.step(step(1, transcript=" hello"), 2.0) == [UserTurnStarted(), UserTranscript("hello")]
    assert turns.step(step(2, transcript=" there"), 3.0) == [UserTranscript("hello there")]
    assert turns.step(step(3), 4.0) == []
    assert turns.step(step(4), 5.0) == [UserTurnEnded("hello there")]
    # The bot's next turn measures TTFB from the step of the last transcript text.
    assert turns.step(step(5, speaking=True), 6.0)[0] == BotTurnStarted(speech_end_time=3.0)


def test_the_bot_taking_the_floor_ends_the_user_turn_first() -> None:
    turns = tracker(gap=10)
    turns.step(step(0, transcript="hi"), 1.0)
    events = turns.step(step(1, speaking=True, bot_text="Hey"), 2.0)
    assert kinds(events) == [UserTurnEnded, BotTurnStarted, BotAudio, BotText]
    assert events[0] == UserTurnEnded("hi") and events[3] == BotText("Hey", 1)
    assert turns.bot_speaking


def test_bot_text_said_while_silent_leads_the_next_turn_and_old_text_is_dropped() -> None:
    turns = tracker(lead=2)
    for index, text in enumerate(["a", "b", "c"]):
        assert turns.step(step(index, bot_text=text), 1.0) == []
    events = turns.step(step(3, speaking=True, bot_text="d"), 2.0)
    assert events[-1] == BotText("bcd", 3)


def test_yielding_while_the_user_speaks_is_a_barge_in_and_keeping_the_floor_is_not() -> None:
    turns = tracker(gap=10, barge_in=2)
    turns.step(step(0, speaking=True), 1.0)
    turns.step(step(1, speaking=True, transcript="wait"), 2.0)
    assert turns.step(step(2), 3.0) == [BotTurnEnded(interrupted_by_user=True, muted=False)]

    calm = tracker(gap=10, barge_in=2)
    calm.step(step(0, speaking=True), 1.0)
    assert calm.step(step(1), 2.0) == [BotTurnEnded(interrupted_by_user=False, muted=False)]


def test_an_interruption_mutes_the_rest_of_the_run_and_the_next_run_is_a_new_turn() -> None:
    turns = tracker()
    turns.step(step(0, speaking=True), 1.0)
    assert turns.interrupt() is True
    assert turns.interrupt() is False  # already muted
    assert turns.step(step(1, speaking=True, bot_text="lost"), 2.0) == []
    assert turns.step(step(2), 3.0) == [BotTurnEnded(interrupted_by_user=False, muted=True)]
    assert kinds(turns.step(step(3, speaking=True, bot_text="new"), 4.0)) == [BotTurnStarted, BotAudio, BotText]


def test_a_vad_stop_starts_ttfb_only_when_the_model_transcribed_nothing() -> None:
    turns = tracker()
    turns.user_stopped_speaking(7.0)
    events = turns.step(step(0, speaking=True), 8.0)
    assert events[0] == BotTurnStarted(speech_end_time=7.0)
    turns.user_stopped_speaking(9.0)  # while the bot speaks: not a turn end
    turns.step(step(1), 10.0)
    assert turns.step(step(2, speaking=True), 11.0)[0] == BotTurnStarted(speech_end_time=None)


def test_close_ends_the_bot_turn_then_the_user_turn() -> None:
    turns = tracker(gap=10)
    turns.step(step(0, speaking=True), 1.0)
    turns.step(step(1, speaking=True, transcript="hm"), 2.0)
    assert turns.close() == [BotTurnEnded(interrupted_by_user=False, muted=False), UserTurnEnded("hm")]
    assert turns.close() == []
