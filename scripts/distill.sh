#!/usr/bin/env bash
# Sequence-level knowledge distillation for non-autoregressive training (fairseq's NAT docs call it
# sometimes essential; BANG recommends it): the targets of the training split are replaced by an
# autoregressive teacher's beam search outputs, binarized with the same dictionary.
#   scripts/distill.sh DATA_BIN
# Environment:
#   TEACHER    a fairseq `transformer` checkpoint trained on DATA_BIN; without it one is trained first
#              (TEACHER_DIR, default DATA_BIN-teacher; TEACHER_FLAGS replace the training flags below)
#   OUT        the distilled data-bin (default DATA_BIN-distill): train = (source, teacher output);
#              valid/test are DATA_BIN's, linked unchanged, so validation scores the real references
#   BEAM (4, or NBEST if larger: the beam returns at most BEAM outputs), MAX_TOKENS (20000, per generation
#              batch), CPU (1 on a machine without CUDA)
#   NBEST      1 (default): the target is the teacher's best beam output; N > 1: the teacher writes its N best
#              and the target is the one nearest the training reference (LCS F1 over pieces, ties to the
#              teacher's order; `elmer_fairseq/distill.py --select-by-reference`), which keeps the teacher's
#              style but moves the targets toward the references' content and length
#   LENPEN     the teacher's beam-search length penalty (fairseq-generate --lenpen, default 1: the mean
#              log-probability per piece); above 1 favours longer outputs, for a student whose outputs are
#              shorter than the references because its targets are
#   MAX_LEN_B  the teacher's longest output in pieces: default the canvas length CANVAS_B of DATA_BIN/canvas.env
#              (written by the recipes' prepare stage; the student cannot write more, and a looping teacher
#              would otherwise run to the limit), else 128
#   COLLAPSE   1 (default): drop consecutive repeated pieces from the teacher's outputs (an undertrained
#              teacher's beam search loops, "ir ir ir"); 0 keeps them as decoded
#   MAX_REPEAT_RATE  R: keep the reference target where more than R of the teacher's pieces repeat the piece
#              before, or it wrote nothing (a looping teacher; counted); unset: every target is the teacher's
#   JOBS       decoding processes, each a shard of the batches (default: the CPU cores on CPU, one
#              thread each, which beats one process of many threads at these batch sizes; 1 on GPU)
# Then train any recipe on it with DISTILL=$OUT (or pass $OUT as the data directory to fairseq-train).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
if [ -x "$BIN/python" ]; then export PATH="$(realpath -m "$BIN"):$PATH"; fi
[ $# -ge 1 ] || { echo "usage: scripts/distill.sh DATA_BIN" >&2; exit 2; }
DATA=${1%/}
[ -f "$DATA/dict.src.txt" ] && [ -f "$DATA/train.src-tgt.src.idx" ] \
  || { echo "distill.sh: $DATA is not a fairseq-preprocess folder with a train split (src -> tgt)" >&2; exit 1; }
OUT=${OUT:-$DATA-distill}
DEVICE=()
if [ "${CPU:-$(python -c 'import torch; print(int(not torch.cuda.is_available()))')}" = 1 ]; then DEVICE=(--cpu); fi
POS=(--max-source-positions "${MAX_SOURCE:-512}" --truncate-source)
if [ -z "${MAX_LEN_B:-}" ] && [ -f "$DATA/canvas.env" ]; then
  MAX_LEN_B=$(sed -n 's/^CANVAS_B=//p' "$DATA/canvas.env")
fi

if [ -z "${TEACHER:-}" ]; then
  TDIR=${TEACHER_DIR:-$DATA-teacher}
  TEACHER=$TDIR/checkpoint_last.pt
  if [ ! -f "$TEACHER" ]; then
    echo "== training the teacher (fairseq transformer) into $TDIR"
    # shellcheck disable=SC2086
    fairseq-train "$DATA" --task translation --arch transformer --share-all-embeddings \
      ${TEACHER_FLAGS:---criterion label_smoothed_cross_entropy --label-smoothing 0.1 --dropout 0.1 \
      --optimizer adam --adam-betas (0.9,0.98) --lr 5e-4 --lr-scheduler inverse_sqrt --warmup-updates 4000 \
      --max-tokens 4096 --max-update 100000 --clip-norm 1.0} \
      "${POS[@]}" --save-dir "$TDIR" --no-epoch-checkpoints --log-format simple "${DEVICE[@]}" \
      > "$TDIR.train.log" 2>&1 || { tail -20 "$TDIR.train.log"; exit 1; }
  fi
fi
[ -f "$TEACHER" ] || { echo "distill.sh: TEACHER=$TEACHER does not exist" >&2; exit 1; }

mkdir -p "$OUT"
TEXT=$OUT/text
mkdir -p "$TEXT"
start=$(date +%s)
BEAM=${BEAM:-$(( ${NBEST:-1} > 4 ? ${NBEST:-1} : 4 ))}
[ "${NBEST:-1}" -le "$BEAM" ] || { echo "distill.sh: NBEST=$NBEST exceeds BEAM=$BEAM (the beam returns at most BEAM outputs)" >&2; exit 1; }
if [ -s "$TEXT/generate-train.txt" ]; then
  echo "== reusing $TEXT/generate-train.txt (delete it to decode again)"
else
  JOBS=${JOBS:-$([ ${#DEVICE[@]} -gt 0 ] && nproc || echo 1)}
  echo "== beam $BEAM (length penalty ${LENPEN:-1}) decoding of $DATA's training split with $TEACHER ($JOBS process(es))"
  pids=()
  for ((i = 0; i < JOBS; i++)); do
    threads=()
    if [ "$JOBS" -gt 1 ]; then threads=(env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1); fi
    # fairseq-generate shards the batches by --distributed-world-size/--distributed-rank
    "${threads[@]}" fairseq-generate "$DATA" --user-dir elmer_fairseq --path "$TEACHER" --gen-subset train \
      --beam "$BEAM" --nbest "${NBEST:-1}" --lenpen "${LENPEN:-1}" --max-tokens "${MAX_TOKENS:-20000}" --max-len-a 0 --max-len-b "${MAX_LEN_B:-128}" \
      "${POS[@]}" --distributed-world-size "$JOBS" --distributed-rank "$i" "${DEVICE[@]}" \
      > "$TEXT/generate-train.$i.txt" 2> "$TEXT/generate-train.$i.err" &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { tail -20 "$TEXT/generate-train.$i.err"; exit 1; }
  done
  cat "$TEXT"/generate-train.*.txt > "$TEXT/generate-train.txt"
fi
n_train=$(python -c "import sys; from fairseq.data import data_utils; print(len(data_utils.load_indexed_dataset(sys.argv[1], None)))" "$DATA/train.src-tgt.src")
collapse=()
if [ "${COLLAPSE:-1}" = 1 ]; then collapse=(--collapse-repeats); fi
if [ -n "${MAX_REPEAT_RATE:-}" ]; then collapse+=(--max-repeat-rate "$MAX_REPEAT_RATE"); fi
if [ "${NBEST:-1}" -gt 1 ]; then collapse+=(--select-by-reference); fi
python -m elmer_fairseq.distill "$TEXT/generate-train.txt" "$TEXT/train" --expect "$n_train" "${collapse[@]}"
echo "== decoding took $(( $(date +%s) - start )) s"

rm -f "$OUT"/train.src-tgt.* "$OUT"/dict.*.txt
fairseq-preprocess --source-lang src --target-lang tgt --trainpref "$TEXT/train" --destdir "$OUT" \
  --srcdict "$DATA/dict.src.txt" --joined-dictionary --workers 2 > "$TEXT/preprocess.log" 2>&1 \
  || { tail -20 "$TEXT/preprocess.log"; exit 1; }
for f in "$DATA"/valid.* "$DATA"/test.* "$DATA"/spm.model "$DATA"/canvas.* "$DATA"/bpe; do
  if [ -e "$f" ]; then ln -sfn "$(cd "$(dirname "$f")" && pwd)/$(basename "$f")" "$OUT/$(basename "$f")"; fi
done
echo "== distilled data-bin: $OUT (train: teacher outputs; valid/test: the references)"
