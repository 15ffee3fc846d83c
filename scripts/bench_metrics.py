"""What /metrics costs per record: StatsWriter.add with and without Metrics.add as its hook, and
the drains that count what add kept (a drain each DRAIN_EVERY records, about a second's worth at
the benchmark's rate).

    .venv/bin/python scripts/bench_metrics.py [--records 100000] [--repeat 5] [--per-key-labels]

Records are the sidecar's own (records.from_spool on spool lines for a mix of providers, models,
owners and outcomes); best of --repeat runs, in microseconds per record. docs/metrics.md has the
numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmgate import records  # noqa: E402
from lmgate.metrics import Metrics  # noqa: E402
from lmgate.writer import StatsWriter  # noqa: E402
from tests.support.spool_lines import spool_line  # noqa: E402

MODELS = [("openai", "/openai/v1/chat/completions", "gpt-4o-mini"),
          ("openai", "/openai/v1/chat/completions", "gpt-4.1"),
          ("anthropic", "/anthropic/v1/messages", "claude-sonnet-4-5-20250929"),
          ("gemini", "/gemini/v1beta/models/gemini-2.5-flash:generateContent", "gemini-2.5-flash")]


def body(provider: str, model: str, i: int) -> bytes:
    if provider == "openai":
        return json.dumps({"model": model, "usage": {"prompt_tokens": 100 + i % 50,
                                                     "completion_tokens": 20 + i % 7}}).encode()
    if provider == "anthropic":
        return json.dumps({"type": "message", "model": model, "usage": {
            "input_tokens": 100 + i % 50, "output_tokens": 20, "cache_read_input_tokens": 30}}).encode()
    return json.dumps({"modelVersion": model, "usageMetadata": {
        "promptTokenCount": 100 + i % 50, "candidatesTokenCount": 20, "thoughtsTokenCount": 5}}).encode()


def sample(n: int) -> list[dict]:
    now = time.time()
    out = []
    for i in range(n):
        provider, path, model = MODELS[i % len(MODELS)]
        denied = i % 20 == 0
        line = spool_line(b"" if denied else body(provider, model, i), rid=f"r{i}",
                          id=f"key{i % 50}", own=f"owner{i % 10}@example.com", p=provider, u=path,
                          s=403 if denied else 200, err="forbidden" if denied else "",
                          t=f"{0.2 + (i % 30) / 10:.3f}", ts=f"{now:.3f}")
        out.append(records.from_spool(line, now))
    return out


DRAIN_EVERY = 20_000


def run(recs: list[dict], metrics: Metrics | None) -> float:
    writer = StatsWriter(Path("/dev/null"), 1 << 40, 3600)
    writer.on_add = metrics.add if metrics else None
    started = time.perf_counter()
    for start in range(0, len(recs), DRAIN_EVERY):
        for r in recs[start:start + DRAIN_EVERY]:
            writer.add(r)
        if metrics:
            metrics.drain()
    return (time.perf_counter() - started) / len(recs) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--per-key-labels", action="store_true")
    args = parser.parse_args()
    recs = sample(args.records)
    metrics = Metrics(args.per_key_labels)
    metrics.observe(recs[0])   # prices looked up once, as on a running sidecar after its first calls
    plain = min(run(recs, None) for _ in range(args.repeat))
    hooked = min(run(recs, metrics) for _ in range(args.repeat))
    alone = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        for r in recs:
            metrics.observe(r)
        alone.append((time.perf_counter() - started) / len(recs) * 1e6)
    print(f"{args.records} records, best of {args.repeat}, per_key_labels={args.per_key_labels}")
    print(f"StatsWriter.add without metrics: {plain:.2f} us/record")
    print(f"StatsWriter.add with metrics:    {hooked:.2f} us/record (+{hooked - plain:.2f})")
    print(f"Metrics.observe alone, one by one: {min(alone):.2f} us/record")
    started = time.perf_counter()
    text = metrics.exposition()
    print(f"one scrape: {(time.perf_counter() - started) * 1e3:.1f} ms, {len(text)} bytes")


if __name__ == "__main__":
    main()
