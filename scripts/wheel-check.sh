#!/usr/bin/env bash
# Packaging check on its own (it also runs inside `scripts/dev.sh test`): builds the wheel with
# `python -m build --wheel` (build isolation, needs PyPI), installs it into a fresh venv, imports
# affeq_rt._core from outside the checkout, runs info/models/export/predict, reads RUNPATH with
# readelf; plus the version and registry-folder checks. About 2 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
exec "$PY" -m pytest -q -p no:cacheprovider tests/test_wheel.py "$@"
