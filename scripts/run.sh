#!/usr/bin/env bash
# The main job: set up the venv, then run a simulated duplex call on the embedded default model.
# Arguments go to michi-simulate (e.g. --frames 20, --fast, --wav caller.wav).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
exec .venv/bin/michi-simulate "$@"
