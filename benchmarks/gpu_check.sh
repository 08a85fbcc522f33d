#!/usr/bin/env bash
# The GPU check, in one command, from the repository root of an installed checkout on a CUDA machine:
#
#     bash benchmarks/gpu_check.sh            # PYTHON=... to pick the interpreter (default .venv/bin/python)
#
# 1. the CUDA tests (pytest -m cuda: bf16 and int8 against CPU float32, a CUDA-graph engine);
# 2. step latency, tiny and michi-530m, batch 1/8/32/64/128, bf16: plain, int8, compiled
#    (CUDA graphs), int8 + compiled;
# 3. worker load with michi-530m (bf16, int8 + compiled) at 1/8/32/64 real-time calls;
# then one table of step p50/p99 (ms) to paste into the README. Full logs stay in $LOGS.
set -uo pipefail

PYTHON=${PYTHON:-.venv/bin/python}
LOGS=${LOGS:-artifacts/gpu_check}
BATCHES=(1 8 32 64 128)
export HF_HUB_OFFLINE=1
mkdir -p "$LOGS"

"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "gpu_check: torch sees no CUDA device")' || exit 1
"$PYTHON" -c 'import torch; print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")' | tee "$LOGS/device.txt"

echo "== CUDA tests"
"$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tee "$LOGS/tests.log" | tail -3
tests_line=$(tail -1 "$LOGS/tests.log")

# name|extra step_latency flags
MODES=("bf16|" "bf16+int8|--quantize int8" "bf16+compile|--compile" "bf16+int8+compile|--quantize int8 --compile")
for preset in tiny michi-530m; do
  for mode in "${MODES[@]}"; do
    name=${mode%%|*}; flags=${mode#*|}
    echo "== step latency: $preset $name"
    # shellcheck disable=SC2086 # flags split on purpose
    "$PYTHON" benchmarks/step_latency.py --device cuda --dtype bfloat16 --presets "$preset" \
      --batches "${BATCHES[@]}" $flags > "$LOGS/step_${preset}_${name}.log" 2>&1 \
      || echo "   FAILED (see $LOGS/step_${preset}_${name}.log)"
  done
done

echo "== worker load: michi-530m"
"$PYTHON" benchmarks/worker_load.py --preset michi-530m --device cuda --dtype bfloat16 --calls 1 8 32 64 \
  --frames 100 > "$LOGS/worker_load_bf16.log" 2> "$LOGS/worker_load_bf16.err" || echo "   FAILED (see $LOGS/worker_load_bf16.err)"
"$PYTHON" benchmarks/worker_load.py --preset michi-530m --device cuda --dtype bfloat16 --quantize int8 --compile \
  --ready-timeout-s 1800 --calls 1 8 32 64 --frames 100 > "$LOGS/worker_load_int8_compile.log" \
  2> "$LOGS/worker_load_int8_compile.err" \
  || echo "   FAILED (see $LOGS/worker_load_int8_compile.err)"

echo
echo "## GPU check: $(cat "$LOGS/device.txt")"
echo "CUDA tests: $tests_line"
echo
header="| preset | mode |"; rule="|---|---|"
for b in "${BATCHES[@]}"; do header+=" b$b p50/p99 ms |"; rule+="---|"; done
echo "$header"; echo "$rule"
for preset in tiny michi-530m; do
  for mode in "${MODES[@]}"; do
    name=${mode%%|*}
    # step_latency rows: batch steps p50 p99 ...
    cells=$(awk -v want="${BATCHES[*]}" '
      BEGIN { n = split(want, b, " ") }
      $1 ~ /^[0-9]+$/ && NF >= 6 { p[$1] = sprintf("%.1f / %.1f", $3, $4) }
      END { for (i = 1; i <= n; i++) printf " %s |", (b[i] in p ? p[b[i]] : "-") }
    ' "$LOGS/step_${preset}_${name}.log")
    echo "| $preset | $name |$cells"
  done
done
echo
for run in bf16 int8_compile; do
  echo "worker load, michi-530m ($run):"
  cat "$LOGS/worker_load_$run.log"
done
