"""The duplex engine: lockstep batching that never mixes calls, clocks, injection, eviction."""

import asyncio

import numpy as np
import pytest
import torch

from pipecat_michi.engine.batch import SlotBatch
from pipecat_michi.engine.config import EngineConfig, load_model
from pipecat_michi.engine.engine import (
    DuplexEngine,
    EngineFullError,
    FrameOrderError,
    SessionClosedError,
    StepResult,
)
from pipecat_michi.engine.settings import SessionSettingsUpdate
from pipecat_michi.model.michi import Sampling, StepNoise

FRAME = 1920


def _audio(seed: int, frames: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((frames, FRAME)) * 3000).astype(np.int16)


def _config(**overrides) -> EngineConfig:
    # A long fill deadline: these tests are about batching, not about a loaded CI machine.
    overrides.setdefault("fill_after_ms", 5000.0)
    return EngineConfig(preset="tiny", device="cpu", slot_capacity=3, **overrides)


async def _call(
    engine: DuplexEngine, audio: np.ndarray, seed: int, prompt: str | None = None, **settings: float
) -> list[StepResult]:
    update = SessionSettingsUpdate(**({"seed": seed, "speak_threshold": 0.3} | settings))
    session = await engine.open_session(update, system_prompt=prompt)
    results = []
    for index, frame in enumerate(audio):
        session.push_audio(frame, index)
        results.append(await session.receive(timeout=10))
    await session.close()
    return results


def _same(a: list[StepResult], b: list[StepResult]) -> None:
    assert [r.frame_index for r in a] == [r.frame_index for r in b]
    for x, y in zip(a, b):
        assert (x.bot_text, x.transcript, x.speaking) == (y.bot_text, y.transcript, y.speaking)
        assert x.speak_prob == pytest.approx(y.speak_prob, abs=1e-5)
        if x.audio is not None:
            assert np.abs(x.audio.astype(int) - y.audio.astype(int)).max() <= 2


async def test_concurrent_calls_each_get_one_result_per_frame_equal_to_running_alone() -> None:
    audio_a, audio_b = _audio(1, 12), _audio(2, 12)
    async with DuplexEngine(_config()) as engine:
        together_a, together_b = await asyncio.gather(
            _call(engine, audio_a, seed=5, prompt="You are a helpful agent."),
            _call(engine, audio_b, seed=6),
        )
        assert engine.stats.ticks >= 12
    async with DuplexEngine(_config()) as engine:
        alone_a = await _call(engine, audio_a, seed=5, prompt="You are a helpful agent.")
    async with DuplexEngine(_config()) as engine:
        alone_b = await _call(engine, audio_b, seed=6)
    assert [r.frame_index for r in together_a] == list(range(12))
    assert not any(r.filled for r in together_a + together_b)
    _same(together_a, alone_a)
    _same(together_b, alone_b)
    assert any(r.speaking for r in together_a) and all(
        (r.audio is not None) == r.speaking for r in together_a
    )


async def test_missing_frame_is_filled_and_its_late_arrival_dropped() -> None:
    async with DuplexEngine(_config(fill_after_ms=30)) as engine:
        session = await engine.open_session()
        frames = _audio(3, 3)
        session.push_audio(frames[0], 0)
        first = await session.receive(timeout=5)
        # Frame 1 never comes in time: the tick after the deadline fills it with silence.
        second = await session.receive(timeout=5)
        assert (first.frame_index, first.filled) == (0, False)
        assert (second.frame_index, second.filled) == (1, True)
        dropped = engine.stats.dropped_input_frames
        session.push_audio(frames[1], 1)  # too late: its tick went by
        assert engine.stats.dropped_input_frames == dropped + 1
        # A frame a few ticks ahead of the clock waits for its tick and is used, not filled.
        assert session.next_frame_index is not None
        ahead = session.next_frame_index + 3
        session.push_audio(frames[2], ahead)
        while (result := await session.receive(timeout=5)).frame_index < ahead:
            assert result.filled
        assert (result.frame_index, result.filled) == (ahead, False)


async def test_bad_frames_are_refused() -> None:
    async with DuplexEngine(_config()) as engine:
        session = await engine.open_session()
        with pytest.raises(ValueError, match="1920 samples"):
            session.push_audio(np.zeros(100, dtype=np.int16))
        session.push_audio(np.zeros(FRAME, dtype=np.int16), 5)
        with pytest.raises(FrameOrderError):
            session.push_audio(np.zeros(FRAME, dtype=np.int16), 5)
        await session.close()
        with pytest.raises(SessionClosedError):
            session.push_audio(np.zeros(FRAME, dtype=np.int16), 6)


