#!/usr/bin/env bash
# Set up whatever is missing (nothing is reinstalled when uv.lock and pyproject.toml are unchanged:
# setup.sh keeps a stamp in the venv), then run LMGate in the foreground (nginx on :8080 + the sidecar).
# Arguments go to `lmgate up` (e.g. --config PATH). Stop with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec "${LMGATE_VENV:-.venv}/bin/lmgate" up "$@"
