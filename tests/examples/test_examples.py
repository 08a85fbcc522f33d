"""The examples' building blocks in real pipelines: retrieval injected once per call, a recorded call,
the booking bot's tool calls."""

from __future__ import annotations

import asyncio
import json
import wave
from pathlib import Path

import numpy as np
import pytest
from pipecat.frames.frames import InputAudioRawFrame, LLMRunFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.tests.utils import SleepFrame, run_test

from examples.function_calling import ScriptedTextBackend, run_booking_call
from examples.rag_injection import BM25, DOCUMENTS, RetrievalInjector
from examples.record_call import record_smoke_call
from pipecat_michi.engine.call import LocalEngine
from pipecat_michi.service import MichiLLMService
from tests.service.conftest import tiny_engine
from tests.service.service_fakes import FRAME, RATE, SILENT, ScriptedBackend, ScriptedCall, Step

pytestmark = pytest.mark.timeout(60)

SYSTEM = "You are the host of Trattoria Sole."
QUESTION = "what are your opening hours"


def test_bm25_ranks_the_hours_document_first() -> None:
    index = BM25(DOCUMENTS)
    ranked = index.rank("when do you open")
    assert ranked[0][0] == "hours" and ranked[0][1] > 0
    assert all(score == 0 for _, score in ranked[1:])  # no other document mentions opening
    assert index.rank("is there parking")[0][0] == "address"
    assert all(score == 0 for _, score in index.rank("what is the weather like"))


async def test_a_transcribed_question_injects_its_passage_once_per_call() -> None:
    quiet = [SILENT] * 8  # long enough to end the user's turn
    script = [Step(transcript=QUESTION), *quiet, Step(transcript=QUESTION), *quiet]
    call = ScriptedCall(script)
    context = LLMContext([{"role": "system", "content": SYSTEM}])
    pair = LLMContextAggregatorPair(context)
    injector = RetrievalInjector(BM25(DOCUMENTS), context)
    service = MichiLLMService(ScriptedBackend(call), system_instruction=SYSTEM)
    # One 24 kHz model frame each: one scripted step per frame.
    frames = [InputAudioRawFrame(bytes(FRAME * 2), RATE, 1) for _ in script]

    await asyncio.wait_for(
        run_test(
            Pipeline([pair.user(), injector, service, pair.assistant()]),
            frames_to_send=[LLMRunFrame(), SleepFrame(0.1), *frames, SleepFrame(0.3)],
            pipeline_params=PipelineParams(audio_out_sample_rate=RATE),
            start_timeout=10,
        ),
        timeout=30,
    )

    # The question was asked twice; its passage reached the call once, as one new message.
    (injected,) = call.injected
    assert injected.role == "developer" and not injected.pinned
    assert injected.text == f"Reference for the caller's question: {DOCUMENTS['hours']}"
    references = [m for m in context.messages if m["role"] == "developer"]
    assert [m["content"] for m in references] == [injected.text]
    # The caller's turns were recorded by the aggregator, and not injected back into the call.
    assert QUESTION in " ".join(m["content"] for m in context.messages if m["role"] == "user")


async def test_the_recorded_smoke_call_has_both_sides_and_a_transcript(tmp_path: Path) -> None:
    backend = LocalEngine(engine=tiny_engine())
    try:
        recorder = await asyncio.wait_for(record_smoke_call(tmp_path, seconds=1.0, backend=backend), timeout=30)
    finally:
        await backend.close()

    with wave.open(str(recorder.wav_path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (2, 2, 24000)
        stereo = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16).reshape(-1, 2)
    assert len(stereo) >= 0.9 * 24000  # the second of caller audio, less the resampler's delay
    caller, bot = stereo[:, 0], stereo[:, 1]
    assert np.count_nonzero(caller) > 0.5 * 24000  # the caller's tone, on the left
    assert np.count_nonzero(bot) > 0  # the (random, talkative) bot, on the right

    turns = [json.loads(line) for line in recorder.transcript_path.read_text(encoding="utf-8").splitlines()]
    assert turns and {t["role"] for t in turns} <= {"user", "assistant"}
    for turn in turns:
        assert isinstance(turn["text"], str) and turn["started_at"] and turn["offset_s"] >= 0
    assert all("interrupted" in t for t in turns if t["role"] == "assistant")


async def test_the_booking_bot_calls_both_tools_and_records_their_results(capsys: pytest.CaptureFixture[str]) -> None:
    backend = ScriptedTextBackend(LocalEngine(engine=tiny_engine()))
    context = await asyncio.wait_for(run_booking_call(backend, seconds=1.5), timeout=30)

    calls = [m["tool_calls"][0]["function"] for m in context.messages if m.get("tool_calls")]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("check_availability", {"people": 2, "time": "19:00"}),
        ("book_table", {"name": "Ada", "people": 2, "time": "19:00"}),
    ]
    results = [json.loads(m["content"]) for m in context.messages if m["role"] == "tool"]
    assert results[0] == {"available": True, "table": 7} and results[1]["confirmation"] == "TS-1907"
    spoken = " ".join(m["content"] for m in context.messages if m["role"] == "assistant" and m.get("content"))
    assert spoken == "Let me check. We have a table at seven. You're booked, Ada."
    printed = capsys.readouterr().out
    assert "call: book_table({'name': 'Ada', 'people': 2, 'time': '19:00'})" in printed
    assert "result: {'available': True, 'table': 7}" in printed
