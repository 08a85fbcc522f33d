"""A voice prompt is prefilled in chunks between ticks (issue 12 finding 7)."""

import asyncio

import numpy as np
import torch

from pipecat_michi.engine.config import EngineConfig
from pipecat_michi.engine.engine import DuplexEngine
from pipecat_michi.model.michi import MichiModel



@torch.no_grad()
def test_chunked_voice_prefill_equals_whole_prefill() -> None:
    from tests.model.test_michi import TINY as tiny_config

    torch.manual_seed(0)
    model = MichiModel(tiny_config).eval()
    clip = 0.1 * torch.randn(7 * tiny_config.frame_samples, generator=torch.Generator().manual_seed(3))
    whole, chunked = model.new_cache(1), model.new_cache(1)
    model.prefill_voice(clip, whole, 0)
    embeds = model.encode_voice(clip)
    for start in range(0, embeds.shape[1], 3):
        model.prefill_voice_embeds(embeds[:, start : start + 3], chunked, 0)
    assert int(chunked.lengths[0]) == int(whole.lengths[0]) == 7 and int(chunked.pinned[0]) == 7
    torch.testing.assert_close(chunked.keys, whole.keys, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(chunked.values, whole.values, rtol=1e-4, atol=1e-5)


async def test_a_long_voice_prompt_is_prefilled_in_separate_jobs_so_other_calls_tick_between() -> None:
    engine = DuplexEngine(EngineConfig(preset="tiny", device="cpu", slot_capacity=2, prefill_chunk_frames=2))
    await engine.start()
    try:
        jobs: list[str] = []
        run = engine._run

        async def recording_run(fn, *args):  # noqa: ANN001, ANN202 - wraps the engine's executor hop
            jobs.append(getattr(fn, "__name__", "?"))
            return await run(fn, *args)

        engine._run = recording_run  # type: ignore[method-assign]
        voice = np.zeros(10 * engine.frame_samples, dtype=np.int16)
        session = await engine.open_session(voice_prompt=voice)
        assert jobs.count("prefill_voice_embeds") == 5  # 10 frames in chunks of 2, each its own job
        await session.close()
    finally:
        await engine.stop()
