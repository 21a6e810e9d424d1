#!/usr/bin/env bash
# The Isaac Lab 3.0 checks a CPU can do (README, "What was tested, and how"): a Python 3.12 venv with the real
# isaaclab 3.0.0 wheel (~8 GB download) and this package, then scripts/check_isaaclab3.py. Not part of CI.
#   scripts/check_isaaclab3.sh [VENV_DIR]     (PYTHON312=/path/to/python3.12 if python3.12 is not on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-isaaclab3}
python=${PYTHON312:-python3.12}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet "isaaclab==3.0.0" "torchrl==0.14.1"
"$venv/bin/pip" install --quiet --no-deps .   # this package; its other dependencies come with Isaac Lab
"$venv/bin/python" scripts/check_isaaclab3.py
