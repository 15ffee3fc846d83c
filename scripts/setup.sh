#!/usr/bin/env bash
# Install what LMGate needs on a Debian/Ubuntu machine (or image), then the package in a venv.
#   scripts/setup.sh          nginx-light, the njs module, CA certificates, Python venv + lmgate
#   scripts/setup.sh --dev    the same plus the test dependencies (pytest, the providers' SDKs, wrk,
#                             kubectl, ...)
# The Dockerfile runs this same script, so the container gets the nginx/njs that the tests ran.
# Python packages come from uv.lock, exactly (`uv sync --frozen`): the versions the tests passed
# with. scripts/lock.sh updates the lock. uv itself is installed from PyPI when it is missing.
# Environment: LMGATE_VENV (default .venv in the repository) is where the venv goes; LMGATE_PYTHON
# is the interpreter a new venv is made with (default: see pick_python below); LMGATE_UV_DIR is
# where uv is installed when it is not on PATH (default: ~/.cache/lmgate/uv-<version>).
set -euo pipefail
cd "$(dirname "$0")/.."

extra=""
mode=runtime
if [ "${1:-}" = "--dev" ]; then extra="[dev]"; mode=dev; fi
venv="${LMGATE_VENV:-.venv}"

packages=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || packages+=(nginx-light)
[ -f /usr/lib/nginx/modules/ngx_http_js_module.so ] || packages+=(libnginx-mod-http-js)
[ -f /etc/ssl/certs/ca-certificates.crt ] || packages+=(ca-certificates)
command -v python3 >/dev/null 2>&1 || packages+=(python3)
if [ -n "$extra" ]; then
    # The benchmark's smoke test (tests/e2e/test_bench_smoke.py): the load tool and the mock's
    # echo module.
    command -v wrk >/dev/null 2>&1 || packages+=(wrk)
    [ -f /usr/lib/nginx/modules/ngx_http_echo_module.so ] || packages+=(libnginx-mod-http-echo)
    # deploy/kubernetes's tests render the manifests with kubectl's built-in kustomize.
    command -v kubectl >/dev/null 2>&1 || packages+=(kubernetes-client)
    # The HTML report's browser test (tests/e2e/test_report_html.py): headless Chromium.
    command -v chromium >/dev/null 2>&1 || packages+=(chromium)
    # Per-key policies shared through Redis (tests/e2e/test_policies.py): a real redis-server.
    command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || packages+=(redis-server)
fi
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1 \
    && { [ ! -x "$venv/bin/python" ] || ! command -v uv >/dev/null 2>&1; }; then
    packages+=(python3-venv)
fi

if [ "${#packages[@]}" -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "setup: missing ${packages[*]} and this is not a Debian/Ubuntu system: install nginx with the njs module and Python >= 3.11 yourself" >&2
        exit 1
    fi
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    # Leave apt's package lists as we found them: on a fresh system or image (no lists yet, as in
    # debian:*-slim) they are removed again after the install, which keeps the container image
    # lean; a machine that already had lists keeps them (and its .deb cache).
    had_lists=""
    if compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then had_lists=1; fi
    echo "setup: installing ${packages[*]} with apt-get" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
    if [ -z "$had_lists" ]; then
        $sudo apt-get clean
        $sudo rm -rf /var/lib/apt/lists/*
    fi
fi

# The interpreter for a new venv: LMGATE_PYTHON; else the system's /usr/bin/python3 when it is new
# enough and can make a venv, as it is the one the container runs (debian:bookworm-slim), and
# Debian's build ran the sidecar's per-call work ~10% faster here than a default build from source
# (pyenv's; docs/performance.md); else python3 on PATH.
pick_python() {
    if [ -n "${LMGATE_PYTHON:-}" ]; then
        echo "$LMGATE_PYTHON"
    elif /usr/bin/python3 -c 'import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
        echo /usr/bin/python3
    else
        echo python3
    fi
}
if [ ! -x "$venv/bin/python" ]; then
    python="$(pick_python)"
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "setup: LMGate needs Python >= 3.11; $python is $("$python" --version 2>&1)" >&2
        exit 1
    fi
    "$python" -m venv "$venv"
fi
nginx_version() { { command -v nginx >/dev/null && nginx -v || /usr/sbin/nginx -v; } 2>&1; }

# The locked set goes in only when uv.lock, pyproject.toml, the extras asked for or the checkout the
# venv's editable lmgate points at changed since the last sync into this venv (run-local.sh runs
# this script at every start).
stamp="$venv/.lmgate-sync"
want="$({ cat uv.lock pyproject.toml; pwd -P; } | sha256sum | cut -d' ' -f1)"
have="$(cat "$stamp" 2>/dev/null || true)"
if { [ "$have" = "$want dev" ] || [ "$have" = "$want $mode" ]; } && "$venv/bin/python" -c "" 2>/dev/null; then
    echo "setup: ready (the locked packages are already in $venv; $(nginx_version))" >&2
    exit 0
fi
rm -f "$stamp"

scripts/uv.sh --path >/dev/null  # installs uv first when it is missing, saying so
# A lock that no longer matches pyproject.toml would install the old set silently.
if ! check="$(scripts/uv.sh lock --check --offline --no-python-downloads 2>&1)"; then
    echo "$check" | tail -n 3 >&2
    echo "setup: uv.lock does not match pyproject.toml (a dependency was changed?): run scripts/lock.sh" >&2
    exit 1
fi
# --frozen: install uv.lock as it is (never re-resolve); the venv keeps the interpreter made above;
# never download a Python. With --dev the venv holds exactly the locked set with the dev extra;
# without it the runtime set is installed and packages already there are left (a developer's venv
# keeps its test tools when run-local.sh runs this).
sync=(sync --frozen --python "$venv/bin/python" --no-python-downloads --quiet)
if [ "$mode" = dev ]; then sync+=(--extra dev); else sync+=(--inexact); fi
UV_PROJECT_ENVIRONMENT="$venv" scripts/uv.sh "${sync[@]}"
echo "$want $mode" >"$stamp"
echo "setup: ready ($("$venv/bin/lmgate" --help >/dev/null && echo "lmgate in $venv/bin"), $(nginx_version))" >&2
