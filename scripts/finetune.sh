#!/usr/bin/env bash
# Shared engine of the dataset recipes (scripts/xsum.sh, squad_qg.sh, personachat.sh):
#   prepare  released files in RAW_DIR -> text pairs -> BPE -> fairseq-preprocess -> data-bin/$DATASET,
#            and the canvas rule from the data (T = p99 of the training targets' length in pieces + </s>)
#   train    fairseq-train --task nat_early_exit --arch elmer_nat --criterion lplm, Appendix B settings
#            (Adam, lr 2e-5 from pre-trained weights, batch 20, 50 epochs, a checkpoint per epoch, the
#            best by validation ROUGE-L of the early-exit generator: --eval-rouge)
#   generate fairseq-generate on the test split (one pass; CTC: repeats merged and blanks dropped, with the
#            penalty on log p(blank) whose output length in words is 0.95 of the references' on training pairs)
#   score    elmer-score --task $DATASET (the paper's columns)
#   all      the four in order
# Usage (through a dataset script): scripts/xsum.sh {prepare|train|generate|score|all} [RAW_DIR]
# Environment:
#   GPT2_BPE_DIR   folder with encoder.json, vocab.bpe, dict.txt: GPT-2 BPE + BART's dictionary (needed
#                  for BART-base or the released ELMER weights); otherwise a sentencepiece model of
#                  VOCAB (32000) pieces is trained on the training split
#   PRETRAINED     an elmer_nat checkpoint to start from (elmer-convert-hf, elmer-init-from-bart,
#                  pretrain.sh); its dictionary must be the data's (GPT2_BPE_DIR's dict.txt)
#   EARLY_EXIT     soft (default) | hard | lplm;  ARCH (elmer_nat);  LR (2e-5 with PRETRAINED, else 5e-4)
#   GLAT           1 (default): glancing training (--glat); 0: off
#   CTC            1 (default): --ctc, CTC over a canvas CTC_CANVAS (1.5) times the data's rule (canvas.env),
#                  read with repeats merged and blanks dropped, the --blank-penalty from BLANK_PENALTY;
#                  0: the output ends at a </s> (LENGTH_RULE); give the same CTC to train and generate
#   LENGTH_RULE    CTC=0: quantile (default): --length-rule quantile, its --length-quantile from LENGTH_QUANTILE;
#                  first-eos: the first </s> after the --eos-penalty from EOS_PENALTY
#   BLANK_PENALTY, LENGTH_QUANTILE, EOS_PENALTY  calibrate (default): picked on CALIBRATION_PAIRS (1000) training
#                  pairs so that the output/reference length ratio there is nearest TARGET_RATIO (0.95)
#                  (elmer_fairseq/length_calibration.py; the test split is not read); a number: use it
#   NEIGHBOURS     CTC=0: 4 (default; 0 with EARLY_EXIT=hard): generate (and calibrate) with --no-repeat-neighbours 4
#   COLLAPSE       CTC=0: 0 (default): off; 1: generate with --collapse-repeats (and calibrate the length after it)
#                  (defaults measured on debsum valid: the best R-L with the output/reference length ratio in
#                  0.9-1.1, README "Quality on real data"; the calibration counts words with a sentencepiece
#                  vocabulary, pieces with GPT-2 BPE)
#   AVERAGE_LAST   5 (default): generate (and calibrate) with the mean weights of the last 5 epoch checkpoints
#                  (elmer-average-checkpoints --last-epochs; fewer if fewer epochs ran, said); 1: checkpoint_best.pt
#   BATCH (20), UPDATE_FREQ (1), MAX_EPOCH (50), MAX_UPDATE (0 = no limit), MAX_SOURCE (512)
#   DATA_ROOT (data-bin), SAVE_DIR (checkpoints/$DATASET), CPU (1: train and generate on CPU),
#   WORDNET (a WordNet dict folder, for METEOR), EXTRA_TRAIN_FLAGS
#   DISTILL        a distilled data-bin (scripts/distill.sh data-bin/$DATASET): train on the teacher's
#                  outputs; validation, generation and scores still use the references
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
if [ -x "$BIN/python" ]; then export PATH="$(realpath -m "$BIN"):$PATH"; fi
# shellcheck source=scripts/bpe.sh
source scripts/bpe.sh
: "${DATASET:?set by scripts/<dataset>.sh}"
USAGE="usage: scripts/$DATASET.sh {prepare|train|generate|score|all} [RAW_DIR]"
if [ $# -lt 1 ]; then echo "$USAGE" >&2; exit 2; fi
STAGE=$1
RAW=${2:-${RAW_DIR:-}}
DATA=${DATA_ROOT:-data-bin}/$DATASET
TEXT=$DATA.text
SAVE=${SAVE_DIR:-checkpoints/$DATASET}
DEVICE=()
if [ "${CPU:-0}" = 1 ]; then DEVICE=(--cpu); fi

prepare() {
  [ -n "$RAW" ] || { echo "$DATASET.sh prepare: give RAW_DIR, the folder of the released files" >&2; exit 2; }
  python scripts/prepare_dataset.py "$DATASET" "$RAW" "$TEXT"
  local dict_flags=() bpe=sentencepiece pairs=() split side
  for split in train valid test; do for side in src tgt; do
    pairs+=("$TEXT/$split.$side:$TEXT/$split.bpe.$side")
  done; done
  if [ -n "${GPT2_BPE_DIR:-}" ]; then
    bpe_check_gpt2 "$DATASET.sh"
    dict_flags=(--srcdict "$GPT2_BPE_DIR/dict.txt")
    bpe=gpt2
  else
    bpe_train "$TEXT/spm" "${VOCAB:-32000}" "$TEXT/train.src" "$TEXT/train.tgt"
  fi
  bpe_encode "$bpe" "$TEXT/spm.model" "${pairs[@]}"
  rm -rf "$DATA"
  fairseq-preprocess --source-lang src --target-lang tgt --trainpref "$TEXT/train.bpe" \
    --validpref "$TEXT/valid.bpe" --testpref "$TEXT/test.bpe" --destdir "$DATA" --joined-dictionary \
    --workers "${WORKERS:-2}" "${dict_flags[@]}"
  echo "$bpe" > "$DATA/bpe"
  if [ -f "$TEXT/spm.model" ]; then cp "$TEXT/spm.model" "$DATA/spm.model"; fi
  # canvas rule from the data: outputs do not grow with the input here, so T = b, the 99th percentile
  # of the training targets' length in pieces, + 1 for </s>
  elmer-canvas "$TEXT/train.bpe.tgt" --env "$DATA/canvas.env"
}

train() {
  [ -f "$DATA/canvas.env" ] || { echo "$DATASET.sh train: run prepare first (no $DATA/canvas.env)" >&2; exit 1; }
  # shellcheck disable=SC1090,SC1091
  source "$DATA/canvas.env"
  local init=() lr=${LR:-5e-4} post=() glat=() ctc=() canvas_b=$CANVAS_B
  if [ "${GLAT:-1}" = 1 ]; then glat=(--glat); fi
  if [ "${CTC:-1}" = 1 ]; then
    ctc=(--ctc)
    canvas_b=$(python -c 'import math, sys; print(math.ceil(float(sys.argv[1]) * int(sys.argv[2])))' "${CTC_CANVAS:-1.5}" "$CANVAS_B")
  fi
  if [ -n "${PRETRAINED:-}" ]; then
    [ -f "$PRETRAINED" ] || { echo "$DATASET.sh: PRETRAINED=$PRETRAINED does not exist" >&2; exit 1; }
    init=(--finetune-from-model "$PRETRAINED"); lr=${LR:-2e-5}
  fi
  if [ "$(cat "$DATA/bpe")" = sentencepiece ]; then post=(--eval-bleu-remove-bpe sentencepiece); fi
  local train_data=${DISTILL:-$DATA}
  [ -f "$train_data/train.src-tgt.tgt.idx" ] || { echo "$DATASET.sh: DISTILL=$train_data has no binarized train split" >&2; exit 1; }
  mkdir -p "$SAVE"
  fairseq-train "$train_data" --user-dir elmer_fairseq \
    --task nat_early_exit --arch "${ARCH:-elmer_nat}" --criterion lplm --early-exit "${EARLY_EXIT:-soft}" "${glat[@]}" \
    "${ctc[@]}" --canvas-len-a "$CANVAS_A" --canvas-len-b "$canvas_b" \
    --max-source-positions "${MAX_SOURCE:-512}" --truncate-source \
    --optimizer adam --adam-betas '(0.9, 0.999)' --lr "$lr" --lr-scheduler fixed --clip-norm 1.0 \
    --batch-size "${BATCH:-20}" --update-freq "${UPDATE_FREQ:-1}" --max-epoch "${MAX_EPOCH:-50}" \
    --max-update "${MAX_UPDATE:-0}" "${init[@]}" \
    --eval-rouge "${post[@]}" --best-checkpoint-metric rougeL --maximize-best-checkpoint-metric \
    --save-dir "$SAVE" --keep-last-epochs "$(( ${AVERAGE_LAST:-5} > 2 ? ${AVERAGE_LAST:-5} : 2 ))" --seed 1 --num-workers 0 --log-format simple \
    --log-interval "${LOG_INTERVAL:-100}" "${DEVICE[@]}" ${EXTRA_TRAIN_FLAGS:-} 2>&1 | tee -a "$SAVE/train.log" \
    | grep -E "\| (train|valid) \||done training|Error"
}

generate() {
  local post=() rule=${LENGTH_RULE:-quantile} rules=() unit=pieces neighbours option knob key rule_flag
  # hard exit reads each token at its own layer: the neighbour rule needs one layer's K best
  neighbours=${NEIGHBOURS:-$([ "${EARLY_EXIT:-soft}" = hard ] && echo 0 || echo 4)}
  if [ "${CTC:-1}" = 1 ]; then
    # CTC merges repeats itself and ends each output where the canvas reads so: its one knob is the blank's
    [ -z "${LENGTH_RULE:-}" ] && [ "${NEIGHBOURS:-0}" = 0 ] && [ "${COLLAPSE:-0}" = 0 ] \
      || { echo "CTC=1: LENGTH_RULE, NEIGHBOURS and COLLAPSE are for CTC=0 models" >&2; exit 2; }
    rule=blank-penalty; neighbours=0
  fi
  if [ "${COLLAPSE:-0}" = 1 ]; then rules=(--collapse-repeats); fi
  if [ "$neighbours" != 0 ]; then rules+=(--no-repeat-neighbours "$neighbours"); fi
  if [ "$(cat "$DATA/bpe")" = sentencepiece ]; then post=(--post-process sentencepiece); unit=words
  else post=(--bpe gpt2 --gpt2-encoder-json "$GPT2_BPE_DIR/encoder.json" --gpt2-vocab-bpe "$GPT2_BPE_DIR/vocab.bpe"); fi
  rule_flag=(--length-rule "$rule")
  case "$rule" in
    quantile) option=--length-quantile; knob=${LENGTH_QUANTILE:-calibrate}; key=length_quantile ;;
    first-eos) option=--eos-penalty; knob=${EOS_PENALTY:-calibrate}; key=eos_penalty ;;
    blank-penalty) option=--blank-penalty; knob=${BLANK_PENALTY:-calibrate}; key=blank_penalty; rule_flag=() ;;
    *) echo "LENGTH_RULE=$rule: expected quantile or first-eos" >&2; exit 2 ;;
  esac
  local ckpt=$SAVE/checkpoint_best.pt average=${AVERAGE_LAST:-5}
  if [ "$average" -gt 1 ]; then
    # fewer epoch checkpoints than AVERAGE_LAST: all of them; none (MAX_UPDATE stopped training inside
    # the first epoch): no output, checkpoint_best.pt (the module says which)
    rm -f "$SAVE/checkpoint_avg.pt"
    python -m elmer_fairseq.average_checkpoints --dir "$SAVE" --last-epochs "$average" --at-most \
      --output "$SAVE/checkpoint_avg.pt" > "$SAVE/average.log" 2>&1 || { tail -5 "$SAVE/average.log"; exit 1; }
    # its warnings, if any (sed alone: a grep that finds none would fail the pipeline under pipefail)
    sed -nE 's/^.*WARNING[ |:]+[^ |:]+[ |:]+/AVERAGE_LAST: /p' "$SAVE/average.log"
    if [ -f "$SAVE/checkpoint_avg.pt" ]; then
      ckpt=$SAVE/checkpoint_avg.pt
      echo "generating with the mean of the last epoch checkpoints (at most $average): $ckpt"
    else
      echo "generating with $ckpt"
    fi
  fi
  if [ "$knob" = calibrate ]; then
    python -m elmer_fairseq.length_calibration "$DATA" --path "$ckpt" --subset train \
      --sentences "${CALIBRATION_PAIRS:-1000}" --json "$SAVE/length-calibration.json" "${DEVICE[@]}" "${rules[@]}" \
      --unit "$unit" --rule "$rule" --target-ratio "${TARGET_RATIO:-0.95}" \
      > "$SAVE/length-calibration.log" 2>&1 || { tail -5 "$SAVE/length-calibration.log"; exit 1; }
    knob=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$SAVE/length-calibration.json" "$key")
    echo "$option $knob (chosen on training pairs: $SAVE/length-calibration.json)"
  fi
  fairseq-generate "$DATA" --user-dir elmer_fairseq --task nat_early_exit \
    --path "$ckpt" --gen-subset test --batch-size "${GEN_BATCH:-64}" \
    --max-source-positions "${MAX_SOURCE:-512}" --truncate-source "${rule_flag[@]}" "$option" "$knob" \
    "${rules[@]}" "${post[@]}" "${DEVICE[@]}" \
    > "$SAVE/generate-test.txt" 2> "$SAVE/generate-test.err" || { tail -5 "$SAVE/generate-test.err"; exit 1; }
  grep -h "Translated" "$SAVE/generate-test.err" | sed 's/^.*INFO | fairseq_cli.generate | //' || true
}

score() {
  local wn=()
  if [ -n "${WORDNET:-}" ]; then wn=(--wordnet "$WORDNET"); fi
  python -m elmer_fairseq.score --generate-log "$SAVE/generate-test.txt" --task "$DATASET" "${wn[@]}" \
    | tee "$SAVE/score-test.txt"
}

case "$STAGE" in
  prepare) prepare ;; train) train ;; generate) generate ;; score) score ;;
  all) prepare; train; generate; score ;;
  *) echo "$USAGE" >&2; exit 2 ;;
esac
