"""The wheel as a Pipecat user gets it: built, installed into a fresh venv outside the checkout
(core, then ``[engine]``), and one short embedded call on the packaged demo checkpoint.

Slow (a few minutes: pip resolves pipecat-ai's dependencies and installs torch) but run in CI:
it is the only test that sees what the wheel ships. pip's cache is reused between runs, and
torch is constrained to 2.13.0, the CPU wheel on this machine's disk (pip's machine config
finds it; a newer release would be a multi-GB CUDA build).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest
from loguru import logger

REPO = Path(__file__).resolve().parents[2]
# Without PYTHONPATH (the test run's may name the checkout): only the venv's copy may import.
CLEAN_ENV = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}

# Run from a directory outside the checkout, so only the installed wheel can be imported.
_CORE_PROBE = """
import sys
from pipecat_michi import MichiLLMService, MichiSettings, RemoteWorker, __version__
MichiLLMService(backend=RemoteWorker("ws://127.0.0.1:9/v1/call", token="t"))
assert "torch" not in sys.modules
try:
    from pipecat_michi import LocalEngine
    LocalEngine()
except ModuleNotFoundError as e:
    print("no engine:", e.name)
print("core ok", __version__)
"""

_CALL_PROBE = """
import asyncio
import numpy as np
from pipecat_michi import LocalEngine
from pipecat_michi.engine.config import DEMO_CHECKPOINT

async def main():
    backend = LocalEngine()
    assert backend.engine.config.checkpoint == DEMO_CHECKPOINT and (DEMO_CHECKPOINT / "model.safetensors").is_file()
    call = await backend.open_call(system_prompt="You are a host.")
    texts = []
    for index in range(25):
        await call.send_audio(np.zeros(call.frame_samples, dtype=np.int16), index)
        texts.append((await call.receive(timeout=30)).bot_text)
    await call.close()
    await backend.close()
    assert len(texts) == 25  # one result per frame: the packaged model runs a call
    from pipecat_michi.model.ctc_decoder import english_lexicon
    assert len(english_lexicon().word_logprobs) > 100_000  # the transcript decoder's lexicon ships
    print("call ok", DEMO_CHECKPOINT)

asyncio.run(main())
"""


def _pip(python: Path, *args: str) -> None:
    # --no-compile: pip byte-compiles every module it installs (torch's thousands) unless told
    # not to; the probes import what they use, and Python compiles that on import.
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-compile", *args], env=CLEAN_ENV, check=True,
                   timeout=900)


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_wheel_installs_and_calls_outside_the_checkout(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(REPO)], check=True, timeout=600
    )
    (wheel,) = dist.glob("pipecat_michi-*.whl")
    logger.info(f"wheel {wheel.name}: {wheel.stat().st_size / 1e6:.1f} MB")

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    outside = tmp_path / "app"
    outside.mkdir()

    started = time.perf_counter()
    _pip(python, str(wheel))
    logger.info(f"core install: {time.perf_counter() - started:.0f} s, venv {_size_mb(env_dir):.0f} MB")
    core = subprocess.run([str(python), "-c", _CORE_PROBE], cwd=outside, env=CLEAN_ENV, capture_output=True, text=True, timeout=120)
    assert core.returncode == 0, core.stderr
    assert "no engine: torch" in core.stdout and "core ok" in core.stdout

    constraints = tmp_path / "constraints.txt"
    constraints.write_text("torch==2.13.0\n")
    started = time.perf_counter()
    _pip(python, f"{wheel}[engine]", "-c", str(constraints))
    logger.info(f"[engine] install: {time.perf_counter() - started:.0f} s, venv {_size_mb(env_dir):.0f} MB")
    call = subprocess.run([str(python), "-c", _CALL_PROBE], cwd=outside, env=CLEAN_ENV, capture_output=True, text=True, timeout=300)
    assert call.returncode == 0, call.stderr
    assert "call ok" in call.stdout and str(env_dir) in call.stdout
    shutil.rmtree(env_dir)
