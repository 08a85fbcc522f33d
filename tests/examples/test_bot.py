"""examples/bot.py, the file Pipecat users copy: it starts under Pipecat's runner and builds
its service for both backends."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipecat_michi.worker.client import RemoteWorker

BOT = Path(__file__).resolve().parents[2] / "examples" / "bot.py"


def test_the_runner_starts_the_bot_file() -> None:
    done = subprocess.run([sys.executable, str(BOT), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--transport" in done.stdout


def test_the_service_runs_on_a_worker_when_one_is_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    from examples import bot

    assert set(bot.transport_params) == {"webrtc", "twilio"}
    monkeypatch.setenv("MICHI_WORKER_URL", "ws://127.0.0.1:9/v1/call")
    monkeypatch.setenv("MICHI_WORKER_TOKEN", "t")
    assert isinstance(bot.michi_service()._backend, RemoteWorker)
