#!/usr/bin/env bash
# xsum: see scripts/prepare_dataset.py for the files RAW_DIR must hold, scripts/finetune.sh for the
# stages and knobs.   scripts/xsum.sh {prepare|train|generate|score|all} RAW_DIR
DATASET=xsum exec bash "$(dirname "$0")/finetune.sh" "$@"
