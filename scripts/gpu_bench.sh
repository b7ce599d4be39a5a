#!/usr/bin/env bash
# GPU figures in one step: scripts/benchmark.py on CUDA in fp32, fp16 and bf16 (when the device has it),
# each table printed and written to OUT_DIR/bench-cuda-<dtype>.{txt,json}.
# Usage: scripts/gpu_bench.sh DATA_BIN [OUT_DIR]
#   with trained checkpoints in the environment (any of ELMER, ELMER_SOFT, AR, NAT: their paths), it times
#   those at natural lengths on SPLIT (test); with none, untrained base-size models at forced lengths 16 and
#   64 (latency does not depend on the weights). THRESHOLDS (default "1 3") are the hard-exit δ values;
#   EXTRA_FLAGS go to benchmark.py (e.g. "--masked-too --compile", or "--bf16-generation-too": the fp32 table
#   also times the ELMER_SOFT model with --bf16-generation).
# Exit status 3, and nothing run, when torch sees no CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
if [ -x "$BIN/python" ]; then export PATH="$(realpath -m "$BIN"):$PATH"; fi
DATA=${1:?usage: scripts/gpu_bench.sh DATA_BIN [OUT_DIR]}
OUT=${2:-docs/benchmarks/gpu}
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" \
  || { echo "gpu_bench.sh: torch sees no CUDA device; nothing run" >&2; exit 3; }
mkdir -p "$OUT"
models=()
for kind in ELMER ELMER_SOFT AR NAT; do
  path=${!kind:-}
  if [ -n "$path" ]; then
    flag=--$(echo "$kind" | tr 'A-Z_' 'a-z-')
    models+=("$flag" "$path")
  fi
done
if [ ${#models[@]} -eq 0 ]; then models=(--size base --lengths 16 64 --max-sentences 50 --large-batch 64); fi
python -c "import torch; p = torch.cuda.get_device_properties(0); print(f'device: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}')"
dtypes="fp32 fp16"
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_bf16_supported() else 1)"; then dtypes="$dtypes bf16"; fi
read -r -a thresholds <<< "${THRESHOLDS:-1 3}"
for dtype in $dtypes; do
  echo "== $dtype"
  # shellcheck disable=SC2086
  python scripts/benchmark.py --data "$DATA" --split "${SPLIT:-test}" --device cuda --dtype "$dtype" "${models[@]}" \
    --thresholds "${thresholds[@]}" --json "$OUT/bench-cuda-$dtype.json" ${EXTRA_FLAGS:-} | tee "$OUT/bench-cuda-$dtype.txt"
done
