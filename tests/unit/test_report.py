"""`lmgate report`: reading the stats files, grouping, pricing and the three output formats."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import genai_prices
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from lmgate.report import add_report_arguments, run_report
from lmgate.report import command, output, query
from lmgate.report.prices import Pricer, PriceError, load_prices
from lmgate.report.query import GROUP_FIELDS, stats_files, ts_bound
from lmgate.report.summary import summarize
from lmgate.settings import ConfigError

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]

# Round prices so that expected costs are easy to write down (USD per million tokens).
PRICES = """\
prices_as_of: 2026-01-15
currency: USD
unit: per_million_tokens
providers:
  openai:
    - {model: "cheap*", input: 1, cached_input: 0.5, output: 2}
    - {model: "nocache*", input: 1, output: 2}
  anthropic:
    - {model: "claude*", input: 3, cached_input: 0.3, cache_write: 3.75, output: 15}
    - {model: "nowrite*", input: 3, output: 15}
  google:
    - {model: "gem*", input: 1, cached_input: 0.25, output: 4}
"""

COUNTER_KEYS = ["requests", "denied", "errors", "input_tokens", "output_tokens", "cache_read_tokens",
                "cache_write_tokens", "reasoning_tokens", "cost_usd", "price_source"]


def rec(ts: str = "2026-11-10T10:00:00.000Z", **fields: Any) -> dict[str, Any]:
    """A record with the writer's keys, in the writer's order (lmgate/records.py)."""
    base = {
        "timestamp": ts, "request_id": "9f8e7d6c5b4a39281706f5e4d3c2b1a0", "lmgate_id": "team-a",
        "owner": "alice@example.com", "provider": "openai", "api_format": "openai", "method": "POST",
        "endpoint": "/openai/v1/chat/completions", "model": "cheap-1", "stream": False, "status": 200,
        "input_tokens": 10, "output_tokens": 5, "cache_read_tokens": 0, "cache_write_tokens": None,
        "reasoning_tokens": None, "total_tokens": 15, "duration_ms": 812.4, "response_bytes": 1234,
        "masked_key": "...abc123", "error_type": None,
    }
    base.update(fields)
    return base


def line(record: dict[str, Any], compact: bool = True) -> str:
    seps = (",", ":") if compact else (", ", ": ")
    return json.dumps(record, ensure_ascii=False, separators=seps) + "\n"


def write(path: Path, records: list[Any], compact: bool = True) -> Path:
    """Records (dicts) or raw lines (str, written as they are) into path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        for item in records:
            f.write(item if isinstance(item, str) else line(item, compact))
    return path


@pytest.fixture
def prices_file(tmp_path: Path) -> Path:
    path = tmp_path / "prices.yaml"
    path.write_text(PRICES, encoding="utf-8")
    return path


@pytest.fixture
def run(tmp_path: Path, prices_file: Path, capsys: pytest.CaptureFixture[str]):
    """run(*argv, stats=..., prices=...) -> (exit code, stdout, stderr) of run_report."""

    def go(*argv: str, stats: Path | None = None, prices: Path | None = None) -> tuple[int, str, str]:
        parser = argparse.ArgumentParser()
        add_report_arguments(parser)
        args = parser.parse_args(list(argv))
        out = io.StringIO()
        capsys.readouterr()
        code = run_report(args, stats or tmp_path / "data" / "stats.jsonl", prices or prices_file, out)
        return code, out.getvalue(), capsys.readouterr().err

    return go


def as_json(run_result: tuple[int, str, str]) -> list[dict[str, Any]]:
    code, out, err = run_result
    assert code == 0, err
    return json.loads(out)


# ---------------------------------------------------------------- grouping

@pytest.mark.parametrize("field", GROUP_FIELDS)
def test_group_by_each_field(run, tmp_path: Path, field: str) -> None:
    stats = write(tmp_path / "data" / "stats.jsonl", [
        rec("2026-11-10T10:00:00.000Z"),
        rec("2026-11-10T10:30:00.000Z", owner="bob@example.com", lmgate_id="team-b", model="cheap-2",
            endpoint="/openai/v1/responses", status=429, error_type="rate_limited",
            input_tokens=None, output_tokens=None),
        rec("2026-11-11T09:00:00.000Z", provider="anthropic", api_format="anthropic",
            model="claude-x", endpoint="/anthropic/v1/messages"),
        rec("2026-11-11T09:59:59.999Z", provider="anthropic", api_format="anthropic",
            model="claude-x", endpoint="/anthropic/v1/messages"),
    ])
    rows = as_json(run("--format", "json", "--by", field, stats=stats))
    by_value = {row[field]: row["requests"] for row in rows}
    expected = {
        "owner": {"alice@example.com": 3, "bob@example.com": 1},
        "lmgate_id": {"team-a": 3, "team-b": 1},
        "provider": {"openai": 2, "anthropic": 2},
        "model": {"cheap-1": 1, "cheap-2": 1, "claude-x": 2},
        "endpoint": {"/openai/v1/chat/completions": 1, "/openai/v1/responses": 1,
                     "/anthropic/v1/messages": 2},
        "day": {"2026-11-10": 2, "2026-11-11": 2},
        "hour": {"2026-11-10T10:00Z": 2, "2026-11-11T09:00Z": 2},
        "status": {200: 3, 429: 1},
        "error_type": {None: 3, "rate_limited": 1},
    }[field]
    assert by_value == expected
    assert all(list(row) == [field] + COUNTER_KEYS for row in rows)


def test_group_by_several_fields_and_default(run, tmp_path: Path) -> None:
    stats = write(tmp_path / "data" / "stats.jsonl", [
        rec(), rec(owner="bob@example.com"), rec(), rec(model="cheap-2"),
    ])
    rows = as_json(run("--format", "json", stats=stats))
    assert [(r["owner"], r["provider"], r["model"], r["requests"]) for r in rows] == [
        ("alice@example.com", "openai", "cheap-1", 2),
        ("alice@example.com", "openai", "cheap-2", 1),
        ("bob@example.com", "openai", "cheap-1", 1),
    ]
    rows = as_json(run("--format", "json", "--by", " model , day,model", stats=stats))
    assert [list(r)[:2] for r in rows] == [["model", "day"]] * 2


