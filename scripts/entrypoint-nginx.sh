#!/bin/sh
# Container entrypoint of the `nginx` compose service: the public front.
# Runs `lmgate nginx` with any extra arguments (e.g. --config PATH): it renders nginx.conf from
# config/lmgate.yaml plus LMGATE_<SECTION>__<KEY> environment variables into proxy.runtime_dir,
# checks it (nginx -t) and runs nginx in the foreground, its log lines redacted.
#
# `exec` replaces this shell, so `lmgate nginx` is the container's main process and receives
# `docker compose stop`'s SIGTERM itself: it then stops nginx gracefully (in-flight calls finish,
# their records reach the sidecar).
set -eu
cd "$(dirname "$0")/.."
if ! command -v lmgate >/dev/null 2>&1; then
    echo "entrypoint-nginx: lmgate is not on PATH (run scripts/setup.sh and put its venv's bin first on PATH)" >&2
    exit 127
fi
exec lmgate nginx "$@"
