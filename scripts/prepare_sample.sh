#!/usr/bin/env bash
# Bundled sample corpus (data-bin/sample-raw) -> sentencepiece -> fairseq-preprocess -> data-bin/sample.
# Usage: scripts/prepare_sample.sh [RAW_DIR] [OUT_DIR] [VOCAB_SIZE]
set -euo pipefail
RAW=${1:-data-bin/sample-raw}
OUT=${2:-data-bin/sample}
VOCAB=${3:-4000}
PY=${PYTHON:-python}
for f in train.src train.tgt valid.src valid.tgt test.src test.tgt; do
  [ -s "$RAW/$f" ] || { echo "prepare_sample.sh: missing $RAW/$f (make it with scripts/make_sample_data.py)" >&2; exit 1; }
done
SPM="$OUT.spm"
mkdir -p "$SPM"
$PY scripts/sentencepiece_bpe.py train --model "$SPM/spm" --vocab-size "$VOCAB" "$RAW/train.src" "$RAW/train.tgt"
for split in train valid test; do
  for side in src tgt; do
    $PY scripts/sentencepiece_bpe.py encode --model "$SPM/spm.model" "$RAW/$split.$side" "$SPM/$split.$side"
  done
done
rm -rf "$OUT"
fairseq-preprocess --source-lang src --target-lang tgt \
  --trainpref "$SPM/train" --validpref "$SPM/valid" --testpref "$SPM/test" \
  --destdir "$OUT" --joined-dictionary --workers 2
cp "$SPM/spm.model" "$OUT/spm.model"
