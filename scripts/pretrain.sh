#!/usr/bin/env bash
# ELMER pre-training (paper §4.2, §5.1): raw text -> BPE -> fairseq-preprocess --only-source ->
# fairseq-train --task elmer_denoising --criterion lplm (sentence shuffling + text infilling,
# every target token a random exit layer, shared off-ramps). Resumable: run it again and
# fairseq-train continues from SAVE_DIR/checkpoint_last.pt.
#
#   scripts/pretrain.sh [--tiny] RAW_DIR [NAME]
#       RAW_DIR: *.txt, UTF-8, one sentence per line, a blank line between documents;
#       valid.txt, if there, is the validation text (else every 100th document is held out)
#   scripts/pretrain.sh --tiny            CPU, a few minutes: elmer_nat_tiny (3+3 layers, 128) on
#                                         the bundled sample's training documents (data-bin/sample-raw)
#
# Environment: GPT2_BPE_DIR (encoder.json, vocab.bpe, dict.txt: GPT-2 BPE with BART's dictionary,
# as ELMER and BART use; otherwise a sentencepiece model of VOCAB pieces is trained on the text),
# NGPU (default: all visible GPUs; 0 = CPU), BATCH (sequences per GPU and step, 32), TOTAL_BATCH
# (sequences per update, the paper's 4096: --update-freq = TOTAL_BATCH / (BATCH * NGPU)),
# PRECISION (fp16 | bf16 | fp32; GPU default fp16), LPLM_SAMPLES (10; --tiny: 2), MAX_UPDATE,
# VOCAB (sentencepiece size: 32000; --tiny 4000), DATA_ROOT (data-bin), SAVE_DIR
# (checkpoints/NAME), EXTRA_TRAIN_FLAGS.
# Multi-node: see README ("Pre-training at scale").
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
[ -x "$BIN/python" ] && export PATH="$(realpath -m "$BIN"):$PATH"
PY=python
# shellcheck source=scripts/bpe.sh
source scripts/bpe.sh

