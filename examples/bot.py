#
# A Pipecat bot on MichiAI: copy this file into your app.
#
# MichiAI listens, thinks and speaks in one model, so the pipeline has one service where a
# cascade has STT -> LLM -> TTS. Shaped like Pipecat's own examples (the development runner):
#
#   pip install 'pipecat-michi[engine]' 'pipecat-ai[webrtc,websocket,runner]'
#   python bot.py                 # browser: open http://localhost:7860/client
#   python bot.py -t twilio -x YOUR_PUBLIC_HOST   # phone: point the number's webhook here
#
# Without MICHI_WORKER_URL the model runs in this process (the demo checkpoint, on the CPU: it
# takes turns and answers within ~70 ms, in speech-like sound, not words). With a GPU worker
# (michi-worker) set MICHI_WORKER_URL and MICHI_WORKER_TOKEN (see .env.example); then this
# process needs no torch (`pip install pipecat-michi`).
#
"""A MichiAI voice bot for Pipecat's development runner (``-t webrtc`` or ``-t twilio``)."""

import os

from dotenv import load_dotenv
from loguru import logger
from pipecat.frames.frames import LLMRunFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.runner.types import RunnerArguments
from pipecat.runner.utils import create_transport
from pipecat.transports.base_transport import BaseTransport, TransportParams
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams
from pipecat.workers.runner import WorkerRunner

from pipecat_michi import MichiLLMService, RemoteWorker

load_dotenv(override=True)

SYSTEM_INSTRUCTION = "You are a friendly voice assistant. Keep your answers short."

# Audio in and out; MichiAI hears the raw audio (no VAD, no STT) and decides itself when to speak.
transport_params = {
    "webrtc": lambda: TransportParams(audio_in_enabled=True, audio_out_enabled=True),
    "twilio": lambda: FastAPIWebsocketParams(audio_in_enabled=True, audio_out_enabled=True),
}


def michi_service() -> MichiLLMService:
    """On a GPU worker when MICHI_WORKER_URL is set, else in this process on the demo checkpoint."""
    url = os.getenv("MICHI_WORKER_URL")
    if url:
        backend = RemoteWorker(url, token=os.environ["MICHI_WORKER_TOKEN"])
        return MichiLLMService(backend=backend, system_instruction=SYSTEM_INSTRUCTION)
    return MichiLLMService(system_instruction=SYSTEM_INSTRUCTION)


async def run_bot(transport: BaseTransport, runner_args: RunnerArguments) -> None:
    logger.info("Starting bot")
    context = LLMContext([{"role": "system", "content": SYSTEM_INSTRUCTION}])
    aggregators = LLMContextAggregatorPair(context)

    pipeline = Pipeline(
        [
            transport.input(),
            aggregators.user(),
            michi_service(),  # in place of stt, llm and tts
            transport.output(),
            aggregators.assistant(),
        ]
    )
    worker = PipelineWorker(pipeline, params=PipelineParams(enable_metrics=True))

    @transport.event_handler("on_client_connected")
    async def on_client_connected(transport, client):
        logger.info("Client connected")
        await worker.queue_frames([LLMRunFrame()])

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(transport, client):
        logger.info("Client disconnected")
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=runner_args.handle_sigint)
    await runner.run(worker)


async def bot(runner_args: RunnerArguments) -> None:
    """Main bot entry point, called by Pipecat's development runner."""
    transport = await create_transport(runner_args, transport_params)
    await run_bot(transport, runner_args)


if __name__ == "__main__":
    from pipecat.runner.run import main

    main()
