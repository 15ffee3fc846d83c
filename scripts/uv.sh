#!/usr/bin/env bash
# uv, which installs uv.lock (scripts/setup.sh) and updates it (scripts/lock.sh): the one on PATH
# when it is recent enough, else one installed from PyPI into a small venv of its own.
#   scripts/uv.sh ARGS...    run it (installing it first if needed)
#   scripts/uv.sh --path     print where it is
# Environment: LMGATE_UV_DIR, where that venv goes (default: ~/.cache/lmgate/uv-<version>).
set -euo pipefail

UV_VERSION=0.13.8
# uv.lock's format needs a uv at least this new.
UV_MINIMUM=0.9.0

recent_enough() {
    local have
    have="$("$1" --version 2>/dev/null | awk '{print $2}')" || return 1
    [ -n "$have" ] && [ "$(printf '%s\n%s\n' "$UV_MINIMUM" "$have" | sort -V | head -n1)" = "$UV_MINIMUM" ]
}

# A folder under a shared /tmp is used only if it is this user's and no one else can write it:
# another user could have put a uv of their own there first.
own_folder() {
    mkdir -p -m 0700 "$1"
    if [ -L "$1" ] || [ "$(stat -c %u "$1")" != "$(id -u)" ] || [ -n "$(find "$1" -maxdepth 0 -perm /022)" ]; then
        echo "setup: $1 is not a folder of this user's alone; remove it, or set LMGATE_UV_DIR" >&2
        exit 1
    fi
}

uv=""
if command -v uv >/dev/null 2>&1 && recent_enough "$(command -v uv)"; then
    uv="$(command -v uv)"
else
    dir="${LMGATE_UV_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/lmgate/uv-$UV_VERSION}"
    # A user without a writable home (a service account): a folder of its own under /tmp.
    if [ -z "${LMGATE_UV_DIR:-}" ] && ! mkdir -p "$(dirname "$dir")" 2>/dev/null; then
        dir="${TMPDIR:-/tmp}/lmgate-uv-$(id -u)-$UV_VERSION"
        own_folder "$dir"
    fi
    uv="$dir/bin/uv"
    if ! recent_enough "$uv"; then
        echo "setup: installing uv $UV_VERSION from PyPI into $dir" >&2
        rm -rf "$dir"
        python3 -m venv "$dir"
        "$dir/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
    fi
fi

# Trust the system's certificate store, as apt and pip do (a TLS-inspecting proxy's CA installed
# on the machine then works for uv too), not only the roots built into uv.
export UV_SYSTEM_CERTS="${UV_SYSTEM_CERTS:-1}"

# The same for uv's cache.
if [ -z "${UV_CACHE_DIR:-}" ] && [ -z "${UV_NO_CACHE:-}" ] \
    && ! mkdir -p "${XDG_CACHE_HOME:-${HOME:-/nonexistent}/.cache}/uv" 2>/dev/null; then
    export UV_CACHE_DIR="${TMPDIR:-/tmp}/lmgate-uv-cache-$(id -u)"
    own_folder "$UV_CACHE_DIR"
fi

if [ "${1:-}" = "--path" ]; then
    echo "$uv"
else
    exec "$uv" "$@"
fi
