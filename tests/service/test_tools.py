"""Function calling's pure parts: the tools prompt, the streaming call parser, call checking."""

from __future__ import annotations

import json

import pytest
from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
from pipecat.utils.types import NOT_GIVEN

from pipecat_michi.service.tools import (
    RawToolCall,
    ToolCall,
    ToolCallError,
    ToolCallParser,
    ToolSpec,
    parse_tool_call,
    render_tool_error,
    render_tool_result,
    render_tools_prompt,
    tool_specs,
)

WEATHER = FunctionSchema(
    name="get_weather",
    description="Current weather in a city.",
    properties={"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
    required=["city"],
)
BOOK = FunctionSchema(
    name="book_table",
    description="Book a table.",
    properties={"people": {"type": "integer"}, "time": {"type": "string"}, "extras": {"type": "object"}},
    required=["people", "time"],
)
TOOLS = tool_specs(ToolsSchema(standard_tools=[WEATHER, BOOK]))


def test_tool_specs_read_a_tools_schema_a_list_and_nothing() -> None:
    assert [t.name for t in TOOLS] == ["get_weather", "book_table"]
    assert TOOLS[0] == ToolSpec(
        name="get_weather",
        description="Current weather in a city.",
        properties={"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
        required=["city"],
    )
    assert tool_specs([WEATHER]) == TOOLS[:1]
    assert tool_specs(NOT_GIVEN) == [] and tool_specs(None) == []


def test_hermes_tools_prompt_exact_text() -> None:
    assert render_tools_prompt(TOOLS[:1]) == (
        "# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        "<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.", '
        '"parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", '
        '"enum": ["c", "f"]}}, "required": ["city"]}}}\n'
        "</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def test_compact_tools_prompt_exact_text() -> None:
    assert render_tools_prompt(TOOLS, "compact") == (
        "Tools you may call:\n"
        "- get_weather(city, unit): Current weather in a city.\n"
        "- book_table(people, time, extras): Book a table.\n"
        'To call one, write <tool_call>{"name": NAME, "arguments": {...}}</tool_call>'
    )


def test_tool_result_and_error_exact_text() -> None:
    assert render_tool_result('{"temp": 21}') == '<tool_response>\n{"temp": 21}\n</tool_response>'
    error = ToolCallError("x", "unknown function 'x'")
    assert render_tool_error(error) == '<tool_response>\n{"error": "unknown function \'x\'"}\n</tool_response>'


def feed_all(parser: ToolCallParser, pieces: list[str]) -> tuple[str, list[RawToolCall]]:
    spoken, calls = "", []
    for piece in pieces:
        text, closed = parser.feed(piece)
        spoken += text
        calls += closed
    text, closed = parser.end_turn()
    return spoken + text, calls + closed


CALL = '{"name": "book_table", "arguments": {"people": 2, "time": "19:00", "extras": {"notes": {"x": [1, 2]}}}}'
STREAM = f"Sure, one moment. <tool_call>{CALL}</tool_call> Booked <b>now</b>."


@pytest.mark.parametrize("split", range(len(STREAM) + 1))
def test_a_call_split_at_any_point_is_parsed_and_never_spoken(split: int) -> None:
    spoken, calls = feed_all(ToolCallParser(), [STREAM[:split], STREAM[split:]])
    assert spoken == "Sure, one moment.  Booked <b>now</b>."
    assert calls == [RawToolCall(CALL)]


def test_a_call_fed_one_character_at_a_time_leaks_nothing_of_its_text() -> None:
    parser = ToolCallParser()
    spoken = ""
    for char in STREAM:
        text, calls = parser.feed(char)
        spoken += text
        assert "tool_call" not in spoken and "book_table" not in spoken
    assert spoken + parser.end_turn()[0] == "Sure, one moment.  Booked <b>now</b>."


def test_two_calls_in_a_row_and_garbage_between() -> None:
    stream = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call><tool_call>nope</tool_call> <tool'
    spoken, calls = feed_all(ToolCallParser(), [stream[i : i + 3] for i in range(0, len(stream), 3)])
    assert spoken == " <tool"  # a partial tag at the end of the turn was ordinary text
    assert [c.body for c in calls] == ['{"name": "get_weather", "arguments": {"city": "Oslo"}}', "nope"]
    parsed = [parse_tool_call(c, TOOLS) for c in calls]
    assert parsed[0] == [ToolCall("get_weather", {"city": "Oslo"})]
    assert isinstance(parsed[1][0], ToolCallError) and "not valid JSON" in parsed[1][0].message


def test_an_unterminated_call_at_the_end_of_a_turn_is_reported_not_spoken() -> None:
    spoken, calls = feed_all(ToolCallParser(), ['Hi <tool_call>{"name": "get_we'])
    assert spoken == "Hi "
    assert calls == [RawToolCall('{"name": "get_we', terminated=False)]
    [error] = parse_tool_call(calls[0], TOOLS)
    assert isinstance(error, ToolCallError) and "not closed" in error.message


def test_a_call_that_never_closes_is_cut_off_at_its_limit() -> None:
    parser = ToolCallParser(max_call_chars=10)
    assert parser.feed("<tool_call>" + "x" * 5) == ("", [])
    assert parser.feed("x" * 10) == ("", [RawToolCall("x" * 15, terminated=False)])
    assert parser.feed(" after") == (" after", [])


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}', ToolCall("get_weather", {"city": "Oslo", "unit": "c"})),
        ('[{"name": "get_weather", "arguments": {"city": "Oslo"}}]', ToolCall("get_weather", {"city": "Oslo"})),
        ('{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}', ToolCall("get_weather", {"city": "Oslo"})),
        ('{"name": "send_email", "arguments": {}}', "unknown function 'send_email'"),
        ('{"name": "get_weather", "arguments": {}}', "missing required argument 'city'"),
        ('{"name": "get_weather", "arguments": {"city": 3}}', "argument 'city' must be string, got 3"),
        ('{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "k"}}', "must be one of ['c', 'f']"),
        ('{"name": "book_table", "arguments": {"people": true, "time": "7"}}', "argument 'people' must be integer"),
        ('{"name": "get_weather", "arguments": {"city": "Oslo", "when": 1}}', "unknown argument 'when'"),
        ('{"name": "get_weather", "arguments": [1]}', "must be a JSON object"),
        ('"get_weather"', "must be a JSON object"),
        ("[]", "empty list"),
    ],
)
def test_calls_are_checked_against_the_tool_schemas(body: str, expected: ToolCall | str) -> None:
    [result] = parse_tool_call(RawToolCall(body), TOOLS)
    if isinstance(expected, ToolCall):
        assert result == expected
    else:
        assert isinstance(result, ToolCallError) and expected in result.message
        json.loads(render_tool_error(result).split("\n")[1])  # the error reaches the model as JSON
