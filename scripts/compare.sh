#!/usr/bin/env bash
# scripts/compare.sh RAW_DIR [compare.py options]: the side-by-side quality harness (scripts/compare.py)
# in the project's virtual environment. Example: scripts/compare.sh ../shared/data/debsum --work runs/debsum
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
exec "${VENV:-$here/.venv}/bin/python" "$here/scripts/compare.py" "$@"
