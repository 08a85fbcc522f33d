"""Keeping a duplex call's context in step with a Pipecat ``LLMContext``.

A text LLM re-reads the whole context on every turn. A duplex call cannot: what it has read is
in its KV cache, so each new ``LLMContextFrame`` must be reduced to what the call has not read
yet. Two sources of messages need telling apart:

- messages the app adds (``LLMMessagesAppendFrame``, tool results, a RAG passage): inject them;
- messages the context aggregators recorded from *our own* frames (the user transcripts we
  pushed upstream, the bot text we pushed downstream): the call produced those itself, and
  injecting them would make the model read its own words twice.

``ContextSync`` keeps the fingerprints of the messages already accounted for (a common prefix
with the new context means "nothing changed there") and a per-role ledger of the text we
emitted, as the units we emitted it in (a user transcript turn, a piece of bot text). A new
message is ours only when its text (whitespace aside: the aggregators join and strip pieces)
equals whole consecutive units of the ledger, in order; anything else is injected. A substring
is not enough: an app's "yes" must not vanish because the caller said "yes, book it for seven".
Every skip is logged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from loguru import logger
from pipecat.processors.aggregators.llm_context import LLMContextMessage, LLMSpecificMessage

from pipecat_michi.service.tools import PENDING_TOOL_RESULT, render_tool_result

# Own text remembered per role, in characters of whitespace-free text and in units. Far more
# than a turn: only text not yet seen back in the context waits here.
_MAX_LEDGER_CHARS = 20_000
_MAX_LEDGER_UNITS = 2_000


@dataclass(frozen=True)
class Injection:
    """One message to prefill into the call as a ``role`` turn."""

    role: str
    text: str


def _compact(text: str) -> str:
    return "".join(text.split())


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal parts: keep the text ones
        return " ".join(
            part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return str(content)


def message_injection(message: LLMContextMessage) -> Injection | None:
    """The text a context message contributes to the call, or ``None`` when it has none.

    Tool calls an assistant message carries are rendered as text (calls the model wrote itself
    are recorded as its own and skipped); a tool result becomes the backbone's
    ``<tool_response>`` turn; provider-specific messages are skipped.
    """
    if isinstance(message, LLMSpecificMessage) or not isinstance(message, dict):
        logger.debug(f"skipping a provider-specific context message: {message!r}")
        return None
    role = str(message.get("role", "user"))
    text = _content_text(message.get("content"))
    calls = [
        f"{call['function']['name']}({call['function'].get('arguments', '')})"
        for call in message.get("tool_calls") or []
        if isinstance(call, dict) and isinstance(call.get("function"), dict)
    ]
    if calls:
        text = "\n".join([text, *(f"called {c}" for c in calls)]).strip()
    if not text.strip():
        return None
    if role == "tool":
        text = render_tool_result(text)
    return Injection(role=role, text=text)


def is_pending_tool_result(message: LLMContextMessage) -> bool:
    """A tool message whose call still runs: Pipecat's aggregator fills its result in later."""
    return isinstance(message, dict) and message.get("role") == "tool" and message.get("content") == PENDING_TOOL_RESULT


def _fingerprint(message: LLMContextMessage) -> str:
    if isinstance(message, dict):
        return json.dumps(message, sort_keys=True, default=str)
    return repr(message)


class ContextSync:
    """What of an ``LLMContext`` one call has read; turns each new context into injections.

    Use ``new_messages`` then, for each, ``take`` (skips our own outputs) and ``commit`` once the
    injection succeeded: a sync cut short (the call died, the frame was interrupted) resumes at
    the first uncommitted message on the next context.
    """

    def __init__(self) -> None:
        self._seen: list[str] = []
        self._own: dict[str, list[str]] = {}
        self._own_tool_calls: set[str] = set()

    def reset(self) -> None:
        """A new call: it has read nothing and said nothing."""
        self._seen.clear()
        self._own.clear()
        self._own_tool_calls.clear()

    def record_own_tool_call(self, tool_call_id: str) -> None:
        """A tool call the call wrote itself: the assistant message recording it is not injected.

        By id, not through the text ledger: the aggregator adds the call's message while the
        bot text spoken before it is still unrecorded, so the order of the ledger would not hold.
        """
        self._own_tool_calls.add(tool_call_id)

    def record_own(self, role: str, text: str) -> None:
        """Text the call itself produced (or was opened with) as a ``role`` turn, or a piece
        of one: a unit the context may echo back alone or joined with the units after it."""
        unit = _compact(text)
        if not unit:
            return
        ledger = self._own.setdefault(role, [])
        ledger.append(unit)
        while len(ledger) > _MAX_LEDGER_UNITS or (len(ledger) > 1 and sum(map(len, ledger)) > _MAX_LEDGER_CHARS):
            ledger.pop(0)

    def new_messages(self, messages: list[LLMContextMessage]) -> list[tuple[str, LLMContextMessage]]:
        """The messages past the prefix already accounted for, with their fingerprints.

        When an earlier message changed (``LLMMessagesUpdateFrame``, a summariser, a tool
        result filled in place), everything from the first change on counts as new: the call
        cannot forget what it read, so the rewrite reaches it as added text.
        """
        fingerprints = [_fingerprint(m) for m in messages]
        common = 0
        while common < min(len(fingerprints), len(self._seen)) and fingerprints[common] == self._seen[common]:
            common += 1
        if common < len(self._seen):
            logger.warning(
                f"the LLM context was rewritten from message {common} on; the duplex call keeps what it "
                "already read and receives the changed messages as new text"
            )
            del self._seen[common:]
        return list(zip(fingerprints[common:], messages[common:]))

    def take(self, message: LLMContextMessage) -> Injection | None:
        """The injection ``message`` needs, or ``None`` (no text, or the call's own output)."""
        if self._is_own_tool_call(message):
            logger.debug("skipping a tool call the call wrote itself")
            return None
        injection = message_injection(message)
        if injection is None:
            return None
        compact = _compact(injection.text)
        ledger = self._own.get(injection.role, [])
        match = _whole_units(ledger, compact)
        if match is None:
            return injection
        start, end = match
        if start:
            # Ours. Units before the match never came back (dropped by an interruption).
            logger.debug(f"forgetting {start} own {injection.role} unit(s) the context never echoed")
        del ledger[:end]
        logger.debug(f"skipping a {injection.role} message the call produced itself ({len(compact)} chars)")
        return None

    def _is_own_tool_call(self, message: LLMContextMessage) -> bool:
        if not isinstance(message, dict) or message.get("content") or not message.get("tool_calls"):
            return False
        ids = {call.get("id") for call in message["tool_calls"] if isinstance(call, dict)}
        if not ids <= self._own_tool_calls:
            return False
        self._own_tool_calls -= ids
        return True

    def commit(self, fingerprint: str) -> None:
        """Mark the next message as accounted for."""
        self._seen.append(fingerprint)


def _whole_units(units: list[str], text: str) -> tuple[int, int] | None:
    """``(start, end)`` of the first run ``units[start:end]`` whose concatenation is ``text``."""
    for start in range(len(units)):
        if not text.startswith(units[start]):
            continue
        joined = ""
        for end in range(start, len(units)):
            joined += units[end]
            if joined == text:
                return start, end + 1
            if len(joined) >= len(text) or not text.startswith(joined):
                break
    return None