async def test_full_engine_rejects_at_once_and_a_closed_call_frees_its_slot() -> None:
    async with DuplexEngine(_config()) as engine:
        sessions = [await engine.open_session() for _ in range(3)]
        with pytest.raises(EngineFullError):
            await engine.open_session()
        assert engine.stats.rejected_sessions == 1
        await sessions[1].close()
        again = await engine.open_session()
        assert again.slot == 1 and engine.sessions_in_use == 3


async def test_injection_mid_call_grows_the_context_by_its_tokens() -> None:
    async with DuplexEngine(_config()) as engine:
        session = await engine.open_session(system_prompt="Be brief.")
        pinned = engine.kv_length(session)
        assert pinned == len(engine.tokenizer.encode("[system] Be brief.\n"))
        for index, frame in enumerate(_audio(4, 3)):
            session.push_audio(frame, index)
            await session.receive(timeout=5)
        before = engine.kv_length(session)
        text = "Store hours: 9 to 5. " * 4  # two prefill chunks
        result = await session.inject_text(text, role="document")
        assert result.token_count == len(engine.tokenizer.encode(f"[document] {text}\n"))
        assert result.kv_length == before + result.token_count
        session.push_audio(_audio(5, 1)[0], 3)
        step = await session.receive(timeout=5)
        assert step.kv_length == result.kv_length + 1


async def test_ring_eviction_keeps_long_calls_running_with_the_system_prompt_pinned() -> None:
    async with DuplexEngine(_config(kv_capacity=64)) as engine:
        session = await engine.open_session(system_prompt="Pinned.")
        pinned = engine.kv_length(session)
        lengths = []
        for index, frame in enumerate(_audio(6, 150)):
            session.push_audio(frame, index)
            lengths.append((await session.receive(timeout=5)).kv_length)
        assert max(lengths) <= 64
        assert min(lengths[100:]) > pinned  # evicted in blocks, never emptied
        assert int(engine._batch.cache.pinned[session.slot]) == pinned
        assert int(engine._batch.cache.positions[session.slot]) == pinned + 150


def test_a_full_call_sitting_out_a_tick_is_evicted_not_failed() -> None:
    # A call whose last step filled its KV window, inactive in the next (catch-up) tick.
    model, _ = load_model(_config())
    batch = SlotBatch(model, slot_capacity=2, kv_capacity=64, evict_fraction=0.125)
    batch.prefill_text(0, list(range(32)), pinned=False)
    batch.prefill_text(0, list(range(32)), pinned=False)
    assert batch.kv_length(0) == 64
    sampling, noise = Sampling.greedy(2), StepNoise(torch.zeros(2, model.config.codec.latent_dim), torch.zeros(2))
    out = batch.step(np.zeros((2, FRAME), dtype=np.float32), [False, True], sampling, noise)
    assert out.kv_lengths == [56, 1]  # slot 0 lost its oldest eighth and did not advance


async def test_a_stalled_reader_loses_its_oldest_outputs_not_the_others_time() -> None:
    async with DuplexEngine(_config(max_pending_outputs=4)) as engine:
        stalled, reader = await engine.open_session(), await engine.open_session()
        for index, frame in enumerate(_audio(7, 10)):
            stalled.push_audio(frame, index)
            reader.push_audio(frame, index)
            assert (await reader.receive(timeout=5)).frame_index == index
        assert stalled.pending_outputs() == 4
        assert engine.stats.dropped_outputs == 6
        assert (await stalled.receive(timeout=1)).frame_index == 6


async def test_closing_ends_the_output_stream() -> None:
    async with DuplexEngine(_config()) as engine:
        session = await engine.open_session()
        waiter = asyncio.create_task(session.receive(timeout=5))
        await asyncio.sleep(0)
        await session.close()
        with pytest.raises(SessionClosedError):
            await waiter


async def test_a_call_a_frame_behind_catches_up_instead_of_lagging_forever() -> None:
    async with DuplexEngine(_config()) as engine:
        first, second = await engine.open_session(), await engine.open_session()
        frames = _audio(8, 3)
        first.push_audio(frames[0], 0)
        assert (await first.receive(timeout=5)).frame_index == 0
        # The second call's clock starts just after that tick, and its next frame is already in.
        second.push_audio(frames[0], 0)
        second.push_audio(frames[1], 1)
        assert (await second.receive(timeout=5)).frame_index == 0  # stepped without waiting
        assert engine.stats.catch_up_ticks == 1
        first.push_audio(frames[1], 1)
        a, b = await first.receive(timeout=5), await second.receive(timeout=5)
        assert (a.frame_index, b.frame_index) == (1, 1)  # aligned again, one tick each
        assert engine.stats.filled_frames == 0 and engine.stats.catch_up_ticks == 1


