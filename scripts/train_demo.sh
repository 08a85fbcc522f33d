#!/usr/bin/env bash
# Train a demo checkpoint on a local espeak-ng corpus, stage by stage (codec, listening,
# speaking, joint); about 10 minutes on 2 CPU cores with the default tiny preset.
#
#   bash scripts/train_demo.sh                      # -> checkpoints/demo/joint
#   PRESET=michi-nano bash scripts/train_demo.sh    # SmolLM2 backbone: ~5-15 s/step on 2 cores
#
# The result loads with EngineConfig(checkpoint="checkpoints/demo/joint"). Re-running resumes
# each stage from its last checkpoint (a finished stage is not trained again).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PRESET=${PRESET:-tiny}
OUT=${OUT:-checkpoints/demo}
CORPUS=${CORPUS:-artifacts/espeak-corpus}
LR=${LR:-1e-3}
CODEC_STEPS=${CODEC_STEPS:-500}
LISTENING_STEPS=${LISTENING_STEPS:-800}
SPEAKING_STEPS=${SPEAKING_STEPS:-350}
JOINT_STEPS=${JOINT_STEPS:-200}
train=.venv/bin/michi-train

if [[ ! -f $CORPUS/manifest.jsonl ]]; then
  $train corpus --out-dir "$CORPUS" --utterances 40 --dialogues 24
fi
common=(--manifest "$CORPUS/manifest.jsonl" --lr "$LR" --batch-size 8 --resume)
backbone=()
if [[ $PRESET == michi-nano ]]; then backbone=(--backbone-gguf smollm2); fi

SECONDS=0
$train codec "${common[@]}" --preset "$PRESET" "${backbone[@]}" --steps "$CODEC_STEPS" --out-dir "$OUT/codec"
echo "train_demo: codec done at ${SECONDS}s" >&2
$train listening "${common[@]}" --init "$OUT/codec" --steps "$LISTENING_STEPS" --out-dir "$OUT/listening"
echo "train_demo: listening done at ${SECONDS}s" >&2
$train speaking "${common[@]}" --init "$OUT/listening" --steps "$SPEAKING_STEPS" --out-dir "$OUT/speaking"
echo "train_demo: speaking done at ${SECONDS}s" >&2
$train joint "${common[@]}" --init "$OUT/speaking" --steps "$JOINT_STEPS" --out-dir "$OUT/joint"
echo "train_demo: joint done at ${SECONDS}s; checkpoint $OUT/joint" >&2
