#!/usr/bin/env bash
# Bundled sample corpus (data-bin/sample-raw) -> sentencepiece -> fairseq-preprocess -> data-bin/sample.
# Usage: scripts/prepare_sample.sh [RAW_DIR] [OUT_DIR] [VOCAB_SIZE]
# With SPM_MODEL=... and DICT=... (e.g. from scripts/pretrain.sh) it reuses that sentencepiece
# model and dictionary instead of training new ones, so a pre-trained checkpoint fits the data.
set -euo pipefail
RAW=${1:-data-bin/sample-raw}
OUT=${2:-data-bin/sample}
VOCAB=${3:-4000}
PY=${PYTHON:-python}
# shellcheck source=scripts/bpe.sh
source "$(dirname "$0")/bpe.sh"
for f in train.src train.tgt valid.src valid.tgt test.src test.tgt; do
  [ -s "$RAW/$f" ] || { echo "prepare_sample.sh: missing $RAW/$f (make it with scripts/make_sample_data.py)" >&2; exit 1; }
done
SPM="$OUT.spm"
mkdir -p "$SPM"
DICT_FLAGS=()
if [ -n "${SPM_MODEL:-}" ]; then
  [ -s "$SPM_MODEL" ] && [ -s "${DICT:-}" ] || { echo "prepare_sample.sh: SPM_MODEL needs DICT (a dict.txt), both existing" >&2; exit 1; }
  cp "$SPM_MODEL" "$SPM/spm.model"
  DICT_FLAGS=(--srcdict "$DICT")
else
  bpe_train "$SPM/spm" "$VOCAB" "$RAW/train.src" "$RAW/train.tgt"
fi
pairs=()
for split in train valid test; do for side in src tgt; do pairs+=("$RAW/$split.$side:$SPM/$split.$side"); done; done
bpe_encode sentencepiece "$SPM/spm.model" "${pairs[@]}"
rm -rf "$OUT"
fairseq-preprocess --source-lang src --target-lang tgt \
  --trainpref "$SPM/train" --validpref "$SPM/valid" --testpref "$SPM/test" \
  --destdir "$OUT" --joined-dictionary --workers 2 "${DICT_FLAGS[@]}"
cp "$SPM/spm.model" "$OUT/spm.model"
