"""ContextSync: only what a call has not read reaches it, and never its own words."""

from pipecat.processors.aggregators.llm_context import LLMSpecificMessage

from pipecat_michi.service.context import ContextSync, Injection


def sync_all(sync: ContextSync, messages: list) -> list[Injection]:
    injected = []
    for fingerprint, message in sync.new_messages(messages):
        injection = sync.take(message)
        if injection is not None:
            injected.append(injection)
        sync.commit(fingerprint)
    return injected


def test_own_outputs_come_back_in_the_context_and_are_skipped() -> None:
    sync = ContextSync()
    sync.record_own("system", "Be brief.")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    assert sync_all(sync, messages) == [Injection("user", "Hello")]

    sync.record_own("assistant", "Hi ")
    sync.record_own("assistant", "there!")
    sync.record_own("user", "what time")
    sync.record_own("user", "is it")
    messages += [
        {"role": "assistant", "content": "Hi there!"},  # pieces joined by the aggregator
        {"role": "user", "content": "what time is it"},  # two transcripts, one message
        {"role": "user", "content": "Store hours: 9 to 5."},  # appended by the app
    ]
    assert sync_all(sync, messages) == [Injection("user", "Store hours: 9 to 5.")]
    assert sync_all(sync, messages) == []  # nothing new


def test_interrupted_own_text_that_never_came_back_is_forgotten() -> None:
    sync = ContextSync()
    sync.record_own("assistant", "one two")  # dropped downstream by an interruption
    sync.record_own("assistant", "three")
    assert sync_all(sync, [{"role": "assistant", "content": "three"}]) == []
    assert sync_all(sync, [{"role": "assistant", "content": "three"}, {"role": "assistant", "content": "one two"}]) == [
        Injection("assistant", "one two")
    ]


def test_a_rewritten_history_reaches_the_call_as_new_text() -> None:
    sync = ContextSync()
    tool_call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "1", "type": "function", "function": {"name": "hours", "arguments": "{}"}}],
    }
    pending = {"role": "tool", "tool_call_id": "1", "content": "IN_PROGRESS"}
    assert sync_all(sync, [tool_call, pending]) == [
        Injection("assistant", "called hours({})"),
        Injection("tool", "<tool_response>\nIN_PROGRESS\n</tool_response>"),
    ]
    done = {**pending, "content": '{"open": "9-5"}'}  # the aggregator fills the result in place
    assert sync_all(sync, [tool_call, done]) == [Injection("tool", '<tool_response>\n{"open": "9-5"}\n</tool_response>')]


def test_text_parts_are_kept_and_other_content_skipped() -> None:
    sync = ContextSync()
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {}}]},
        LLMSpecificMessage(llm="openai", message={"role": "user", "content": "x"}),
        {"role": "developer", "content": "  "},
    ]
    assert sync_all(sync, messages) == [Injection("user", "Look:")]


def test_an_app_message_inside_a_caller_turn_is_injected_and_the_echo_is_not() -> None:
    """Issue 12 finding 9: the app appends "yes" while the caller's "yes, book it for seven" is
    in the ledger. The app's message reaches the call; the aggregator's echo does not."""
    sync = ContextSync()
    sync.record_own("user", "yes, book it for seven")
    app_message = {"role": "user", "content": "yes"}
    echo = {"role": "user", "content": "yes, book it for seven"}
    assert sync_all(sync, [app_message]) == [Injection("user", "yes")]
    assert sync_all(sync, [app_message, echo]) == []
    # And the other order: the echo first, then the app's message.
    sync = ContextSync()
    sync.record_own("user", "yes, book it for seven")
    assert sync_all(sync, [echo, app_message]) == [Injection("user", "yes")]


def test_own_turns_match_whole_and_in_order() -> None:
    sync = ContextSync()
    sync.record_own("user", "book it")
    sync.record_own("user", "for seven")
    # A message that is only part of a turn, or that spans a turn cut in half, is not ours.
    assert sync_all(sync, [{"role": "user", "content": "book"}]) == [Injection("user", "book")]
    assert sync_all(sync, [{"role": "user", "content": "book"}, {"role": "user", "content": "book it for seven"}]) == []