async def test_an_injection_too_long_for_the_window_is_refused_whole() -> None:
    from pipecat_michi.engine.batch import ContextTooLongError

    async with DuplexEngine(_config(kv_capacity=64, prefill_chunk_tokens=8)) as engine:
        session = await engine.open_session()
        with pytest.raises(ContextTooLongError, match="pinned"):
            await session.inject_text("x" * 40, pinned=True)
        with pytest.raises(ContextTooLongError, match="split or shorten"):
            await session.inject_text("y" * 40)
        assert engine.kv_length(session) == 0  # no chunk of either stayed behind
        result = await session.inject_text("short", pinned=True)
        assert result.kv_length == result.token_count


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
async def test_a_call_runs_in_every_dtype(dtype: str) -> None:
    async with DuplexEngine(_config(dtype=dtype)) as engine:
        assert engine.model.dtype == getattr(torch, dtype)
        results = await _call(engine, _audio(1, 5), seed=5, prompt="You are a helpful agent.")
        assert engine._batch.cache.host_lengths[0] == 0  # the closed call's slot was reset
    assert [r.frame_index for r in results] == list(range(5))
    assert any(r.audio is not None for r in results) and all(r.kv_length for r in results)


async def _voiced_call(engine: DuplexEngine, audio: np.ndarray, seed: int, flow_temperature: float) -> list[StepResult]:
    return await _call(engine, audio, seed, temperature=0.0, speak_threshold=0.01, flow_temperature=flow_temperature)


async def test_flow_temperature_scales_the_speaking_heads_noise() -> None:
    # Greedy text: the seed reaches the call only through the speaking head's noise.
    audio = _audio(3, 6)
    async with DuplexEngine(_config()) as engine:
        steady = [await _voiced_call(engine, audio, seed, flow_temperature=0.0) for seed in (1, 2)]
        varied = [await _voiced_call(engine, audio, seed, flow_temperature=1.0) for seed in (1, 2)]
        half = await _voiced_call(engine, audio, 1, flow_temperature=0.5)
    assert all(r.speaking for r in steady[0] + varied[0])
    _same(*steady)  # no noise: the seed changes nothing
    assert any(not np.array_equal(a.audio, b.audio) for a, b in zip(*varied))

    def distance(x: list[StepResult], y: list[StepResult]) -> float:
        return float(sum(np.abs(a.audio.astype(int) - b.audio.astype(int)).mean() for a, b in zip(x, y)))

    # Half the noise lands between no noise and all of it (same seed, so the same draws).
    assert 0 < distance(half, steady[0]) < distance(varied[0], steady[0])


async def test_each_call_takes_the_floor_after_its_own_onset_frames_and_a_reused_slot_starts_over() -> None:
    audio = _audio(4, 6)
    async with DuplexEngine(EngineConfig(preset="tiny", device="cpu", slot_capacity=1, fill_after_ms=5000.0)) as engine:
        for onset in (3, 1, 3):  # one slot: each call reuses the last one's row and its state
            results = await _call(engine, audio, seed=2, speak_threshold=0.01, speak_onset_frames=onset)
            assert all(r.speak_prob > 0.01 for r in results)  # above the threshold from the first frame
            assert [r.speaking for r in results] == [False] * (onset - 1) + [True] * (7 - onset)
            assert all((r.audio is not None) == r.speaking for r in results)


async def test_calls_dialling_in_while_the_model_loads_share_one_load_not_bounded_by_the_open_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first calls of a process start the engine. Its load (minutes with a compiled step on a
    small CPU) is under the load limit, not the per-call open limit (before the fix a compiled
    michi-simulate timed out opening its call), and two callers racing for it get one model."""
    import time

    from pipecat_michi.engine import engine as engine_module
    from pipecat_michi.engine.call import LocalEngine

    loads = []

    def slow_load(config: EngineConfig):  # noqa: ANN202
        loads.append(config)
        time.sleep(0.6)  # stands in for a long load/compile (off the loop, in the model thread)
        return load_model(config)

    monkeypatch.setattr(engine_module, "load_model", slow_load)
    backend = LocalEngine(_config(), open_timeout_s=0.3)
    try:
        first, second = await asyncio.gather(backend.open_call(), backend.open_call())
        assert len(loads) == 1
        assert first.frame_samples == second.frame_samples == FRAME
        await first.close()
        await second.close()
    finally:
        await backend.close()

    # The load itself stays bounded: by the load limit.
    bounded = LocalEngine(_config(), load_timeout_s=0.05)
    try:
        with pytest.raises(TimeoutError):
            await bounded.open_call()
    finally:
        await bounded.close()


async def test_frames_still_queued_when_a_call_closes_are_counted_unheard() -> None:
    """A call that fell behind ends with frames nobody heard: the count says so (the main job's
    report and the worker's metrics read it), where before they vanished."""
    async with DuplexEngine(_config()) as engine:
        session = await engine.open_session()
        for index, frame in enumerate(_audio(4, 5)):
            session.push_audio(frame, index)
        # No await between the pushes and the close: no tick can have taken a frame.
        await session.close()
        assert engine.stats.unheard_frames_at_close == 5
        assert engine.stats.dropped_input_frames == 0
