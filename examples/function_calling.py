"""A booking bot with two tools on MichiAI: the Pipecat function-calling flow, unchanged.

Tools go into the ``LLMContext`` and handlers are registered with ``register_function``, as for
any Pipecat LLM. ``MichiLLMService`` writes the tools into the call's prompt, takes the calls the
model writes in its text channel out of its speech, runs them through
``LLMService.run_function_calls`` and injects each result back into the live call as a tool turn::

    context = LLMContext([{"role": "system", "content": SYSTEM}], tools=TOOLS)
    service = MichiLLMService(system_instruction=SYSTEM)
    service.register_function("check_availability", check_availability)
    service.register_function("book_table", book_table)

    .venv/bin/python -m examples.function_calling

The embedded engine's demo weights do not call tools (a trained backbone does; see
``docs/function_calling.md`` for the format and ``benchmarks/tool_calls.py`` for SmolLM2's hit
rate), so by default this run plays ``SCRIPT`` as the model's text channel on the embedded call:
the parser, the handlers, Pipecat's frames and the injection of the results are all real.
``--no-script`` runs the model's own text unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipecat.adapters.llm.schemas.function_schema import FunctionSchema  # noqa: E402
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema  # noqa: E402
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.processors.aggregators.llm_context import LLMContext  # noqa: E402
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair  # noqa: E402
from pipecat.services.llm_service import FunctionCallParams  # noqa: E402

from examples.smoke import run_smoke_call  # noqa: E402
from pipecat_michi.engine.call import DuplexBackend, DuplexCall, LocalEngine  # noqa: E402
from pipecat_michi.engine.config import EngineConfig  # noqa: E402
from pipecat_michi.engine.engine import StepResult  # noqa: E402
from pipecat_michi.service import MichiLLMService, MichiServiceParams  # noqa: E402

SYSTEM = "You are Michi, the phone host of Trattoria Sole. Check availability before you book."
TOOLS = ToolsSchema(
    standard_tools=[
        FunctionSchema(
            name="check_availability",
            description="Free tables for a number of guests at a time.",
            properties={"people": {"type": "integer"}, "time": {"type": "string"}},
            required=["people", "time"],
        ),
        FunctionSchema(
            name="book_table",
            description="Book a table.",
            properties={"name": {"type": "string"}, "people": {"type": "integer"}, "time": {"type": "string"}},
            required=["name", "people", "time"],
        ),
    ]
)
#: What the model "writes" in the scripted run, one piece per 80 ms step (calls split mid-JSON).
SCRIPT = [
    "Let me check. ",
    '<tool_call>{"name": "check_availability", ',
    '"arguments": {"people": 2, "time": "19:00"}}</tool_call>',
    "We have a table at seven. ",
    '<tool_call>{"name": "book_table", "arguments": {"name": "Ada", ',
    '"people": 2, "time": "19:00"}}</tool_call>',
    "You're booked, Ada.",
]


async def check_availability(params: FunctionCallParams) -> None:
    print(f"call: check_availability({dict(params.arguments)})")
    result = {"available": True, "table": 7}
    print(f"result: {result}")
    await params.result_callback(result)


async def book_table(params: FunctionCallParams) -> None:
    print(f"call: book_table({dict(params.arguments)})")
    result = {"confirmation": "TS-1907", **params.arguments}
    print(f"result: {result}")
    await params.result_callback(result)


@dataclasses.dataclass
class ScriptedTextCall:
    """A live call whose text channel plays ``texts``, one piece per step (the caller's side is
    silenced too: the demo model's transcript of the test tone would keep the user's turn open)."""

    inner: DuplexCall
    texts: list[str]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def receive(self, timeout: float | None = None) -> StepResult:
        result = await self.inner.receive(timeout)
        text = self.texts.pop(0) if self.texts else ""
        return dataclasses.replace(result, bot_text=text, transcript="", speaking=bool(text) or result.speaking)


class ScriptedTextBackend:
    """Opens calls on ``inner`` whose text channel plays ``SCRIPT``."""

    def __init__(self, inner: DuplexBackend) -> None:
        self.inner = inner

    async def open_call(self, *args: Any, **kwargs: Any) -> ScriptedTextCall:
        return ScriptedTextCall(await self.inner.open_call(*args, **kwargs), list(SCRIPT))

    async def close(self) -> None:
        await self.inner.close()


def booking_bot(backend: DuplexBackend) -> tuple[Pipeline, LLMContext]:
    """The bot: aggregators around a ``MichiLLMService`` that has the two tools."""
    context = LLMContext([{"role": "system", "content": SYSTEM}], tools=TOOLS)
    pair = LLMContextAggregatorPair(context)
    # The tiny demo model's context is small: the compact tool list fits it.
    service = MichiLLMService(
        backend, system_instruction=SYSTEM, params=MichiServiceParams(tool_prompt_format="compact")
    )
    service.register_function("check_availability", check_availability)
    service.register_function("book_table", book_table)
    return Pipeline([pair.user(), service, pair.assistant()]), context


def embedded_engine() -> LocalEngine:
    """The embedded default (tiny preset, CPU) with a KV window that holds the tools prompt."""
    return LocalEngine(EngineConfig(device="cpu", slot_capacity=1, kv_capacity=2048))


async def run_booking_call(backend: DuplexBackend, seconds: float = 2.0) -> LLMContext:
    """A call of ``seconds`` of test tone with the bot; the context it leaves. Closes ``backend``."""
    pipeline, context = booking_bot(backend)
    try:
        await run_smoke_call(pipeline, seconds)
    finally:
        await backend.close()
    return context


def main() -> None:
    parser = argparse.ArgumentParser(description="A booking bot with two tools on the embedded MichiAI engine.")
    parser.add_argument("--no-script", action="store_true", help="the model's own text, not SCRIPT")
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    engine = embedded_engine()
    backend: DuplexBackend = engine if args.no_script else ScriptedTextBackend(engine)
    context = asyncio.run(run_booking_call(backend, args.seconds))
    print("context:")
    for message in context.messages:
        print(f"  {message}")


if __name__ == "__main__":
    main()
