#!/usr/bin/env bash
# Live checks against the real providers, with your own keys: LMGate is started on a temporary
# allow-list holding them, each provider's SDK makes one small plain and one streamed call through
# it, and each record's tokens must match what the SDK reports. Costs a few hundred tokens per
# provider. Never run by CI (no network there); scripts/live_tests.py says which variables it reads:
#   OPENAI_API_KEY=... ANTHROPIC_API_KEY=... GEMINI_API_KEY=... scripts/run-live-tests.sh
# A provider without a key is skipped. Keys are never printed, only their masked form.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev >&2   # the providers' SDKs are in the dev set
exec "${LMGATE_VENV:-.venv}/bin/python" scripts/live_tests.py "$@"
