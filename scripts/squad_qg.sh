#!/usr/bin/env bash
# squad_qg: see scripts/prepare_dataset.py for the files RAW_DIR must hold, scripts/finetune.sh for the
# stages and knobs.   scripts/squad_qg.sh {prepare|train|generate|score|all} RAW_DIR
DATASET=squad_qg exec bash "$(dirname "$0")/finetune.sh" "$@"
