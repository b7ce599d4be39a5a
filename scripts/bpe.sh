# The BPE stage of the recipes (finetune.sh, pretrain.sh, prepare_sample.sh): source this file.
# Every recipe segments text the same way, through scripts/bpe.py (one process per call).
#   bpe_check_gpt2 RECIPE       GPT2_BPE_DIR holds BART's encoder.json, vocab.bpe and dict.txt
#   bpe_train PREFIX VOCAB FILE...   train a sentencepiece model PREFIX.model
#   bpe_encode STYLE SPM_MODEL IN:OUT...   STYLE gpt2 (GPT2_BPE_DIR; SPM_MODEL unused, give "")
#                                          or sentencepiece (SPM_MODEL: a .model file)

BPE_PY="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/bpe.py"

bpe_check_gpt2() {
  local f
  for f in encoder.json vocab.bpe dict.txt; do
    [ -s "$GPT2_BPE_DIR/$f" ] || { echo "$1: GPT2_BPE_DIR=$GPT2_BPE_DIR lacks $f (BART's encoder.json, vocab.bpe, dict.txt)" >&2; exit 1; }
  done
}

bpe_train() {
  local prefix=$1 vocab=$2
  shift 2
  "${PY:-python}" "$BPE_PY" train --style sentencepiece --model "$prefix" --vocab-size "$vocab" "$@"
}

bpe_encode() {
  local style=$1 model=$2
  shift 2
  if [ "$style" = gpt2 ]; then
    "${PY:-python}" "$BPE_PY" encode --style gpt2 --encoder-json "$GPT2_BPE_DIR/encoder.json" \
      --vocab-bpe "$GPT2_BPE_DIR/vocab.bpe" "$@"
  else
    "${PY:-python}" "$BPE_PY" encode --style sentencepiece --model "$model" "$@"
  fi
}
