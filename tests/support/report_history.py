"""A small usage history for the report's html tests: several days, owners, keys, models,
providers and outcomes, in the stats file format the sidecar writes (lmgate/records.py)."""

from __future__ import annotations

import json
from pathlib import Path

# Owners are data: one that looks like markup must stay text in the page.
OWNERS = ("alice@example.com", "bob@example.com", "<script>alert(1)</script>")
MODELS = (("openai", "openai", "gpt-4o-mini"), ("openai", "openai", "gpt-4.1"),
          ("anthropic", "anthropic", "claude-sonnet-4-5-20250929"),
          ("gemini", "google", "gemini-2.5-flash"))


def history(days: int = 6) -> list[dict]:
    out = []
    for day in range(days):
        for i in range(12 + 5 * day):
            provider, fmt, model = MODELS[(i + day) % len(MODELS)]
            owner = OWNERS[i % len(OWNERS)]
            error = "forbidden" if i % 11 == 3 else "upstream_error" if i % 13 == 5 else None
            billed = error is None
            out.append({
                "timestamp": f"2026-11-{10 + day:02d}T{i % 24:02d}:00:00.000Z",
                "request_id": f"r{day}-{i}", "lmgate_id": f"key-{i % 4}", "owner": owner,
                "provider": provider, "api_format": fmt, "method": "POST",
                "endpoint": f"/{provider}/v1/x", "model": model, "stream": False,
                "status": 403 if error == "forbidden" else 500 if error else 200,
                "input_tokens": 1000 * (i + 1) if billed else None,
                "output_tokens": 200 * (day + 1) if billed else None,
                "cache_read_tokens": 100 * (i % 3) if billed else None,
                "cache_write_tokens": 50 if billed and fmt == "anthropic" else None,
                "reasoning_tokens": 10 if billed and fmt == "google" else None,
                "total_tokens": None, "duration_ms": 500.0 + i, "response_bytes": 100,
                "masked_key": "...abc123", "error_type": error,
            })
    return out


def write_history(path: Path, days: int = 6) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in history(days)), encoding="utf-8")
    return path
