"""The main job: ``python -m agents call`` places a simulated phone call and reports on it."""

import numpy as np
import soundfile
import torch

from agents.__main__ import DEMO_CHECKPOINTS, main
from pipecat_michi.model.checkpoint import save_checkpoint
from pipecat_michi.model.config import MichiConfig
from pipecat_michi.model.michi import MichiModel


def _caller_wav(tmp_path, seconds: float = 1.0):  # noqa: ANN001, ANN202
    caller = tmp_path / "caller.wav"
    t = np.arange(int(16000 * seconds)) / 16000
    soundfile.write(caller, 0.3 * np.sin(2 * np.pi * 220 * t), 16000)  # at 16 kHz
    return caller


def test_simulated_call_records_the_bot_and_prints_the_figures(tmp_path, capsys, monkeypatch) -> None:
    # Random weights: that model speaks over the caller at once, so bot audio is certain.
    monkeypatch.setattr("agents.__main__.DEMO_CHECKPOINTS", ())
    out = tmp_path / "bot.wav"
    main(["call", "--wav", str(_caller_wav(tmp_path)), "--listen-s", "0.5", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "model: tiny preset, random weights" in printed
    assert "== call summary ==" in printed and "model step: p50" in printed
    audio, rate = soundfile.read(out, dtype="int16")
    assert rate == 8000 and len(audio) > 0  # the bot's side, as the caller heard it


def test_the_call_runs_on_the_demo_checkpoint_by_default_or_on_the_one_named(tmp_path, capsys) -> None:
    caller = str(_caller_wav(tmp_path, seconds=0.5))
    main(["call", "--wav", caller, "--listen-s", "0.3", "--out", str(tmp_path / "bot.wav")])
    printed = capsys.readouterr().out
    default = next(path for path in DEMO_CHECKPOINTS if (path / "config.json").is_file())  # one ships in assets/
    assert f"model: checkpoint {default}" in printed and "== call summary ==" in printed

    torch.manual_seed(7)
    checkpoint = save_checkpoint(MichiModel(MichiConfig.preset("tiny")), tmp_path / "ckpt")
    main(["call", "--wav", caller, "--listen-s", "0.3", "--out", str(tmp_path / "bot.wav"),
          "--checkpoint", str(checkpoint)])
    printed = capsys.readouterr().out
    assert f"model: checkpoint {checkpoint}" in printed and "== call summary ==" in printed
