#!/usr/bin/env bash
# Sweep the hard-exit threshold δ on a split and print: δ, ROUGE-L, mean exit layer, ms per sentence;
# then draw the Figure-2-style plot of exit layers.
# Usage: scripts/sweep_threshold.sh DATA_BIN CHECKPOINT [SPLIT] [OUT_DIR] [DELTAS...]
# (GEN_FLAGS in the environment are added to fairseq-generate, e.g. "--batch-size 1".)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: sweep_threshold.sh DATA_BIN CHECKPOINT [SPLIT] [OUT_DIR] [DELTAS...]}
CKPT=${2:?usage: sweep_threshold.sh DATA_BIN CHECKPOINT [SPLIT] [OUT_DIR] [DELTAS...]}
SPLIT=${3:-valid}
OUT=${4:-$(dirname "$CKPT")/sweep}
shift $(( $# < 4 ? $# : 4 ))
DELTAS=${*:-0 0.25 0.5 0.75 1.0}
BIN=${VENV:-.venv}/bin
export PATH="$(realpath -m "$BIN"):$PATH"
[ -f "$CKPT" ] || { echo "sweep_threshold.sh: no checkpoint at $CKPT" >&2; exit 1; }
mkdir -p "$OUT"
plot_args=()
printf "%-6s %8s %10s %10s\n" "delta" "ROUGE-L" "mean_exit" "ms/sent"
for d in $DELTAS; do
  log="$OUT/generate-$SPLIT-delta$d.txt"
  fairseq-generate "$DATA" --user-dir elmer_fairseq --task nat_early_exit --path "$CKPT" \
    --gen-subset "$SPLIT" --exit-threshold "$d" --print-exit-layers --cpu --batch-size 64 \
    --post-process sentencepiece ${GEN_FLAGS:-} > "$log" 2> "$log.err"
  rouge=$("$BIN/python" -m elmer_fairseq.score --generate-log "$log" --json 2>/dev/null \
          | "$BIN/python" -c "import json,sys; print('%.2f' % json.load(sys.stdin)['ROUGE-L'])")
  mean=$(elmer-exit-layers "$log" | grep -o "mean [0-9.]*" | cut -d' ' -f2)
  # fairseq-generate: "Translated N sentences (M tokens) in Xs"
  ms=$(grep -o "Translated [0-9,]* sentences ([0-9,]* tokens) in [0-9.]*s" "$log.err" \
       | awk '{gsub(",","",$2); gsub("s$","",$NF); printf "%.2f", 1000*$NF/$2}')
  printf "%-6s %8s %10s %10s\n" "$d" "$rouge" "$mean" "$ms"
  plot_args+=(--log "$d=$log")
done
"$BIN/python" scripts/plot_exit_layers.py "${plot_args[@]}" --out "$OUT/exit_layers.png" > /dev/null
echo "plot: $OUT/exit_layers.png"
