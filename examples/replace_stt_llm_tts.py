"""Replace STT -> LLM -> TTS with MichiAI: three processors out, one in.

A cascade pipeline (any STT, LLM and TTS services)::

    pipeline = Pipeline([
        transport.input(),
        stt,                    # e.g. DeepgramSTTService(...)
        context.user(),
        llm,                    # e.g. OpenAILLMService(...)
        tts,                    # e.g. CartesiaTTSService(...)
        transport.output(),
        context.assistant(),
    ])

The same pipeline on MichiAI, which listens, thinks and speaks in one model::

    pipeline = Pipeline([
        transport.input(),
        context.user(),
        MichiLLMService(system_instruction=...),   # or backend=RemoteWorker(url, token)
        transport.output(),
        context.assistant(),
    ])

The context (``LLMContextAggregatorPair``), the transport and the rest of the app stay as they
were: the service pushes user transcripts upstream and bot text + audio downstream, so the
aggregators record the conversation as before, and ``LLMMessagesAppendFrame`` still adds to it
(the new message is injected into the live call). Without a GPU worker the embedded engine runs
the tiny preset (random weights) on CPU: the plumbing is real, the words are noise.

    .venv/bin/python -m examples.replace_stt_llm_tts            # transport-free smoke run
    .venv/bin/python -m examples.replace_stt_llm_tts --worker-url ws://HOST/v1/call --token T
"""

from __future__ import annotations

import argparse
import asyncio
import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipecat.frames.frames import Frame, TTSAudioRawFrame  # noqa: E402
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.processors.aggregators.llm_context import LLMContext  # noqa: E402
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair  # noqa: E402
from pipecat.processors.filters.identity_filter import IdentityFilter  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402

from examples.smoke import run_smoke_call  # noqa: E402
from pipecat_michi.service import MichiLLMService  # noqa: E402

SYSTEM = "You are Michi, a friendly voice assistant. Keep answers short."


def cascade_pipeline(transport, stt, llm, tts, context: LLMContextAggregatorPair) -> Pipeline:  # noqa: ANN001
    """Before: speech to text, a text LLM, text to speech."""
    return Pipeline([transport.input(), stt, context.user(), llm, tts, transport.output(), context.assistant()])


def michi_pipeline(transport, llm: MichiLLMService, context: LLMContextAggregatorPair) -> Pipeline:  # noqa: ANN001
    """After: the same pipeline with the three services replaced by one."""
    return Pipeline([transport.input(), context.user(), llm, transport.output(), context.assistant()])


class _SmokeTransport:
    """Stands in for a real transport: frames are queued into the pipeline; output is counted."""

    class _Output(FrameProcessor):
        def __init__(self) -> None:
            super().__init__()
            self.bot_audio_s = 0.0

        async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            if isinstance(frame, TTSAudioRawFrame):
                self.bot_audio_s += frame.num_frames / frame.sample_rate
            await self.push_frame(frame, direction)

    def __init__(self) -> None:
        self._input = IdentityFilter()
        self._output = self._Output()

    def input(self) -> IdentityFilter:
        return self._input

    def output(self) -> _Output:
        return self._output


async def smoke(args: argparse.Namespace) -> None:
    backend = None
    if args.worker_url:
        from pipecat_michi.worker.client import RemoteWorker

        backend = RemoteWorker(args.worker_url, args.token)
    transport = _SmokeTransport()
    context = LLMContextAggregatorPair(LLMContext([{"role": "system", "content": SYSTEM}]))
    pipeline = michi_pipeline(transport, MichiLLMService(backend), context)
    await run_smoke_call(pipeline, args.seconds)

    print(f"bot audio out: {transport.output().bot_audio_s:.2f} s")
    for message in context.user().context.messages:
        print(f"  {message['role']:>9}: {message['content'][:60]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="caller audio to send")
    parser.add_argument("--worker-url", default=None, help="a MichiAI GPU worker (default: embedded engine)")
    parser.add_argument("--token", default=None, help="bearer token for --worker-url")
    asyncio.run(smoke(parser.parse_args()))


if __name__ == "__main__":
    main()
