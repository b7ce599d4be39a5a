#!/usr/bin/env bash
# The demo: bundled sample corpus -> data-bin/sample -> a tiny elmer_nat trained on CPU
# through fairseq-train -> fairseq-generate on the test split -> ROUGE/BLEU.
# Knobs (environment): MAX_UPDATE, SAVE_DIR, POST_EOS, EXTRA_TRAIN_FLAGS, and
# PRETRAINED=checkpoints/pretrain-tiny/checkpoint_last.pt to fine-tune a scripts/pretrain.sh
# checkpoint (the data is then encoded with its sentencepiece model and dictionary).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
export PATH="$(realpath -m "$BIN"):$PATH"
DATA=${DATA:-data-bin/sample}
PRETRAINED=${PRETRAINED:-}
PREP_ENV=()
INIT_FLAGS=()
if [ -n "$PRETRAINED" ]; then
  [ -f "$PRETRAINED" ] || { echo "demo.sh: PRETRAINED=$PRETRAINED does not exist" >&2; exit 1; }
  PT_DATA=$(dirname "$PRETRAINED")  # pretrain.sh leaves spm.model and dict.txt there
  DATA=${DATA_PT:-data-bin/sample-pt}
  PREP_ENV=(SPM_MODEL="$PT_DATA/spm.model" DICT="$PT_DATA/dict.txt")
  INIT_FLAGS=(--finetune-from-model "$PRETRAINED")
fi
VOCAB=${VOCAB:-4000}
SAVE=${SAVE_DIR:-checkpoints/demo}
MAX_UPDATE=${MAX_UPDATE:-700}
POST_EOS=${POST_EOS:-ignore}
start=$(date +%s)

if [ ! -f "$DATA/dict.src.txt" ]; then
  echo "== preparing $DATA (sentencepiece $VOCAB, fairseq-preprocess; log: $DATA.prepare.log)"
  env "${PREP_ENV[@]}" PYTHON=$BIN/python bash scripts/prepare_sample.sh data-bin/sample-raw "$DATA" "$VOCAB" \
    > "$DATA.prepare.log" 2>&1 || { tail -20 "$DATA.prepare.log"; exit 1; }
fi

rm -rf "$SAVE"
mkdir -p "$(dirname "$SAVE")"
# Canvas: the sample summaries are short and do not grow with the docstring
# (train targets: median 12, 99th percentile 37 pieces incl. </s>), so T = 32 fixed.
fairseq-train "$DATA" --user-dir elmer_fairseq \
  --task nat_early_exit --arch elmer_nat_tiny --criterion lplm --label-smoothing 0.1 \
  --canvas-len-a 0 --canvas-len-b 32 --post-eos "$POST_EOS" \
  --optimizer adam --adam-betas '(0.9, 0.98)' --lr 1e-3 --lr-scheduler inverse_sqrt \
  --warmup-updates 200 --clip-norm 1.0 --max-tokens 4096 --max-update "$MAX_UPDATE" \
  --save-dir "$SAVE" --no-epoch-checkpoints --cpu --num-workers 0 --seed 1 \
  --log-format simple --log-interval 50 "${INIT_FLAGS[@]}" ${EXTRA_TRAIN_FLAGS:-} 2>&1 | tee "$SAVE.train.log" \
  | grep -E "\| (train|valid) \||done training"
train_end=$(date +%s)

fairseq-generate "$DATA" --user-dir elmer_fairseq --task nat_early_exit \
  --path "$SAVE/checkpoint_best.pt" --gen-subset test --cpu --batch-size 64 \
  --post-process sentencepiece > "$SAVE.generate-test.txt" 2> "$SAVE.generate-test.err"
grep -E "^Generate|Translated" "$SAVE.generate-test.txt" "$SAVE.generate-test.err" | sed 's/^[^:]*://' || true
end=$(date +%s)

echo "== sample test split (200 docstring -> summary pairs), one-pass ELMER, last-layer exit"
"$BIN/python" -m elmer_fairseq.score --generate-log "$SAVE.generate-test.txt"
echo "== wall time: train $((train_end - start)) s, total $((end - start)) s"
