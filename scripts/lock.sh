#!/usr/bin/env bash
# Update uv.lock from pyproject.toml: the one command after adding, removing or changing a
# dependency (versions already locked stay unless pyproject.toml rules them out).
#   scripts/lock.sh              resolve what changed, keep the rest
#   scripts/lock.sh --upgrade    move every package to its newest allowed release
# Then `scripts/setup.sh --dev` installs the new lock, and the tests run against it.
set -euo pipefail
cd "$(dirname "$0")/.."
exec scripts/uv.sh lock --no-python-downloads "$@"
