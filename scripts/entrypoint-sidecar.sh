#!/bin/sh
# Container entrypoint of the `lmgate` compose service: the sidecar (allow-list + stats).
# Runs `lmgate serve` with any extra arguments (e.g. --config PATH), configured by
# config/lmgate.yaml plus LMGATE_<SECTION>__<KEY> environment variables.
#
# `exec` replaces this shell, so the sidecar is the container's main process and receives
# `docker compose stop`'s SIGTERM itself: it then writes the buffered stats before exiting.
set -eu
cd "$(dirname "$0")/.."
if ! command -v lmgate >/dev/null 2>&1; then
    echo "entrypoint-sidecar: lmgate is not on PATH (run scripts/setup.sh and put its venv's bin first on PATH)" >&2
    exit 127
fi
exec lmgate serve "$@"
