"""Function calling through the model's text channel: tools in, tool calls out, results back in.

The duplex model has no tool API: it reads tools and results as text and writes calls as text
in its inner-monologue channel. The format is the Hermes / Qwen2.5 one SmolLM2-Instruct's
family reads (see ``docs/function_calling.md``):

- tools: a system turn listing each tool's JSON schema inside ``<tools>...</tools>``;
- a call: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` in the bot's text;
- a result: a ``tool`` turn holding ``<tool_response>...</tool_response>``.

Pure functions and one streaming parser, no I/O: ``MichiLLMService`` wires them to the call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
from pydantic import BaseModel, ConfigDict

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"

#: The content Pipecat's assistant aggregator gives a tool message while its call runs.
PENDING_TOOL_RESULT = "IN_PROGRESS"

#: How the tool list is written into the prompt: ``hermes`` (full JSON schemas, for subword
#: backbones such as SmolLM2) or ``compact`` (one line per tool, for the byte tokenizer's
#: small context).
ToolPromptFormat = Literal["hermes", "compact"]


class ToolSpec(BaseModel):
    """One tool as the model reads it: an OpenAI-style function schema."""

    model_config = ConfigDict(frozen=True)

    name: str
    description: str = ""
    properties: dict[str, Any] = {}
    required: list[str] = []

    def schema_dict(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": {"type": "object", "properties": self.properties, "required": self.required},
            },
        }


def tool_specs(tools: Any) -> list[ToolSpec]:
    """The function tools of a ``ToolsSchema`` or a list of ``FunctionSchema``/direct functions
    (as ``LLMContext`` and the settings hold them); none for ``NOT_GIVEN``/``None``."""
    if isinstance(tools, list):
        tools = ToolsSchema(standard_tools=tools)
    if not isinstance(tools, ToolsSchema):
        return []
    return [
        ToolSpec(
            name=schema.name,
            description=schema.description or "",
            properties=dict(schema.properties or {}),
            required=list(schema.required or []),
        )
        for schema in tools.standard_tools
    ]


def render_tools_prompt(tools: list[ToolSpec], style: ToolPromptFormat = "hermes") -> str:
    """The system text that tells the model which tools it has and how to call them."""
    if style == "compact":
        lines = [
            f"- {tool.name}({', '.join(tool.properties)}): {tool.description}".rstrip(": ") for tool in tools
        ]
        return "\n".join(
            [
                "Tools you may call:",
                *lines,
                f'To call one, write {CALL_OPEN}{{"name": NAME, "arguments": {{...}}}}{CALL_CLOSE}',
            ]
        )
    listing = "\n".join(json.dumps(tool.schema_dict(), ensure_ascii=False) for tool in tools)
    return (
        "# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{listing}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n"
        f'{CALL_OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{CALL_CLOSE}'
    )


def render_tool_result(content: str) -> str:
    """A tool message's content as the text of the model's ``tool`` turn."""
    return f"<tool_response>\n{content}\n</tool_response>"


# --- calls out of the text stream ---------------------------------------------------------


@dataclass(frozen=True)
class RawToolCall:
    """The text the model wrote between ``<tool_call>`` and ``</tool_call>``.

    ``terminated`` is False when the turn ended (or the call grew past its limit) before the
    closing tag.
    """

    body: str
    terminated: bool = True


class ToolCallParser:
    """Takes tool calls out of a stream of bot text, piece by piece.

    ``feed`` returns what may be spoken now and the calls the piece closed. Text that may be the
    start of ``<tool_call>`` is held back until the next piece settles it, so no part of a call's
    text is ever returned as speech. ``end_turn`` flushes: held text that never became a call is
    returned; a call still open is returned unterminated.

    Args:
        max_call_chars: A call body longer than this is cut off and reported unterminated, so a
            model that never closes its call cannot swallow the rest of the conversation.
    """

    def __init__(self, max_call_chars: int = 4096) -> None:
        self._max_call_chars = max_call_chars
        self._buffer = ""
        self._in_call = False

    @property
    def in_call(self) -> bool:
        """Inside a call's text (since ``<tool_call>``, before ``</tool_call>``)."""
        return self._in_call

    def feed(self, text: str) -> tuple[str, list[RawToolCall]]:
        """One piece of bot text -> (text to speak, calls closed by this piece)."""
        self._buffer += text
        spoken: list[str] = []
        calls: list[RawToolCall] = []
        while True:
            if self._in_call:
                end = self._buffer.find(CALL_CLOSE)
                if end < 0:
                    if len(self._buffer) > self._max_call_chars:
                        calls.append(RawToolCall(self._buffer, terminated=False))
                        self._buffer, self._in_call = "", False
                    break
                calls.append(RawToolCall(self._buffer[:end]))
                self._buffer = self._buffer[end + len(CALL_CLOSE) :]
                self._in_call = False
            else:
                start = self._buffer.find(CALL_OPEN)
                if start < 0:
                    keep = _partial_tag_length(self._buffer)
                    spoken.append(self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    break
                spoken.append(self._buffer[:start])
                self._buffer = self._buffer[start + len(CALL_OPEN) :]
                self._in_call = True
        return "".join(spoken), calls

    def end_turn(self) -> tuple[str, list[RawToolCall]]:
        """The turn is over: flush held text, and an open call as unterminated."""
        buffer, in_call = self._buffer, self._in_call
        self._buffer, self._in_call = "", False
        if in_call:
            return "", [RawToolCall(buffer, terminated=False)]
        return buffer, []


def _partial_tag_length(text: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``<tool_call>``."""
    for length in range(min(len(text), len(CALL_OPEN) - 1), 0, -1):
        if CALL_OPEN.startswith(text[-length:]):
            return length
    return 0


# --- a call's text -> a checked call ------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    """A well-formed call of a known tool."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ToolCallError:
    """A call the model got wrong; ``message`` is told back to the model as the tool's result."""

    name: str | None
    message: str


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "null": (type(None),),
}


def parse_tool_call(raw: RawToolCall, tools: list[ToolSpec]) -> list[ToolCall | ToolCallError]:
    """Check a call's text against the tools: JSON, a known name, arguments as the schema says.

    The body is one ``{"name", "arguments"}`` object or a list of them (SmolLM2's larger
    siblings write lists); each becomes a ``ToolCall`` or a ``ToolCallError``.
    """
    if not raw.terminated:
        return [ToolCallError(None, f"tool call not closed with {CALL_CLOSE}: {raw.body[:200]!r}")]
    try:
        decoded = json.loads(raw.body)
    except json.JSONDecodeError as e:
        return [ToolCallError(None, f"tool call is not valid JSON ({e.msg} at {e.pos}): {raw.body[:200]!r}")]
    items = decoded if isinstance(decoded, list) else [decoded]
    if not items:
        return [ToolCallError(None, "tool call is an empty list")]
    return [_check_call(item, {tool.name: tool for tool in tools}) for item in items]


def _check_call(item: Any, tools: dict[str, ToolSpec]) -> ToolCall | ToolCallError:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return ToolCallError(None, 'tool call must be a JSON object {"name": ..., "arguments": {...}}')
    name = item["name"]
    tool = tools.get(name)
    if tool is None:
        return ToolCallError(name, f"unknown function {name!r}; available: {sorted(tools) or 'none'}")
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):  # some models quote the arguments object
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return ToolCallError(name, f"arguments of {name!r} must be a JSON object, got {arguments!r}")
    problems = [f"missing required argument {key!r}" for key in tool.required if key not in arguments]
    for key, value in arguments.items():
        schema = tool.properties.get(key)
        if schema is None:
            problems.append(f"unknown argument {key!r}")
            continue
        problems.extend(_type_problems(key, value, schema))
    if problems:
        return ToolCallError(name, f"bad arguments for {name!r}: {'; '.join(problems)}")
    return ToolCall(name, arguments)


def _type_problems(key: str, value: Any, schema: dict[str, Any]) -> list[str]:
    expected = schema.get("type")
    kinds = expected if isinstance(expected, list) else [expected] if expected else []
    allowed = tuple(t for kind in kinds for t in _JSON_TYPES.get(kind, (object,)))
    # JSON booleans are ints in Python; an integer or number argument must not accept them.
    if allowed and (not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)):
        return [f"argument {key!r} must be {expected}, got {json.dumps(value)}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"argument {key!r} must be one of {schema['enum']}, got {json.dumps(value)}"]
    return []


def render_tool_error(error: ToolCallError) -> str:
    """The tool result that tells the model what it got wrong, so it can try again or say so."""
    return render_tool_result(json.dumps({"error": error.message}, ensure_ascii=False))