TINY=0
if [ "${1:-}" = "--tiny" ]; then TINY=1; shift; fi
if [ $TINY = 1 ] && [ $# = 0 ]; then
  NAME=pretrain-tiny
  RAW=${DATA_ROOT:-data-bin}/$NAME.raw
  SAMPLE_DOCS=1
else
  RAW=${1:?usage: scripts/pretrain.sh [--tiny] RAW_DIR [NAME]  or  scripts/pretrain.sh --tiny}
  if [ $TINY = 1 ]; then NAME=${2:-pretrain-tiny}; else NAME=${2:-pretrain}; fi
  SAMPLE_DOCS=0
  [ -d "$RAW" ] || { echo "pretrain.sh: $RAW is not a folder of *.txt" >&2; exit 1; }
fi
DATA=${DATA_ROOT:-data-bin}/$NAME
SAVE=${SAVE_DIR:-checkpoints/$NAME}
WORK=$DATA.work
mkdir -p "$WORK" "$SAVE"

if [ $SAMPLE_DOCS = 1 ] && [ ! -s "$RAW/train.txt" ]; then
  # the sample's training documents (its source docstrings), a sentence per line; 5% for validation
  mkdir -p "$RAW"
  $PY - data-bin/sample-raw "$RAW" <<'PYEOF'
import re, sys
src, out = sys.argv[1], sys.argv[2]
with open(f"{src}/train.src", encoding="utf-8") as f:
    docs = [line.strip() for line in f if line.strip()]
def write(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write("\n".join(s for s in re.split(r"(?<=[.!?])\s+", doc) if s) + "\n\n")
write(f"{out}/train.txt", docs[: -len(docs) // 20])
write(f"{out}/valid.txt", docs[-len(docs) // 20 :])
PYEOF
fi

# 1. split into train/valid text
if [ ! -s "$WORK/train.txt" ]; then
  ls "$RAW"/*.txt > /dev/null 2>&1 || { echo "pretrain.sh: no *.txt files in $RAW" >&2; exit 1; }
  $PY - "$RAW" "$WORK" <<'PYEOF'
import glob, os, sys
raw, work = sys.argv[1], sys.argv[2]
def documents(paths):
    for path in paths:
        with open(path, encoding="utf-8") as f:  # a UnicodeDecodeError names the file
            doc = []
            for line in f:
                if line.strip():
                    doc.append(line.strip())
                elif doc:
                    yield doc
                    doc = []
            if doc:
                yield doc
files = sorted(p for p in glob.glob(os.path.join(raw, "*.txt")) if os.path.basename(p) != "valid.txt")
valid_file = os.path.join(raw, "valid.txt")
with open(f"{work}/train.txt", "w", encoding="utf-8") as tr, open(f"{work}/valid.txt", "w", encoding="utf-8") as va:
    n = [0, 0]
    for i, doc in enumerate(documents(files)):
        held_out = not os.path.exists(valid_file) and i % 100 == 99
        (va if held_out else tr).write("\n".join(doc) + "\n\n")
        n[held_out] += 1
    if os.path.exists(valid_file):
        for doc in documents([valid_file]):
            va.write("\n".join(doc) + "\n\n")
            n[1] += 1
print(f"pretrain.sh: {n[0]} training and {n[1]} validation documents")
if n[0] == 0 or n[1] == 0:
    sys.exit("pretrain.sh: need at least one training and one validation document (blank-line separated)")
PYEOF
fi

# 2. BPE and fairseq-preprocess (the blank lines between documents stay: they mark document ends)
if [ ! -s "$DATA/dict.txt" ]; then
  if [ -n "${GPT2_BPE_DIR:-}" ]; then
    bpe_check_gpt2 pretrain.sh
    DICT_FLAGS=(--srcdict "$GPT2_BPE_DIR/dict.txt")
    BPE=gpt2
  else
    VOCAB=${VOCAB:-$([ $TINY = 1 ] && echo 4000 || echo 32000)}
    bpe_train "$WORK/spm" "$VOCAB" "$WORK/train.txt"
    DICT_FLAGS=()
    BPE=sentencepiece
  fi
  bpe_encode "$BPE" "$WORK/spm.model" "$WORK/train.txt:$WORK/train.bpe" "$WORK/valid.txt:$WORK/valid.bpe"
  fairseq-preprocess --only-source --trainpref "$WORK/train.bpe" --validpref "$WORK/valid.bpe" \
    --destdir "$DATA" --workers 2 "${DICT_FLAGS[@]}"
  echo "$BPE" > "$DATA/bpe"
  if [ -f "$WORK/spm.model" ]; then cp "$WORK/spm.model" "$DATA/spm.model"; fi
fi
BPE=$(cat "$DATA/bpe")
cp "$DATA/dict.txt" "$SAVE/dict.txt"
if [ -f "$DATA/spm.model" ]; then cp "$DATA/spm.model" "$SAVE/spm.model"; fi
BPE_FLAGS=(--bpe-style "$BPE")
if [ "$BPE" = gpt2 ]; then BPE_FLAGS+=(--gpt2-encoder-json "$GPT2_BPE_DIR/encoder.json"); fi

# 3. fairseq-train
NGPU=${NGPU:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)}
if [ $TINY = 1 ]; then
  MODEL=(--arch elmer_nat_tiny --tokens-per-sample 128 --canvas-len-a 1.25 --canvas-len-b 8)
  OPTIM=(--lr 1e-3 --warmup-updates 100 --batch-size 16 --update-freq 1)
  MAX_UPDATE=${MAX_UPDATE:-300}
  SAMPLES=${LPLM_SAMPLES:-2}  # 10 costs 5x the CPU time per update
else
  BATCH=${BATCH:-32}
  TOTAL_BATCH=${TOTAL_BATCH:-4096}
  FREQ=$(( TOTAL_BATCH / (BATCH * (NGPU > 0 ? NGPU : 1)) ))
  [ "$FREQ" -ge 1 ] || FREQ=1
  # base (§5.1): 6+6 layers, 768; canvas T = 1.25 * corrupted length + 8 covers the original
  MODEL=(--arch elmer_nat --tokens-per-sample 512 --canvas-len-a 1.25 --canvas-len-b 8)
  OPTIM=(--lr 2e-4 --warmup-updates 10000 --batch-size "$BATCH" --update-freq "$FREQ")
  MAX_UPDATE=${MAX_UPDATE:-500000}
  SAMPLES=${LPLM_SAMPLES:-10}
fi
DEVICE=(--cpu)
if [ "$NGPU" -gt 0 ]; then
  case ${PRECISION:-fp16} in
    fp16) DEVICE=(--fp16) ;; bf16) DEVICE=(--bf16) ;; fp32) DEVICE=() ;;
    *) echo "pretrain.sh: PRECISION must be fp16, bf16 or fp32" >&2; exit 1 ;;
  esac
  if [ "$NGPU" -gt 1 ]; then DEVICE+=(--distributed-world-size "$NGPU"); fi
fi
echo "== pre-training $NAME on $DATA ($BPE), ${NGPU} GPU(s), max $MAX_UPDATE updates -> $SAVE"
fairseq-train "$DATA" --user-dir elmer_fairseq \
  --task elmer_denoising "${BPE_FLAGS[@]}" --criterion lplm --lplm-samples "$SAMPLES" \
  "${MODEL[@]}" --max-source-positions 1024 --max-target-positions 1024 \
  --optimizer adam --adam-betas '(0.9, 0.98)' --adam-eps 1e-6 --weight-decay 0.01 --clip-norm 1.0 \
  --lr-scheduler inverse_sqrt "${OPTIM[@]}" --max-update "$MAX_UPDATE" \
  --save-dir "$SAVE" --save-interval-updates 100 --keep-interval-updates 2 --no-epoch-checkpoints \
  --seed 1 --num-workers 0 --log-format simple --log-interval 25 "${DEVICE[@]}" ${EXTRA_TRAIN_FLAGS:-} \
  2>&1 | tee -a "$SAVE/train.log" | grep -E "\| (train|valid) \||done training|Loaded checkpoint|Error|error"
echo "== $SAVE/checkpoint_last.pt (dictionary and BPE model beside it)"
