#!/usr/bin/env bash
# The main job: set up the venv, then run MichiAI on the embedded default (tiny model, CPU).
# No arguments: a simulated phone call through the Twilio agent (prints transcripts and latency).
# `bash scripts/run.sh webrtc` serves the browser agent; `twilio` the phone bot; see --help.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
if ! command -v espeak-ng >/dev/null && [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
  # The simulated caller speaks with espeak-ng; without it the caller plays tone bursts.
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null; } \
    || echo "run: could not install espeak-ng; the simulated caller will play tones" >&2
fi
export HF_HUB_OFFLINE=1
# Loguru's default before the agent sets its own: no DEBUG lines from imports.
export LOGURU_LEVEL=${LOGURU_LEVEL:-INFO}
exec .venv/bin/python -m agents "$@"