def test_denied_errors_and_missing_usage_are_counted_apart(run, tmp_path: Path) -> None:
    stats = write(tmp_path / "data" / "stats.jsonl", [
        rec(),
        rec(error_type="forbidden", status=403, owner=None, model=None, input_tokens=None, output_tokens=None),
        rec(error_type="gate_unavailable", status=403, owner=None, model=None, input_tokens=None, output_tokens=None),
        rec(error_type="upstream_error", status=500, input_tokens=None, output_tokens=None),
        rec(error_type="client_closed", status=499, input_tokens=None, output_tokens=None),
        rec(error_type="usage_missing", input_tokens=None, output_tokens=None),
        rec(error_type="capture_truncated", input_tokens=None, output_tokens=None),
    ])
    [row] = as_json(run("--format", "json", "--by", "provider", stats=stats))
    assert (row["requests"], row["denied"], row["errors"]) == (7, 2, 2)
    code, out, _ = run("--by", "provider", stats=stats)
    assert "2 successful calls had no token counts" in out


def test_canary_calls_are_left_out(run, tmp_path: Path) -> None:
    """`lmgate doctor`'s canary calls are records (error_type canary), never usage."""
    canary = dict(error_type="canary", status=204, provider="_lmgate", lmgate_id=None, owner=None,
                  model=None, endpoint="/_lmgate/canary/x", input_tokens=None, output_tokens=None)
    stats = write(tmp_path / "data" / "stats.jsonl", [rec(), rec(**canary), rec(**canary)])
    rows = as_json(run("--format", "json", "--by", "provider", stats=stats))
    assert [(r["provider"], r["requests"], r["errors"]) for r in rows] == [("openai", 1, 0)]


def test_folded_refusals_count_every_call_they_stand_for(run, tmp_path: Path) -> None:
    """A record of a flood of refused calls (lmgate/refusals.py) counts as the calls it folds."""
    refused = dict(error_type="forbidden", status=403, lmgate_id=None, owner=None, model=None,
                   input_tokens=None, output_tokens=None)
    stats = write(tmp_path / "data" / "stats.jsonl",
                  [rec(), rec(**refused), rec(**refused, folded_calls=290)])
    [row] = as_json(run("--format", "json", "--by", "provider", stats=stats))
    assert (row["requests"], row["denied"]) == (292, 291)
    code, out, _ = run("--format", "csv", "--sql", "SELECT sum(coalesce(folded_calls, 1)) AS calls FROM records",
                       stats=stats)
    assert code == 0 and out.strip().splitlines()[-1] == "292"


# ---------------------------------------------------------------- files, rotation, time window

