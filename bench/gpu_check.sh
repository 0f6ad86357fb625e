#!/usr/bin/env bash
# The GPU readiness check in one call (<= 8 minutes on one H100/H200-class GPU): MFU,
# tokens/s and peak memory of the GPT-2 124M / 355M / 1.5B configs, see bench/gpu_check.py.
#   bash bench/gpu_check.sh                      # all rows
#   bash bench/gpu_check.sh --configs 124m       # any gpu_check.py arguments
#   bash bench/gpu_check.sh --cpu --tiny         # the CI dry run
# Uses $PYTHON, else .venv when there is one, else python3 (e.g. an image's own torch).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the whole check stops at 8 minutes; --budget-s (420 s) skips rows before that
exec timeout 480 "$PY" bench/gpu_check.py "$@"
