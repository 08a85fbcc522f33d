"""The core install's promise: MichiLLMService over a RemoteWorker imports no torch."""

from __future__ import annotations

import subprocess
import sys

_PROBE = """
import sys
import pipecat_michi
assert "torch" not in sys.modules, "import pipecat_michi loaded torch"
from pipecat_michi import MichiLLMService, MichiSettings, RemoteWorker, __version__
service = MichiLLMService(backend=RemoteWorker("ws://127.0.0.1:9/v1/call", token="t"), system_instruction="hi")
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "transformers", "pipecat_michi.engine.engine", "pipecat_michi.model")))
print(",".join(loaded))
"""


def test_remote_worker_service_imports_no_torch() -> None:
    # A fresh interpreter: this test process has torch loaded already.
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"the remote path loaded: {done.stdout.strip()}"


def test_public_names_resolve() -> None:
    import pipecat_michi

    for name in pipecat_michi.__all__:
        assert getattr(pipecat_michi, name) is not None
