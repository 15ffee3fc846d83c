#!/usr/bin/env python3
"""Benchmark `lmgate report` on a generated stats history.

Writes N records (default 1,000,000) with the sidecar's own StatsWriter into a temporary folder, so
the format and the rotation (a few rotated files plus the current one) are the real ones, then runs
the report in a fresh Python process and prints records per second and the peak memory (ru_maxrss)
of the report process (DuckDB reads with one thread per CPU, in that process). It also checks that
the report counted every generated request once.

    scripts/bench_report.py                      # 1M records
    scripts/bench_report.py --records 20000      # quick
    scripts/bench_report.py --threads 1          # DuckDB on one thread
    scripts/bench_report.py --keep /tmp/bench --repeat 5   # keep the data, best of 5 runs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmgate.writer import StatsWriter  # noqa: E402

# (provider, api_format, model, endpoint, weight)
MODELS = [
    ("openai", "openai", "gpt-4o-mini-2024-07-18", "/openai/v1/chat/completions", 30),
    ("openai", "openai", "gpt-4o-2024-08-06", "/openai/v1/chat/completions", 8),
    ("openai", "openai", "gpt-5-mini-2025-08-07", "/openai/v1/responses", 6),
    ("openai", "openai", "o4-mini-2025-04-16", "/openai/v1/chat/completions", 3),
    ("openai", "openai", "text-embedding-3-small", "/openai/v1/embeddings", 6),
    ("anthropic", "anthropic", "claude-sonnet-4-5-20250929", "/anthropic/v1/messages", 14),
    ("anthropic", "anthropic", "claude-haiku-4-5-20251001", "/anthropic/v1/messages", 8),
    ("anthropic", "anthropic", "claude-opus-4-1-20250805", "/anthropic/v1/messages", 2),
    ("google", "anthropic", "claude-sonnet-4-5@20250929",
     "/google/v1/projects/p/locations/global/publishers/anthropic/models/claude-sonnet-4-5:rawPredict", 4),
    ("google", "google", "gemini-2.5-pro",
     "/google/v1/projects/p/locations/global/publishers/google/models/gemini-2.5-pro:generateContent", 4),
    ("gemini", "google", "gemini-2.5-flash", "/gemini/v1beta/models/gemini-2.5-flash:generateContent", 10),
    ("gemini", "google", "gemini-2.0-flash", "/gemini/v1beta/models/gemini-2.0-flash:streamGenerateContent", 4),
    ("gemini", "google", "gemini-3-flash-preview",
     "/gemini/v1beta/models/gemini-3-flash-preview:generateContent", 1),
]
# (error_type, status, weight): None = a normal successful call
OUTCOMES = [(None, 200, 915), ("forbidden", 403, 30), ("gate_unavailable", 403, 5),
            ("upstream_error", 500, 15), ("upstream_error", 400, 5), ("rate_limited", 429, 10),
            ("client_closed", 499, 5), ("upstream_unreachable", 502, 3), ("usage_missing", 200, 10),
            ("capture_truncated", 200, 2)]


def _tokens(rng: random.Random, fmt: str, model: str) -> dict:
    inp = int(rng.lognormvariate(7, 1.2))
    out = int(rng.lognormvariate(5.5, 1.0))
    cached = rng.random() < 0.3
    if "embedding" in model:
        return {"input_tokens": inp, "output_tokens": 0, "cache_read_tokens": None,
                "cache_write_tokens": None, "reasoning_tokens": None, "total_tokens": inp}
    if fmt == "openai":
        cache_read = int(inp * rng.random()) // 128 * 128 if cached else 0
        reasoning = int(out * rng.random()) if model.startswith(("o4", "gpt-5")) else 0
        return {"input_tokens": inp, "output_tokens": out + reasoning, "cache_read_tokens": cache_read,
                "cache_write_tokens": None, "reasoning_tokens": reasoning,
                "total_tokens": inp + out + reasoning}
    if fmt == "anthropic":
        cache_read = rng.randint(1000, 50000) if cached else 0
        cache_write = rng.randint(500, 5000) if rng.random() < 0.1 else 0
        return {"input_tokens": inp, "output_tokens": out, "cache_read_tokens": cache_read,
                "cache_write_tokens": cache_write, "reasoning_tokens": None,
                "total_tokens": inp + out + cache_read + cache_write}
    cache_read = int(inp * rng.random()) if cached else None
    thoughts = int(rng.lognormvariate(6, 1)) if rng.random() < 0.5 else None
    return {"input_tokens": inp, "output_tokens": out, "cache_read_tokens": cache_read,
            "cache_write_tokens": None, "reasoning_tokens": thoughts,
            "total_tokens": inp + out + (thoughts or 0)}


def generate(folder: Path, n: int, seed: int = 7) -> tuple[Path, int]:
    """n records over 30 days into folder/stats.jsonl, rotated into about 4 files."""
    rng = random.Random(seed)
    owners = [f"user{i:03d}@example.com" for i in range(200)]
    keys = [(f"team-{i:02d}", f"...{i:04d}abcd") for i in range(40)]
    models = rng.choices(MODELS, weights=[m[-1] for m in MODELS], k=4096)
    outcomes = rng.choices(OUTCOMES, weights=[o[-1] for o in OUTCOMES], k=4096)
    path = folder / "stats.jsonl"
    writer = StatsWriter(path, rotate_bytes=max(n * 520 // 4, 4096), flush_interval=10)
    start = time.time() - 30 * 86400
    step = 30 * 86400 / max(n, 1)
    flush_every = max(1000, min(20000, n // 20))
    for i in range(n):
        provider, fmt, model, endpoint, _ = models[i & 4095]
        error_type, status, _ = outcomes[(i * 7 + (i >> 12)) & 4095]
        lmgate_id, masked = keys[rng.randrange(40)]
        owner = owners[rng.randrange(200)]
        t = start + i * step
        empty = dict.fromkeys(("input_tokens", "output_tokens", "cache_read_tokens",
                               "cache_write_tokens", "reasoning_tokens", "total_tokens"))
        if error_type in ("forbidden", "gate_unavailable"):     # unknown key: no owner, no model
            tokens, model_out, lmgate_id, owner = empty, None, None, None
        elif error_type is None:
            tokens, model_out = _tokens(rng, fmt, model), model
        elif error_type in ("usage_missing", "capture_truncated"):
            tokens, model_out = empty, model
        else:
            tokens, model_out = empty, None
        duration = rng.lognormvariate(0, 1)
        writer.add({
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z",
            "request_id": f"{rng.getrandbits(128):032x}",
            "lmgate_id": lmgate_id,
            "owner": owner,
            "provider": provider,
            "api_format": fmt,
            "method": "POST",
            "endpoint": endpoint,
            "model": model_out,
            "stream": rng.random() < 0.4,
            "status": status,
            **{k: tokens[k] for k in ("input_tokens", "output_tokens", "cache_read_tokens",
                                      "cache_write_tokens", "reasoning_tokens", "total_tokens")},
            "duration_ms": round(duration * 1000, 3),
            "response_bytes": rng.randint(200, 60000),
            "masked_key": masked,
            "error_type": error_type,
        })
        if writer.buffered >= flush_every:
            writer.flush()
    writer.flush()
    return path, n


_RUNNER = r"""
import argparse, io, json, os, resource, sys, time
from pathlib import Path
import lmgate.report.query as query
from lmgate.report import add_report_arguments, run_report
stats, prices, threads, fmt, by = sys.argv[1:6]
if threads != "auto":
    connect = query.connect
    def with_threads():
        con = connect()
        con.execute(f"SET threads = {int(threads)}")
        return con
    query.connect = with_threads
