"""Console scripts without their extra: one line naming the extra, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("script", "hidden", "extra"),
    [("serve", "ray", "serve"), ("train", "matplotlib", "train"), ("simulate", "torch", "engine")],
)
def test_missing_extra_says_what_to_install(script: str, hidden: str, extra: str) -> None:
    # None in sys.modules makes `import <hidden>` raise ModuleNotFoundError, as when not installed.
    probe = f"import sys; sys.modules[{hidden!r}] = None; sys.argv = ['x', '--help']; import pipecat_michi.cli as c; c.{script}()"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"pip install 'pipecat-michi[{extra}]'" in done.stderr
    assert "Traceback" not in done.stderr