def test_rotated_files_are_read_in_order_each_once(run, tmp_path: Path) -> None:
    data = tmp_path / "data"
    # One malformed line per file shows the reading order on stderr.
    write(data / "stats.20261101T000000Z-1.jsonl", [rec("2026-11-01T00:00:02.000Z", owner="c"), "bad-3\n"])
    write(data / "stats.20261101T000000Z.jsonl", [rec("2026-11-01T00:00:01.000Z", owner="b"), "bad-2\n"])
    write(data / "stats.20261031T235959Z.jsonl", [rec("2026-10-31T23:00:00.000Z", owner="a"), "bad-1\n"])
    write(data / "stats.20261101T000000Z-10.jsonl", [rec("2026-11-01T00:00:04.000Z", owner="e"), "bad-5\n"])
    write(data / "stats.20261101T000000Z-2.jsonl", [rec("2026-11-01T00:00:03.000Z", owner="d"), "bad-4\n"])
    write(data / "stats.jsonl", [rec("2026-11-02T00:00:00.000Z", owner="f"), "bad-6\n"])
    write(data / "other.20261101T000000Z.jsonl", [rec(owner="not-mine")])
    write(data / "stats.20261101T000000Z.json", [rec(owner="not-mine-either")])
    # A rotated file compressed since is read too.
    with gzip.open(data / "stats.20261101T000000Z-3.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(line(rec("2026-11-01T00:00:03.500Z", owner="d2")) + "bad-4b\n")

    assert [f.path.name for f in stats_files(data / "stats.jsonl")] == [
        "stats.20261031T235959Z.jsonl", "stats.20261101T000000Z.jsonl", "stats.20261101T000000Z-1.jsonl",
        "stats.20261101T000000Z-2.jsonl", "stats.20261101T000000Z-3.jsonl.gz",
        "stats.20261101T000000Z-10.jsonl", "stats.jsonl"]
    code, out, err = run("--format", "json", "--by", "owner")
    assert code == 0
    assert {r["owner"]: r["requests"] for r in json.loads(out)} == dict.fromkeys(
        ["a", "b", "c", "d", "d2", "e", "f"], 1)
    listed = [ln.split(":")[0].rsplit("/", 1)[-1] for ln in err.splitlines() if ln.startswith("  ")]
    assert listed == ["stats.20261031T235959Z.jsonl", "stats.20261101T000000Z.jsonl",
                      "stats.20261101T000000Z-1.jsonl", "stats.20261101T000000Z-2.jsonl",
                      "stats.20261101T000000Z-3.jsonl.gz", "stats.20261101T000000Z-10.jsonl",
                      "stats.jsonl"]
    code, out, err = run("--format", "json", "--by", "owner", "--since", "2026-11-01T00:00:03Z")
    assert {r["owner"]: r["requests"] for r in json.loads(out)} == dict.fromkeys(["d", "d2", "e", "f"], 1)


def test_time_window_across_rotated_files(run, tmp_path: Path) -> None:
    data = tmp_path / "data"
    write(data / "stats.20261105T000000Z.jsonl", [
        rec("2026-10-31T23:59:59.999Z"), rec("2026-11-01T00:00:00.000Z"), rec("2026-11-04T12:00:00.000Z")])
    write(data / "stats.20261108T000000Z.jsonl", [rec("2026-11-06T00:00:00.000Z"), rec("2026-11-07T23:59:59.999Z")])
    write(data / "stats.jsonl", [rec("2026-11-08T00:00:00.000Z"), rec("2026-11-09T08:00:00Z")])

    def days(*argv: str) -> dict[str, int]:
        return {r["day"]: r["requests"] for r in as_json(run("--format", "json", "--by", "day", *argv))}

    assert sum(days().values()) == 7
    # --since is inclusive; a bare --until date is the start of that day (exclusive).
    assert days("--since", "2026-11-01", "--until", "2026-11-08") == {
        "2026-11-01": 1, "2026-11-04": 1, "2026-11-06": 1, "2026-11-07": 1}
    assert days("--since", "2026-11-07T23:59:59Z") == {"2026-11-07": 1, "2026-11-08": 1, "2026-11-09": 1}
    assert days("--since", "2026-11-07T23:59:59.5Z") == days("--since", "2026-11-07T23:59:59Z")
    assert days("--until", "2026-11-01T00:00:00Z") == {"2026-10-31": 1}
    assert days("--since", "2026-11-09T09:00:00+01:00") == {"2026-11-09": 1}     # 08:00Z


def test_since_duration_is_relative_to_now(run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = dt.datetime(2026, 11, 27, 12, 0, 0, tzinfo=dt.timezone.utc)
    monkeypatch.setattr(command, "_now", lambda: now)
    write(tmp_path / "data" / "stats.jsonl", [
        rec("2026-11-19T12:00:00.000Z"), rec("2026-11-20T12:00:00.000Z"), rec("2026-11-26T12:00:00.000Z"),
        rec("2026-11-27T11:29:00.000Z"), rec("2026-11-27T11:45:00.000Z")])
    counts = {}
    for since in ("7d", "24h", "30m"):
        counts[since] = sum(r["requests"] for r in as_json(run("--format", "json", "--since", since)))
    assert counts == {"7d": 4, "24h": 3, "30m": 1}


def test_rotated_files_long_before_since_are_not_opened(run, tmp_path: Path) -> None:
    data = tmp_path / "data"
    old = write(data / "stats.20261001T000000Z.jsonl", [rec("2026-09-30T00:00:00.000Z"), "garbage\n"])
    write(data / "stats.20261110T000000Z.jsonl", [rec("2026-11-09T23:30:00.000Z")])
    write(data / "stats.jsonl", [rec("2026-11-10T00:30:00.000Z")])
    code, out, err = run("--format", "json", "--since", "2026-11-10", "--by", "day")
    assert [(r["day"], r["requests"]) for r in json.loads(out)] == [("2026-11-10", 1)]
    assert str(old) not in err                                  # not even read
    code, out, err = run("--format", "json", "--by", "day")
    assert f"{old}:2: not valid JSON" in err


def test_missing_stats_is_an_empty_report(run, tmp_path: Path) -> None:
    code, out, err = run("--format", "json")
    assert (code, json.loads(out)) == (0, [])
    assert "no stats yet" in err and len(err.strip().splitlines()) == 1
    code, out, err = run("--format", "csv")
    assert out == ",".join(["owner", "provider", "model"] + COUNTER_KEYS) + "\n"
    code, out, err = run()
    assert code == 0 and "(no records)" in out


# ---------------------------------------------------------------- cost

def only_row(run, stats: Path, *argv: str) -> dict[str, Any]:
    [row] = as_json(run("--format", "json", "--by", "provider", *argv, stats=stats))
    return row


@pytest.mark.parametrize("fields, tokens, cost", [
    # openai: input includes cache reads; output includes reasoning
    (dict(model="cheap-1", input_tokens=1000, output_tokens=300, cache_read_tokens=0, reasoning_tokens=100),
     (1000, 300, 0, 0, 100), (1000 * 1 + 300 * 2) / 1e6),
    (dict(model="cheap-1", input_tokens=1000, output_tokens=300, cache_read_tokens=400, reasoning_tokens=None),
     (600, 300, 400, 0, 0), (600 * 1 + 400 * 0.5 + 300 * 2) / 1e6),
    # no cached_input price: cache reads at the input price
    (dict(model="nocache-1", input_tokens=1000, output_tokens=300, cache_read_tokens=400),
     (600, 300, 400, 0, 0), (1000 * 1 + 300 * 2) / 1e6),
    # anthropic: input excludes cache reads and writes
    (dict(provider="anthropic", api_format="anthropic", model="claude-sonnet", input_tokens=100,
          output_tokens=50, cache_read_tokens=0, cache_write_tokens=0),
     (100, 50, 0, 0, 0), (100 * 3 + 50 * 15) / 1e6),
    (dict(provider="anthropic", api_format="anthropic", model="claude-sonnet", input_tokens=100,
          output_tokens=50, cache_read_tokens=1000, cache_write_tokens=200),
     (100, 50, 1000, 200, 0), (100 * 3 + 1000 * 0.3 + 200 * 3.75 + 50 * 15) / 1e6),
    # no cache_write price: cache writes at the input price
    (dict(provider="anthropic", api_format="anthropic", model="nowrite", input_tokens=100,
          output_tokens=50, cache_read_tokens=1000, cache_write_tokens=200),
     (100, 50, 1000, 200, 0), (100 * 3 + 1000 * 3 + 200 * 3 + 50 * 15) / 1e6),
    # Claude on Vertex AI: provider google, Anthropic's format and price list
    (dict(provider="google", api_format="anthropic", model="claude-sonnet@2025", input_tokens=100,
          output_tokens=50, cache_read_tokens=1000, cache_write_tokens=200),
     (100, 50, 1000, 200, 0), (100 * 3 + 1000 * 0.3 + 200 * 3.75 + 50 * 15) / 1e6),
    # google: input includes cache reads; reasoning comes on top of output, at the output price
    (dict(provider="google", api_format="google", model="gem-pro", input_tokens=1000, output_tokens=100,
          cache_read_tokens=None, reasoning_tokens=None),
     (1000, 100, 0, 0, 0), (1000 * 1 + 100 * 4) / 1e6),
    (dict(provider="gemini", api_format="google", model="gem-flash", input_tokens=1000, output_tokens=100,
          cache_read_tokens=300, reasoning_tokens=50),
     (700, 150, 300, 0, 50), (700 * 1 + 300 * 0.25 + 150 * 4) / 1e6),
])
def test_cost_per_format(run, tmp_path: Path, fields: dict, tokens: tuple, cost: float) -> None:
    stats = write(tmp_path / "data" / "stats.jsonl", [rec(**fields), rec(**fields)])
    row = only_row(run, stats)
    assert (row["input_tokens"], row["output_tokens"], row["cache_read_tokens"],
            row["cache_write_tokens"], row["reasoning_tokens"]) == tuple(2 * t for t in tokens)
    assert row["cost_usd"] == pytest.approx(2 * cost, abs=1e-6)


def test_null_counts_cost_nothing(run, tmp_path: Path) -> None:
    stats = write(tmp_path / "data" / "stats.jsonl", [
        rec(input_tokens=None, output_tokens=None, cache_read_tokens=None, error_type="usage_missing"),
        rec(error_type="forbidden", model=None, input_tokens=None, output_tokens=None, cache_read_tokens=None)])
    row = only_row(run, stats)
    assert row["cost_usd"] == 0 and row["input_tokens"] == 0


def test_unpriced_model_has_no_cost_and_is_listed_once(run, tmp_path: Path, prices_file: Path) -> None:
    stats = write(tmp_path / "data" / "stats.jsonl", [
        rec(model="mystery-1", owner="a"), rec(model="mystery-1", owner="b"), rec(model="mystery-1", owner="b"),
        rec(model="cheap-1", owner="a", input_tokens=1_000_000, output_tokens=0),
        rec(model="mystery-1", owner="c", error_type="forbidden", input_tokens=None, output_tokens=None),
    ])
    rows = as_json(run("--format", "json", "--by", "owner,model", stats=stats))
    cost = {(r["owner"], r["model"]): r["cost_usd"] for r in rows}
    assert cost == {("a", "cheap-1"): 1.0, ("a", "mystery-1"): None, ("b", "mystery-1"): None,
                    ("c", "mystery-1"): 0.0}     # denied: no tokens, nothing to price
    rows = as_json(run("--format", "json", "--by", "owner", stats=stats))
    assert {r["owner"]: r["cost_usd"] for r in rows} == {"a": None, "b": None, "c": 0.0}

    code, out, err = run("--by", "owner,model", stats=stats)
    assert out.count("mystery-1 (openai)") == 1
    assert "unpriced models: mystery-1 (openai): 3 requests" in out
    total = next(ln for ln in out.splitlines() if ln.startswith("TOTAL"))
    assert total.endswith("1.00+") and "partial" in out
    code, out, err = run("--by", "owner", stats=stats)        # a: priced and unpriced usage
    assert next(ln for ln in out.splitlines() if ln.startswith("a ")).endswith("1.00+")

    code, out, err = run("--format", "csv", "--by", "model", stats=stats)
    assert list(csv.reader(io.StringIO(out)))[1:] == [
        ["cheap-1", "1", "0", "0", "1000000", "0", "0", "0", "0", "1.000000", str(prices_file)],
        ["mystery-1", "4", "1", "0", "30", "15", "0", "0", "0", "", ""]]
    assert err.count("unpriced models: mystery-1 (openai): 3 requests") == 1


def test_shipped_price_file_holds_overrides_only() -> None:
    table = load_prices(REPO / "config" / "prices.yaml")
    assert table.as_of and set(table.lists) == {"openai", "anthropic", "google"}
    assert not any(table.lists.values())        # list prices come from genai-prices


@pytest.mark.parametrize("provider, api_format, model", [
    ("openai", "openai", "gpt-4o-mini-2024-07-18"), ("openai", "openai", "gpt-4.1-mini-2025-04-14"),
    ("openai", "openai", "gpt-5-nano-2025-08-07"), ("openai", "openai", "o4-mini-2025-04-16"),
    ("openai", "openai", "text-embedding-3-small"),
    ("anthropic", "anthropic", "claude-sonnet-4-20250514"), ("anthropic", "anthropic", "claude-haiku-4-5-20251001"),
    ("google", "anthropic", "claude-sonnet-4@20250514"),       # Claude on Vertex AI
    ("google", "google", "gemini-2.5-pro"), ("gemini", "google", "gemini-2.5-flash"),
    ("gemini", "google", "gemini-2.0-flash"),
])
def test_common_models_get_list_prices(provider: str, api_format: str, model: str) -> None:
    units = Pricer(None).lookup(provider, api_format, model, 0, 0)
    assert units is not None and units.source == "genai-prices", model
    assert units.input > 0 and units.cache_read <= units.input


def per_call_price(model: str, provider: str, when: str, **usage: int) -> float:
    """genai-prices' own price of one call, the slow obvious way."""
    return float(genai_prices.calc_price(
        genai_prices.Usage(**usage), model, provider_id=provider,
        genai_request_timestamp=dt.datetime.fromisoformat(when.replace("Z", "+00:00"))).total_price)


def test_list_prices_per_call_with_tiers_and_cache(run, tmp_path: Path) -> None:
    """Grouped pricing equals genai-prices' price of each call: long prompts in their tier,
    Anthropic's cache counts on top of its input, OpenAI's inside it."""
    small = dict(provider="anthropic", api_format="anthropic", model="claude-sonnet-4-5-20250929",
                 input_tokens=1000, output_tokens=500, cache_read_tokens=2000, cache_write_tokens=300)
    big = dict(small, input_tokens=150_000, cache_read_tokens=60_000)       # prompt > 200k tokens
    gpt = dict(provider="openai", api_format="openai", model="gpt-4o-mini-2024-07-18",
               input_tokens=5000, output_tokens=700, cache_read_tokens=1024, reasoning_tokens=0)
    stats = write(tmp_path / "data" / "stats.jsonl", [
        rec("2026-11-10T10:00:00.000Z", **small), rec("2026-11-10T11:00:00.000Z", **big),
        rec("2026-11-10T12:00:00.000Z", **gpt)])
    no_overrides = tmp_path / "none.yaml"
    no_overrides.write_text(PRICES.split("providers:")[0] + "providers: {}\n", encoding="utf-8")
    rows = {r["model"]: r for r in as_json(run("--format", "json", "--by", "model", stats=stats,
                                               prices=no_overrides))}

    def anthropic_call(f: dict) -> float:
        return per_call_price(f["model"], "anthropic", "2026-11-10T10:00:00Z",
                              input_tokens=f["input_tokens"] + f["cache_read_tokens"] + f["cache_write_tokens"],
                              output_tokens=f["output_tokens"], cache_read_tokens=f["cache_read_tokens"],
                              cache_write_tokens=f["cache_write_tokens"])

    claude = rows["claude-sonnet-4-5-20250929"]
    assert claude["cost_usd"] == pytest.approx(anthropic_call(small) + anthropic_call(big), abs=1e-6)
    assert claude["price_source"] == "genai-prices"
    flat = per_call_price(big["model"], "anthropic", "2026-11-10T10:00:00Z", input_tokens=1000)
    assert anthropic_call(big) > flat * 210 * 1.4      # the long prompt costs more per token
    assert rows["gpt-4o-mini-2024-07-18"]["cost_usd"] == pytest.approx(per_call_price(
        "gpt-4o-mini", "openai", "2026-11-10T12:00:00Z", input_tokens=5000, output_tokens=700,
        cache_read_tokens=1024), abs=1e-6)      # cost_usd has 6 decimals
    code, out, err = run("--by", "model", stats=stats, prices=no_overrides)
    assert "list prices from genai-prices" in " ".join(out.split())


def test_override_wins_and_is_named(run, tmp_path: Path, prices_file: Path) -> None:
    prices_file.write_text(PRICES.replace('- {model: "cheap*"', '- {model: "gpt-4o-mini*", input: 0.1, output: 0.2}\n    - {model: "cheap*"'),
                           encoding="utf-8")
    stats = write(tmp_path / "data" / "stats.jsonl", [
        rec(model="gpt-4o-mini-2024-07-18", input_tokens=1_000_000, output_tokens=1_000_000, cache_read_tokens=0),
        rec(model="gpt-4.1-nano", owner="bob", input_tokens=10, output_tokens=0, cache_read_tokens=0)])
    rows = as_json(run("--format", "json", "--by", "owner,model", stats=stats))
    assert [(r["model"], r["cost_usd"], r["price_source"]) for r in rows] == [
        ("gpt-4o-mini-2024-07-18", pytest.approx(0.3), str(prices_file)),
        ("gpt-4.1-nano", pytest.approx(per_call_price("gpt-4.1-nano", "openai", "2026-11-10T10:00:00Z",
                                                      input_tokens=10)), "genai-prices")]
    [both] = as_json(run("--format", "json", "--by", "", stats=stats))
    assert both["price_source"] == "+".join(sorted(["genai-prices", str(prices_file)]))
    code, out, err = run("--format", "csv", "--by", "model", stats=stats)
    assert f"lmgate report: priced by {prices_file}: gpt-4o-mini-2024-07-18 (openai)" in err


# ---------------------------------------------------------------- malformed lines

def test_malformed_lines_are_skipped_and_reported(run, tmp_path: Path, prices_file: Path) -> None:
    good = rec()
    stats = write(tmp_path / "data" / "stats.jsonl", [
        good,                                                   # 1
        "this is not json\n",                                   # 2
        "\n",                                                   # 3 blank: ignored
        "[1, 2, 3]\n",                                          # 4
        line(rec(input_tokens="12")),                           # 5
        line(rec(output_tokens=True)),                          # 6
        line(rec(cache_read_tokens=-1)),                        # 7
        line(rec(owner=42)),                                    # 8
        line(rec(timestamp="yesterday")),                       # 9
        line({k: v for k, v in good.items() if k != "timestamp"}),   # 10
        line(rec(input_tokens=1.5)),                            # 11
        "\x00\x00\x00\x00\n",                                   # 12
        line(good),                                             # 13
        line(good)[:40],                                        # 14: torn last line
    ])
    code, out, err = run("--format", "json", "--by", "provider", stats=stats)
    assert code == 0 and json.loads(out)[0]["requests"] == 2
    lines = err.splitlines()
    assert lines[0] == "lmgate report: skipped 11 malformed lines:"
    assert [ln.split(":")[1] for ln in lines[1:11]] == ["2", "4", "5", "6", "7", "8", "9", "10", "11", "12"]
    assert lines[11] == "  ... and 1 more"
    assert lines[12:] == [f"lmgate report: priced by {prices_file}: cheap-1 (openai)"]
    assert f"  {stats}:5: input_tokens is not a non-negative integer or null" in lines
    assert f"  {stats}:8: owner is not a string or null" in lines


def test_malformed_line_in_a_big_file_keeps_line_numbers(run, tmp_path: Path) -> None:
    records = [rec(f"2026-11-10T{i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}.000Z", input_tokens=i)
               for i in range(6000)]
    lines_ = [line(r) for r in records]
    lines_[333] = lines_[333][:50] + "\n"
    stats = write(tmp_path / "data" / "stats.jsonl", lines_)
    code, out, err = run("--format", "json", "--by", "provider", stats=stats)
    [row] = json.loads(out)
    assert row["requests"] == 5999 and row["input_tokens"] == sum(range(6000)) - 333
    assert f"{stats}:334: not valid JSON" in err and "skipped 1 malformed line:" in err


# ---------------------------------------------------------------- DuckDB agrees with json.loads

def reference(path: Path, by: tuple[str, ...], since: str | None, until: str | None) -> tuple[dict, int]:
    """Requests and input tokens per group, and the malformed lines, the slow obvious way."""
    sums: dict[tuple, list[int]] = {}
    bad = 0
    for raw in path.read_bytes().split(b"\n"):
        if query.why_malformed(raw, since, until):
            bad += 1
            continue
        if not raw.strip():
            continue
        r = json.loads(raw)
        ts = query.canonical_ts(r["timestamp"])
        if (since and ts < since) or (until and ts >= until):
            continue
        key = tuple(ts[:10] if name == "day" else ts[:13] + ":00Z" if name == "hour" else r.get(name)
                    for name in by)
        acc = sums.setdefault(key, [0, 0])
        acc[0] += 1
        acc[1] += r.get("input_tokens") or 0
    return sums, bad


names = st.sampled_from(["alice@example.com", "bob", "zoë@example.com", 'quote"d', "back\\slash",
                         "tab\there", "emoji 🦊", "", None])
tokens = st.one_of(st.none(), st.integers(0, 10**9))
records = st.fixed_dictionaries({
    "day": st.integers(1, 5), "hour": st.integers(0, 23), "frac": st.sampled_from(["", ".5", ".123", ".123456"]),
    "owner": names, "lmgate_id": names, "model": st.sampled_from(["cheap-1", "gem-x", None, "m\u00e9"]),
    "provider": st.sampled_from(["openai", "google", "gemini", "anthropic", None]),
    "status": st.sampled_from([200, 429, None]), "error_type": st.sampled_from([None, "forbidden", "usage_missing"]),
    "input_tokens": tokens, "output_tokens": tokens, "cache_read_tokens": tokens,
    "cache_write_tokens": tokens, "reasoning_tokens": tokens,
})
oddities = st.sampled_from([""] * 30 + ["garbage\n", "\n", "[1]\n", '{"timestamp": 5}\n',
                                        '{"timestamp":"2026-11-02T00:00:00Z","input_tokens":"7"}\n',
                                        '{"timestamp":"2026-11-02T00:00:00Z","status":2.5}\n',
                                        '{"timestamp":"2026-11-02T00:00:00Z","owner":["x"]}\n'])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(st.tuples(records, oddities, st.booleans()), min_size=1, max_size=80),
       by=st.sampled_from([("owner",), ("day", "status"), ("hour", "lmgate_id", "model"), ()]),
       window=st.sampled_from([(None, None), ("2026-11-02T00:00:00", None), (None, "2026-11-04T12:00:00"),
                               ("2026-11-02T05:00:00", "2026-11-03T00:00:00")]),
       compact=st.booleans())
def test_duckdb_agrees_with_json_loads(tmp_path: Path, items, by, window, compact) -> None:
    out = []
    for r, odd, odd_first in items:
        ts = f"2026-11-{r['day']:02d}T{r['hour']:02d}:00:00{r['frac']}Z"
        fields = {k: v for k, v in r.items() if k not in ("day", "hour", "frac")}
        text = line(rec(ts, **fields), compact)
        out += [odd, text] if odd_first else [text, odd]
    path = write(tmp_path / f"s-{len(out)}-{compact}.jsonl", out)
    expected, bad = reference(path, by, *window)
    columns = [{"day": "strftime(timestamp, '%Y-%m-%d')", "hour": "strftime(timestamp, '%Y-%m-%dT%H:00Z')"}
               .get(name, name) for name in by]
    with query.open_records(path, *window) as records:
        got = records.con.execute(
            f"SELECT {''.join(c + ', ' for c in columns)}count(*), coalesce(sum(input_tokens), 0) "
            f"FROM records {'GROUP BY ALL' if by else ''}").fetchall()
        got = {tuple(row[:-2]): [row[-2], row[-1]] for row in got if row[-2]}
        records.check()
        assert (got, records.bad_count) == (expected, bad)
        summed = summarize(records, by, Pricer(None))
    assert sum(r.requests for r in summed.rows) == sum(v[0] for v in expected.values())
    assert records.bad_count == bad


# ---------------------------------------------------------------- --sql and export

def test_sql_over_records(run, tmp_path: Path) -> None:
    stats = write(tmp_path / "data" / "stats.jsonl", [
        rec("2026-11-10T10:00:00.000Z", input_tokens=7), rec("2026-11-11T10:00:00.000Z", owner="bob", input_tokens=5),
        "garbage\n"])
    code, out, err = run("--format", "json", "--sql",
                         "SELECT owner, sum(input_tokens) AS tokens, min(timestamp) AS first FROM records "
                         "GROUP BY owner ORDER BY owner", stats=stats)
    assert code == 0 and json.loads(out) == [
        {"owner": "alice@example.com", "tokens": 7, "first": "2026-11-10T10:00:00Z"},
        {"owner": "bob", "tokens": 5, "first": "2026-11-11T10:00:00Z"}]
    assert f"{stats}:3: not valid JSON" in err
    code, out, err = run("--format", "csv", "--since", "2026-11-11", "--sql",
                         "SELECT owner, status, stream FROM records", stats=stats)
    assert out == "owner,status,stream\nbob,200,False\n"
    code, out, err = run("--sql", "SELECT count(*) AS n FROM records", stats=stats)
    assert out.split() == ["n", "2"]
    code, out, err = run("--sql", "SELEKT 1", stats=stats)
    assert code == 2 and err.splitlines()[-1].startswith("lmgate report: --sql: Parser Error")
    code, out, err = run("--format", "json", "--sql", "SELECT count(*) AS n FROM records",
                         stats=tmp_path / "empty" / "stats.jsonl")     # no stats yet
    assert code == 0 and json.loads(out) == [{"n": 0}]


def test_export_parquet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stats = write(tmp_path / "data" / "stats.jsonl", [
        rec("2026-11-10T10:00:00.000Z"), rec("2026-11-11T10:00:00.000Z", owner="bob"), "torn {"])
    parser = argparse.ArgumentParser()
    command.add_export_arguments(parser)
    target = tmp_path / "out.parquet"
    assert command.run_export(parser.parse_args(["--parquet", str(target), "--since", "2026-11-11"]),
                              stats) == 0
    err = capsys.readouterr().err
    assert "wrote 1 records to" in err and f"{stats}:3: not valid JSON (incomplete last line)" in err
    rows = query.connect().execute(f"SELECT owner, input_tokens, timestamp FROM '{target}'").fetchall()
    assert rows == [("bob", 10, dt.datetime(2026, 11, 11, 10, tzinfo=dt.timezone.utc))]


# ---------------------------------------------------------------- output formats

def test_json_and_csv_columns_are_stable(run, tmp_path: Path) -> None:
    stats = write(tmp_path / "data" / "stats.jsonl", [rec(), rec(model="mystery", error_type="rate_limited")])
    for by in ("owner,provider,model", "day,hour,status,error_type", "endpoint,lmgate_id"):
        fields = by.split(",")
        rows = as_json(run("--format", "json", "--by", by, stats=stats))
        assert rows and all(list(r) == fields + COUNTER_KEYS for r in rows)
        assert all(type(r[k]) is int for r in rows for k in COUNTER_KEYS[:-2])
        code, out, _ = run("--format", "csv", "--by", by, stats=stats)
        table = list(csv.reader(io.StringIO(out)))
        assert table[0] == fields + COUNTER_KEYS and len(table) == len(rows) + 1
        assert all(len(r) == len(table[0]) for r in table)


@pytest.mark.parametrize("by", ["owner,provider,model", "provider", "", "day,hour",
                                ",".join(GROUP_FIELDS), "model,owner"])
def test_table_fits_80_columns(run, tmp_path: Path, by: str) -> None:
    huge = 987_654_321_012
    stats = write(tmp_path / "data" / "stats.jsonl", [
        rec(owner="a-very-long-owner-name-that-goes-on@subsidiary.example.com", model="m" * 90,
            input_tokens=huge, output_tokens=huge, cache_read_tokens=huge // 2),
        rec(provider="anthropic", api_format="anthropic", model="claude-sonnet-4-5-20250929",
            input_tokens=123, output_tokens=45678, cache_write_tokens=9_999_999),
        rec(model="mystery-model-without-a-price-and-with-a-long-name-" + "x" * 40),
    ] + [rec(owner=f"user{i}@example.com") for i in range(30)])
    code, out, err = run("--by", by, stats=stats)
    assert code == 0
    lines = out.splitlines()
    assert max(len(ln) for ln in lines) <= 80, "\n".join(ln for ln in lines if len(ln) > 80)
    i = next(i for i, ln in enumerate(lines) if ln.startswith("TOTAL"))
    numbers = lines[i].split()[1:] or lines[i + 1].split()       # one line, or stacked
    assert numbers[:3] == ["33", "0", "0"] and numbers[-1] == "38.19+"


def test_table_numbers() -> None:
    assert [output.human_tokens(n) for n in (0, 999, 1000, 1049, 9_949, 9_960, 99_499, 999_499,
                                             999_500, 1_250_000, 12_345_678_901)] == [
        "0", "999", "1.0k", "1.0k", "9.9k", "10k", "99k", "999k", "1.0M", "1.2M", "12G"]
    row = output.Row(("x",), requests=1234567, cost=1234.5, priced=True)
    assert output._numbers(row)[0] == "1,234,567" and output.money(row) == "1,234.50"
    assert output.money(output.Row(("x",), cost=0.001, priced=True)) == "<0.01"
    assert output.money(output.Row(("x",), unpriced=True)) == ""


def test_table_shows_totals_prices_date_and_window(run, tmp_path: Path) -> None:
    stats = write(tmp_path / "data" / "stats.jsonl", [
        rec("2026-11-10T10:00:00.000Z", input_tokens=2_000_000, output_tokens=1_000_000),
        rec("2026-11-11T10:00:00.000Z", owner="bob", input_tokens=1500, output_tokens=0)])
    code, out, err = run("--by", "owner", "--since", "2026-11-01", "--until", "2026-12-01", stats=stats)
    lines = out.splitlines()
    assert lines[0].split() == ["owner", "Reqs", "Deny", "Err", "In", "Out", "CR", "CW", "Rsn", "USD"]
    assert lines[1].split() == ["alice@example.com", "1", "0", "0", "2.0M", "1.0M", "0", "0", "0", "4.00"]
    assert lines[3].split() == ["TOTAL", "2", "0", "0", "2.0M", "1.0M", "0", "0", "0", "4.00"]
    words = " ".join(out.split())
    assert "as of 2026-01-15" in words
    assert "Window: 2026-11-01T00:00:00Z to 2026-12-01T00:00:00Z (exclusive)." in words


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("argv, message", [
    (["--by", "owner,colour"], "lmgate report: --by: unknown field 'colour'"),
    (["--since", "last tuesday"], "lmgate report: --since: 'last tuesday' is not a date"),
    (["--until", "2026-13-01"], "lmgate report: --until: '2026-13-01' is not a date"),
    (["--since", "7y"], "lmgate report: --since: '7y' is not a date"),
    (["--since", "2026-11-02", "--until", "2026-11-01"], "lmgate report: --since (2026-11-02T00:00:00Z) is not before"),
])
def test_argument_errors_are_one_line(run, argv: list[str], message: str) -> None:
    code, out, err = run(*argv)
    assert code == 2 and out == ""
    assert err.startswith(message) and err.count("\n") == 1, err


@pytest.mark.parametrize("text, message", [
    (PRICES.replace("currency: USD", "currency: USD\ncolour: red"), "colour: unknown key"),
    (PRICES.replace("input: 1, cached_input: 0.5", "input: -1, cached_input: 0.5"),
     "providers.openai[0].input: must be a number >= 0, got -1"),
    (PRICES.replace("output: 2}", "output: two}", 1), "providers.openai[0].output: must be a number >= 0, got 'two'"),
    (PRICES.replace("output: 2}", "output: true}", 1), "providers.openai[0].output: must be a number >= 0, got True"),
    (PRICES.replace("cached_input: 0.5,", "cached_input: 0.5, colour: 1,"), "providers.openai[0].colour: unknown key"),
    (PRICES.replace("  google:", "  azure:"), "providers.azure: unknown key"),
    (PRICES.replace('{model: "cheap*", ', "{"), "providers.openai[0].model: missing"),
    (PRICES.replace("unit: per_million_tokens", "unit: per_token"), "unit: must be per_million_tokens"),
    (PRICES.replace("prices_as_of: 2026-01-15", "prices_as_of: soon"), "prices_as_of: must be a date"),
    (PRICES.replace("prices_as_of: 2026-01-15\n", ""), "prices_as_of: missing"),
    ("providers: [unclosed", "invalid YAML at line 1"),
    ("- just\n- a list\n", "top level: must be a mapping"),
])
def test_bad_price_file_is_one_line_naming_file_and_key(run, tmp_path: Path, text: str, message: str) -> None:
    bad = tmp_path / "bad-prices.yaml"
    bad.write_text(text, encoding="utf-8")
    with pytest.raises(PriceError):
        load_prices(bad)
    code, out, err = run("--prices", str(bad))
    assert code == 2 and out == ""
    assert err == f"lmgate report: {bad}: {message}" + err[len(f"lmgate report: {bad}: {message}"):]
    assert err.count("\n") == 1 and "Traceback" not in err


def test_missing_price_file(run, tmp_path: Path) -> None:
    code, out, err = run("--prices", str(tmp_path / "nope.yaml"))
    assert code == 2 and err.startswith(f"lmgate report: {tmp_path / 'nope.yaml'}: cannot read price file")
    assert err.count("\n") == 1


def test_unreadable_stats_is_one_line(run, tmp_path: Path) -> None:
    (tmp_path / "data" / "stats.jsonl").mkdir(parents=True)      # a folder where the file should be
    code, out, err = run()
    assert code == 2 and err.startswith("lmgate report: cannot read") and err.count("\n") == 1


def test_bounds_are_whole_seconds() -> None:
    when = dt.datetime(2026, 11, 1, 12, 0, 0, 999999, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert ts_bound(when) == "2026-11-01T10:00:00"
    assert "2026-11-01T10:00:00.000Z" >= ts_bound(when) > "2026-11-01T09:59:59.999Z"
    assert "2026-11-01T10:00:00Z" >= ts_bound(when)


# ---------------------------------------------------------------- benchmark script

def test_bench_script_smoke() -> None:
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_report.py"), "--records", "20000"],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 0, done.stderr
    assert "generated 20,000 records in " in done.stdout
    assert " records/s" in done.stdout and "peak memory (ru_maxrss): report process " in done.stdout
    assert "check: 20,000 requests counted for 20,000 records written: ok" in done.stdout


def test_prices_never_go_to_the_network(run, tmp_path: Path, monkeypatch) -> None:
    """genai-prices' bundled data only: its updater (the one thing in it that fetches) never starts."""
    from genai_prices import update_prices

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("genai-prices tried to fetch prices")

    monkeypatch.setattr(update_prices.UpdatePrices, "start", no_network)
    monkeypatch.setattr(update_prices.UpdatePrices, "fetch", no_network)
    stats = write(tmp_path / "data" / "stats.jsonl", [rec(model="gpt-4o-mini-2024-07-18")])
    rows = as_json(run("--format", "json", "--by", "model", stats=stats))
    assert rows[0]["price_source"] == "genai-prices" and rows[0]["cost_usd"] > 0
    from genai_prices import data_snapshot
    assert data_snapshot.get_snapshot().from_auto_update is False


def test_report_reads_only_the_stats_and_report_settings(tmp_path: Path, capsys) -> None:
    """A setting the report does not use cannot stop it; one it uses still does."""
    from lmgate import cli
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "prices.yaml").write_text(PRICES, encoding="utf-8")
    write(tmp_path / "data" / "stats.jsonl", [rec()])
    config = folder / "lmgate.yaml"
    config.write_text("proxy:\n  port: 0\n  nginx_binary: /nonexistent\nserver:\n  port: http\n", encoding="utf-8")
    assert cli.run(["report", "--config", str(config), "--format", "json", "--by", "owner"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["requests"] == 1
    config.write_text("stats:\n  output_path: 7\n  rotate_bytes: many\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="stats.rotate_bytes"):
        cli.run(["report", "--config", str(config)])


# ---------------------------------------------------------------- many replicas: --stats

def replicas(root: Path) -> dict[str, int]:
    """Three replicas' stats as a bucket sync lays them out (pod folders, current and rotated,
    one compressed): 2 + 3 + 1 calls, request ids unique per replica only."""
    calls = {}
    for n, (pod, count) in enumerate((("lmgate-7d9f-a", 2), ("lmgate-7d9f-b", 3), ("lmgate-7d9f-c", 1))):
        folder = root / pod
        records = [rec(f"2026-11-10T10:00:0{i}.000Z", owner=pod, request_id=f"{i:032x}") for i in range(count)]
        write(folder / "stats.20261110T000000Z.jsonl", records[:1])
        if n == 1:
            with gzip.open(folder / "stats.20261110T000001Z.jsonl.gz", "wt", encoding="utf-8") as f:
                f.write(line(records[1]))
            records = records[:1] + records[2:]
            calls[pod] = count
        write(folder / "stats.jsonl", records[1:])
        calls[pod] = count
    write(root / "notes.txt", ["not stats\n"])
    return calls


def test_stats_glob_reads_every_replica_once(run, tmp_path: Path) -> None:
    calls = replicas(tmp_path / "bucket-sync")
    got = as_json(run("--format", "json", "--by", "owner",
                      "--stats", str(tmp_path / "bucket-sync" / "*" / "stats*.jsonl*")))
    assert {r["owner"]: r["requests"] for r in got} == calls


def test_stats_folder_reads_its_jsonl_files_at_any_depth(run, tmp_path: Path) -> None:
    calls = replicas(tmp_path / "bucket-sync")
    got = as_json(run("--format", "json", "--by", "owner", "--stats", str(tmp_path / "bucket-sync")))
    assert {r["owner"]: r["requests"] for r in got} == calls


def test_stats_overlapping_arguments_read_each_file_once(run, tmp_path: Path) -> None:
    calls = replicas(tmp_path / "bucket-sync")
    root = tmp_path / "bucket-sync"
    (tmp_path / "link").symlink_to(root / "lmgate-7d9f-b")
    got = as_json(run("--format", "json", "--by", "owner", "--stats", str(root),
                      "--stats", str(root / "*" / "*.jsonl*"), "--stats", str(tmp_path / "link"),
                      "--stats", str(root / "lmgate-7d9f-a" / "stats.jsonl")))
    assert {r["owner"]: r["requests"] for r in got} == calls


def test_stats_file_brings_its_rotated_files(run, tmp_path: Path) -> None:
    calls = replicas(tmp_path / "bucket-sync")
    got = as_json(run("--format", "json", "--by", "owner",
                      "--stats", str(tmp_path / "bucket-sync" / "lmgate-7d9f-b" / "stats.jsonl")))
    assert {r["owner"]: r["requests"] for r in got} == {"lmgate-7d9f-b": calls["lmgate-7d9f-b"]}


@pytest.mark.parametrize("what", ["glob", "folder"])
def test_stats_naming_nothing_is_a_one_line_error(run, tmp_path: Path, what: str) -> None:
    (tmp_path / "empty").mkdir()
    spec = str(tmp_path / "nowhere" / "*.jsonl") if what == "glob" else str(tmp_path / "empty")
    code, out, err = run("--stats", spec)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and spec in err and "--stats" in err
    assert ("matches no file" if what == "glob" else "no *.jsonl") in err


def test_stdout_output_path_without_stats_says_to_name_the_files(run, tmp_path: Path) -> None:
    code, out, err = run(stats=Path("-"))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "--stats" in err and "standard output" in err


def test_stats_file_that_does_not_exist_is_a_one_line_error(run, tmp_path: Path) -> None:
    calls = replicas(tmp_path / "bucket-sync")
    assert calls
    missing = tmp_path / "bucket-sync" / "lmgate-7d9f-z" / "stats.jsonl"
    code, out, err = run("--stats", str(tmp_path / "bucket-sync"), "--stats", str(missing))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and str(missing) in err and "no such file" in err