parser = argparse.ArgumentParser()
add_report_arguments(parser)
args = parser.parse_args(["--format", fmt, "--by", by])
out = io.StringIO()
started = time.perf_counter()
code = run_report(args, Path(stats), Path(prices), out)
seconds = time.perf_counter() - started
print(json.dumps({"code": code, "seconds": seconds, "output": out.getvalue(),
                  "threads": int(threads) if threads != "auto" else len(os.sched_getaffinity(0)),
                  "self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_report_process(stats: Path, threads: str, fmt: str, by: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", _RUNNER, str(stats), str(REPO / "config" / "prices.yaml"),
                           threads, fmt, by], capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"report process failed ({done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000, help="records to generate (default 1,000,000)")
    parser.add_argument("--threads", default="auto", help="DuckDB threads (default: one per CPU)")
    parser.add_argument("--by", default="owner,provider,model", help="--by of the report")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the report this many times; the best and the median are shown")
    parser.add_argument("--keep", type=Path,
                        help="generate into this folder and keep it; reused if it already holds "
                             "that many records")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lmgate-bench-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        marker = folder / "bench-records.txt"
        started = time.perf_counter()
        if marker.exists() and marker.read_text().strip() == str(args.records):
            stats, n, verb = folder / "stats.jsonl", args.records, "reused"
        else:
            for old in folder.glob("stats*.jsonl"):
                old.unlink()
            stats, n = generate(folder, args.records)
            marker.write_text(f"{n}\n")
            verb = "generated"
        files = sorted(folder.glob("stats*.jsonl"))
        size = sum(f.stat().st_size for f in files)
        print(f"{verb} {n:,} records in {len(files)} files ({len(files) - 1} rotated), "
              f"{size / 1e6:,.1f} MB, in {time.perf_counter() - started:.1f} s")

        runs = [run_report_process(stats, args.threads, "table", args.by)
                for _ in range(max(args.repeat, 1))]
        seconds = sorted(r["seconds"] for r in runs)
        best, median = seconds[0], seconds[len(seconds) // 2]
        threads = runs[0]["threads"]
        print(f"report (table, --by {args.by}, {threads} thread{'s' if threads > 1 else ''}): "
              f"{best:.2f} s, {n / best:,.0f} records/s"
              + (f" (best of {len(runs)}; median {median:.2f} s, {n / median:,.0f} records/s)"
                 if len(runs) > 1 else ""))
        print(f"peak memory (ru_maxrss): report process {max(r['self_mb'] for r in runs):.1f} MB")

        check = run_report_process(stats, args.threads, "json", "provider")
        counted = sum(row["requests"] for row in json.loads(check["output"]))
        status = "ok" if counted == n else f"MISMATCH: the report counted {counted:,}"
        print(f"check: {counted:,} requests counted for {n:,} records written: {status}")
        if counted != n:
            sys.exit(1)


if __name__ == "__main__":
    main()
