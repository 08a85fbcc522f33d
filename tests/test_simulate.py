"""michi-simulate runs a short call end to end over a LocalEngine and writes the bot's audio."""

from pathlib import Path

import numpy as np
import pytest
import soundfile

from pipecat_michi.simulate import main


def test_simulated_call_writes_audio_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.wav"
    main(["--fast", "--frames", "10", "--out", str(out)])
    info = soundfile.info(str(out))
    assert (info.frames, info.samplerate, info.channels) == (10 * 1920, 24000, 1)
    assert info.subtype == "PCM_16"
    printed = capsys.readouterr().out
    assert "p50" in printed
    assert len([line for line in printed.splitlines() if line[:5].strip().isdigit()]) == 10


def test_caller_wav_is_resampled_to_the_model_rate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    caller = tmp_path / "caller.wav"
    stereo_8k = 0.2 * np.random.default_rng(0).standard_normal((8000 // 2, 2))  # 0.5 s at 8 kHz
    soundfile.write(str(caller), stereo_8k, 8000)
    out = tmp_path / "bot.wav"
    main(["--fast", "--wav", str(caller), "--out", str(out)])
    # 0.5 s at 24 kHz = 12000 samples -> 7 whole frames (the last one padded with silence).
    assert soundfile.info(str(out)).frames == 7 * 1920


def test_a_system_prompt_the_engine_refuses_ends_the_run_with_its_reason(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="does not fit the call's context: pinned context"):
        main(["--fast", "--frames", "2", "--system", "x" * 5000, "--out", str(tmp_path / "x.wav")])
