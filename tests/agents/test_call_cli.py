"""The main job: ``python -m agents call`` places a simulated phone call and reports on it."""

import numpy as np
import soundfile

from agents.__main__ import main


def test_simulated_call_records_the_bot_and_prints_the_figures(tmp_path, capsys) -> None:
    caller = tmp_path / "caller.wav"
    t = np.arange(16000) / 16000
    soundfile.write(caller, 0.3 * np.sin(2 * np.pi * 220 * t), 16000)  # 1 s at 16 kHz
    out = tmp_path / "bot.wav"
    main(["call", "--wav", str(caller), "--listen-s", "0.5", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "== call summary ==" in printed and "model step: p50" in printed
    audio, rate = soundfile.read(out, dtype="int16")
    assert rate == 8000 and len(audio) > 0  # the bot's side, as the caller heard it
