"""The main job: ``python -m agents`` places a simulated phone call and reports what the caller heard."""

import numpy as np
import soundfile
import torch

import shutil

import pytest

from agents.__main__ import default_checkpoint, main
from agents.report import CallTimeline
from pipecat_michi.model.checkpoint import save_checkpoint
from pipecat_michi.model.config import MichiConfig
from pipecat_michi.model.michi import MichiModel

RATE = 8000


def _caller_wav(tmp_path, seconds: float = 1.0):  # noqa: ANN001, ANN202
    caller = tmp_path / "caller.wav"
    t = np.arange(int(16000 * seconds)) / 16000
    soundfile.write(caller, 0.3 * np.sin(2 * np.pi * 220 * t), 16000)  # at 16 kHz
    return caller


def test_simulated_call_writes_the_stereo_wav_the_timeline_and_the_summary(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    checkpoint = save_checkpoint(MichiModel(MichiConfig.preset("tiny")), tmp_path / "ckpt")
    out = tmp_path / "out"
    main(["--wav", str(_caller_wav(tmp_path)), "--listen-s", "0.5", "--out-dir", str(out), "--checkpoint", str(checkpoint)])
    printed = capsys.readouterr().out
    assert f"model: {checkpoint}" in printed
    assert "== what the caller heard ==" in printed and "barge-ins:" in printed and "model step: p50" in printed
    audio, rate = soundfile.read(out / "call.wav", dtype="int16")
    assert rate == RATE and audio.shape[1] == 2
    assert np.abs(audio[:, 0]).max() > 1000  # the caller on the left; the bot's side is the right
    assert (out / "call_timeline.png").stat().st_size > 1000 and (out / "call.log").is_file()


@pytest.mark.slow
@pytest.mark.timeout(600)  # the first GGUF backbone load of a session converts it: minutes on a busy CI machine
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="the default caller speaks with espeak-ng")
def test_the_default_call_reports_what_the_model_heard_against_the_callers_words(tmp_path, capsys) -> None:
    main(["call", "--listen-s", "0.5", "--out-dir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert f"model: {default_checkpoint()}" in printed and "== what the caller heard ==" in printed
    heard = next(line for line in printed.splitlines() if line.startswith("the model heard: "))
    said = next(line for line in printed.splitlines() if line.startswith("the caller said: "))
    assert "transcript WER" in said
    if default_checkpoint().name == "michi-nano-listening":  # the model that hears: some words through
        assert len(heard.removeprefix("the model heard: ").strip("'\" ")) > 10


def _tone(seconds: float) -> np.ndarray:
    return (3000 * np.sin(np.arange(int(seconds * RATE)) * 0.3)).astype(np.int16)


def test_the_timeline_counts_what_a_listener_notices() -> None:
    # Caller speaks 0-1 s and 2-3 s; the bot answers 0.2 s after the first turn and also cuts
    # into the second one at 2.5 s (one 20 ms message of 160 samples per arrival).
    voice = np.concatenate([_tone(1.0), np.zeros(RATE, np.int16), _tone(1.0)])
    bot_at = [1.2 + 0.02 * i for i in range(25)] + [2.5 + 0.02 * i for i in range(25)]
    timeline = CallTimeline.from_chunks(RATE, [(0.0, voice)], [(t, _tone(0.02)) for t in bot_at], [], clears=1)
    figures = timeline.figures()
    assert (figures.caller_turns, figures.bot_turns, figures.bot_over_caller, figures.barge_ins) == (2, 2, 1, 1)
    assert figures.ttfa_ms[0] is not None and abs(figures.ttfa_ms[0] - 200) <= 20
    assert figures.ttfa_ms[1] is None  # the bot said nothing after the caller's second turn


async def test_the_recorder_writes_a_live_calls_report(tmp_path) -> None:
    from pipecat.frames.frames import EndFrame, InputAudioRawFrame, TTSAudioRawFrame
    from pipecat.processors.frame_processor import FrameDirection

    from agents.report import CallRecorder

    recorder = CallRecorder(tmp_path, "call-1")
    caller, bot = recorder.caller_tap(), recorder.bot_tap()
    for tap in (caller, bot):
        tap.push_frame = _swallow  # no pipeline around the taps: frames go nowhere
    await caller.process_frame(InputAudioRawFrame(_tone(0.5).tobytes(), RATE, 1), FrameDirection.DOWNSTREAM)
    await bot.process_frame(TTSAudioRawFrame(_tone(0.5).tobytes(), 24000, 1), FrameDirection.DOWNSTREAM)
    await bot.process_frame(EndFrame(), FrameDirection.DOWNSTREAM)
    audio, rate = soundfile.read(tmp_path / "call-1.wav", dtype="int16")
    assert rate == 16000 and audio.shape[1] == 2 and np.abs(audio).max(axis=0).min() > 1000
    assert (tmp_path / "call-1_timeline.png").is_file()


async def _swallow(*_args, **_kwargs) -> None:  # noqa: ANN002, ANN003
    return None
