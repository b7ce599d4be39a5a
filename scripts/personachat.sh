#!/usr/bin/env bash
# personachat: see scripts/prepare_dataset.py for the files RAW_DIR must hold, scripts/finetune.sh for the
# stages and knobs.   scripts/personachat.sh {prepare|train|generate|score|all} RAW_DIR
DATASET=personachat exec bash "$(dirname "$0")/finetune.sh" "$@"
