#!/usr/bin/env bash
# Every GPU-only check in one command; bench/gpu_check.py says what it runs and writes.
#   bash bench/gpu_check.sh [--dry-run] [--out DIR] [--budget SECONDS] [--only STAGES]
set -euo pipefail
cd "$(dirname "$0")/.."
# the repository's venv where there is one (a CPU checkout), else the machine's python3 (the GPU image)
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
exec env PYTHONUNBUFFERED=1 "$python" -m bench.gpu_check "$@"
