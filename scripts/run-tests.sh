#!/usr/bin/env bash
# Set up whatever is missing (including the test dependencies), lint (ruff: rules in pyproject.toml),
# then run the whole test suite.
# Arguments go to pytest, e.g. `scripts/run-tests.sh -m unit` or `-m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
"${LMGATE_VENV:-.venv}/bin/python" -m ruff check --quiet .
exec "${LMGATE_VENV:-.venv}/bin/python" -m pytest "$@"
