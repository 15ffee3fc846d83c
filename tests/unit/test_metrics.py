"""lmgate/metrics.py: what one record adds (tokens in the report's shape, cost at the report's
prices and tier), and the counters /metrics reads from the writer and the allow-list holder."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmgate.allowlist import AllowListHolder
from lmgate.metrics import Metrics
from lmgate.report.prices import Pricer
from lmgate.writer import StatsWriter

pytestmark = pytest.mark.unit


def rec(**fields) -> dict:
    base = {"timestamp": "2026-11-10T10:00:00.000Z", "request_id": "r1", "lmgate_id": "team-a",
            "owner": "alice@example.com", "provider": "openai", "api_format": "openai",
            "method": "POST", "endpoint": "/openai/v1/chat/completions", "model": "gpt-4o-mini",
            "stream": False, "status": 200, "input_tokens": 1000, "output_tokens": 100,
            "cache_read_tokens": 400, "cache_write_tokens": None, "reasoning_tokens": None,
            "total_tokens": 1100, "duration_ms": 812.4, "response_bytes": 1234,
            "masked_key": "...abc123", "error_type": None}
    base.update(fields)
    return base


def scrape(metrics: Metrics) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def tokens(m: dict, provider: str, model: str) -> dict[str, float]:
    return {dict(k[1])["kind"]: v for k, v in m.items()
            if k[0] == "lmgate_tokens_total" and dict(k[1])["provider"] == provider
            and dict(k[1])["model"] == model}


def cost(m: dict, provider: str, model: str) -> float:
    return m[("lmgate_cost_usd_total", (("model", model), ("provider", provider)))]


def units(provider, fmt, model, day="2026-11-10", tier=0):
    import bisect
    import datetime as dt
    pricer = Pricer(None)
    epoch = bisect.bisect_right(pricer.change_dates(), dt.date.fromisoformat(day))
    return pricer.lookup(provider, fmt, model, epoch, tier)


def test_tokens_have_the_reports_shape_per_format():
    metrics = Metrics()
    metrics.observe(rec())                                        # OpenAI: input includes cache reads
    metrics.observe(rec(provider="anthropic", api_format="anthropic", model="claude-sonnet-4-5",
                        input_tokens=1000, cache_read_tokens=400, cache_write_tokens=50))
    metrics.observe(rec(provider="gemini", api_format="google", model="gemini-2.5-flash",
                        input_tokens=1000, cache_read_tokens=400, output_tokens=100,
                        reasoning_tokens=30))                     # Google: output excludes reasoning
    m = scrape(metrics)
    assert tokens(m, "openai", "gpt-4o-mini") == {"input": 600, "output": 100, "cache_read": 400,
                                                  "cache_write": 0, "reasoning": 0}
    assert tokens(m, "anthropic", "claude-sonnet-4-5") == {"input": 1000, "output": 100, "cache_read": 400,
                                                           "cache_write": 50, "reasoning": 0}
    assert tokens(m, "gemini", "gemini-2.5-flash") == {"input": 600, "output": 130, "cache_read": 400,
                                                       "cache_write": 0, "reasoning": 30}
    u = units("openai", "openai", "gpt-4o-mini")
    assert cost(m, "openai", "gpt-4o-mini") == pytest.approx(600 * u.input + 400 * u.cache_read + 100 * u.output)


def test_a_long_prompt_is_priced_at_its_tier():
    metrics = Metrics()
    metrics.observe(rec(provider="gemini", api_format="google", model="gemini-2.5-pro",
                        input_tokens=300_000, cache_read_tokens=0, output_tokens=1000))
    tier = sum(300_000 > t for t in Pricer(None).thresholds())
    long, short = units("gemini", "google", "gemini-2.5-pro", tier=tier), units("gemini", "google", "gemini-2.5-pro")
    assert long.input > short.input
    assert cost(scrape(metrics), "gemini", "gemini-2.5-pro") == pytest.approx(
        300_000 * long.input + 1000 * long.output)


def test_an_unknown_model_is_unpriced_never_free():
    metrics = Metrics()
    metrics.observe(rec(model="no-such-model-xyz"))
    m = scrape(metrics)
    assert cost(m, "openai", "no-such-model-xyz") == 0
    assert m[("lmgate_unpriced_calls_total", (("model", "no-such-model-xyz"), ("provider", "openai")))] == 1


def test_the_price_file_wins(tmp_path):
    prices = tmp_path / "prices.yaml"
    prices.write_text("prices_as_of: 2026-12-01\ncurrency: USD\nunit: per_million_tokens\nproviders:\n"
                      "  openai:\n    - {model: \"gpt-4o-mini*\", input: 1, output: 2}\n  anthropic: []\n"
                      "  google: []\n")
    metrics = Metrics(prices_path=prices)
    metrics.observe(rec(input_tokens=1_000_000, cache_read_tokens=0, output_tokens=1_000_000))
    assert cost(scrape(metrics), "openai", "gpt-4o-mini") == pytest.approx(3.0)


def test_refused_calls_count_but_have_no_duration_or_tokens():
    metrics = Metrics(per_key_labels=True)
    metrics.observe(rec(status=403, error_type="forbidden", model=None, input_tokens=None,
                        output_tokens=None, lmgate_id=None, owner=None, folded_calls=7))
    m = scrape(metrics)
    assert m[("lmgate_calls_total", (("error_type", "forbidden"), ("lmgate_id", ""), ("model", ""),
                                     ("owner", ""), ("provider", "openai"), ("status_class", "4xx")))] == 7
    assert m[("lmgate_refusals_folded_calls_total", ())] == 7
    assert not any(k[0].startswith("gen_ai_client_operation_duration") for k in m)


def test_writer_counts_flushes_rotations_and_refused_writes(tmp_path):
    seen = []
    writer = StatsWriter(tmp_path / "stats.jsonl", 200, 10)
    writer.on_add = seen.append
    writer.add(rec())
    assert seen == [rec()]
    assert writer.flush() and (writer.flushes, writer.rotations) == (1, 0)
    writer.add(rec())
    assert writer.flush() and (writer.flushes, writer.rotations) == (2, 1)   # past 200 bytes
    blocked = tmp_path / "file"
    blocked.write_text("")
    refused = StatsWriter(blocked / "stats.jsonl", 200, 10)
    refused.add(rec())
    assert not refused.flush() and (refused.write_errors, refused.flushes) == (1, 0)


def test_allowlist_holder_counts_reloads_and_refused_ones(tmp_path):
    path = tmp_path / "allowlist.csv"

    def write(text: str, seconds_ago: float) -> None:
        path.write_text("id,api_key,owner,added\n" + text, encoding="utf-8")
        when = time.time_ns() - int(seconds_ago * 1e9)
        os.utime(path, ns=(when, when))

    write("a,sk-a-0123456789abcdef,A,2024\n", 30)
    holder = AllowListHolder(Path(path), 30)
    write("a,,A,2024\n", 20)
    assert holder.check() is False
    write("a,sk-a-0123456789abcdef,A,2024\nb,sk-b-0123456789abcdef,B,2024\n", 10)
    assert holder.check() is True
    assert (holder.reloads, holder.reload_errors) == (1, 1)


def test_a_batch_counts_what_its_records_count_one_by_one():
    """drain sums a group of records at once; every series must equal observe's, record by record
    (boundary durations, records without usage, folded refusals, a long-context tier, two days)."""
    batch = []
    for i in range(400):
        fields = {"duration_ms": [10.0, 20.0, 2560.0, 0.0, 812.4, 99999.0][i % 6],
                  "input_tokens": 100 + i, "output_tokens": i % 7, "cache_read_tokens": i % 3}
        if i % 4 == 1:
            fields.update(provider="anthropic", api_format="anthropic", model="claude-sonnet-4-5",
                          cache_write_tokens=i % 5)
        if i % 4 == 2:
            fields.update(provider="gemini", api_format="google", model="gemini-2.5-pro",
                          reasoning_tokens=i % 11)
        if i % 10 == 3:
            fields.update(input_tokens=None, output_tokens=None)
        if i % 4 == 2 and i % 50 == 6:
            fields.update(input_tokens=300_000)                  # past a long-context threshold
        if i % 4 == 2 and i % 30 == 2:
            fields.update(timestamp="2026-11-11T00:00:01.000Z")  # a second day in the batch
        if i % 25 == 9:
            fields.update(status=403, error_type="forbidden", model=None, input_tokens=None,
                          output_tokens=None, folded_calls=7)
        if i % 60 == 11:
            fields.update(status=403, error_type="gate_unavailable", model=None)
        if i % 30 == 13:
            fields.update(status=529, error_type="upstream_error", owner="bob@example.com")
        batch.append(rec(request_id=f"r{i}", **fields))
    for per_key in (False, True):
        one_by_one, batched = Metrics(per_key), Metrics(per_key)
        singles = []
        batched.observe = lambda record, observe=batched.observe, singles=singles: (
            singles.append(record), observe(record))
        for record in batch:
            one_by_one.observe(record)
            batched.add(record)
        batched.drain()
        expected, got = scrape(one_by_one), scrape(batched)
        for clock in ("lmgate_records_lag_seconds", "lmgate_newest_record_end_timestamp_seconds"):
            got.pop((clock, ()))    # drain's alone: observe leaves them to it
        assert got.keys() == expected.keys()
        for series, value in expected.items():
            assert got[series] == pytest.approx(value, rel=1e-9), series
        assert batched.newest is batch[-1]
        assert len(singles) < len(batch) / 2     # most groups were summed at once
