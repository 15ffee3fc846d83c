"""`lmgate report`: reading the stats files, grouping, pricing and the three output formats."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from lmgate.report import add_report_arguments, run_report
from lmgate.report import command, output, scan
from lmgate.report.prices import PriceError, load_prices
from lmgate.report.scan import GROUP_FIELDS, Scanner, stats_files, ts_bound

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
                "cache_write_tokens", "reasoning_tokens", "cost_usd"]


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
    write(data / "stats.20261101T000000Z.jsonl.gz", ["not a stats file\n"])

    assert [f.path.name for f in stats_files(data / "stats.jsonl")] == [
        "stats.20261031T235959Z.jsonl", "stats.20261101T000000Z.jsonl", "stats.20261101T000000Z-1.jsonl",
        "stats.20261101T000000Z-2.jsonl", "stats.20261101T000000Z-10.jsonl", "stats.jsonl"]
    code, out, err = run("--format", "json", "--by", "owner")
    assert code == 0
    assert {r["owner"]: r["requests"] for r in json.loads(out)} == dict.fromkeys("abcdef", 1)
    listed = [ln.split(":")[0].rsplit("/", 1)[-1] for ln in err.splitlines() if ln.startswith("  ")]
    assert listed == ["stats.20261031T235959Z.jsonl", "stats.20261101T000000Z.jsonl",
                      "stats.20261101T000000Z-1.jsonl", "stats.20261101T000000Z-2.jsonl",
                      "stats.20261101T000000Z-10.jsonl", "stats.jsonl"]


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


def test_unpriced_model_has_no_cost_and_is_listed_once(run, tmp_path: Path) -> None:
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
        ["cheap-1", "1", "0", "0", "1000000", "0", "0", "0", "0", "1.000000"],
        ["mystery-1", "4", "1", "0", "30", "15", "0", "0", "0", ""]]
    assert err.count("unpriced models: mystery-1 (openai): 3 requests") == 1


def test_shipped_price_file_is_valid_and_prices_common_models() -> None:
    table = load_prices(REPO / "config" / "prices.yaml")
    assert table.as_of
    for plist, model in [("openai", "gpt-4o-mini-2024-07-18"), ("openai", "gpt-4o-2024-08-06"),
                         ("openai", "gpt-4.1-mini-2025-04-14"), ("openai", "gpt-5-nano-2025-08-07"),
                         ("openai", "o3"), ("openai", "o4-mini-2025-04-16"),
                         ("openai", "text-embedding-3-small"),
                         ("anthropic", "claude-sonnet-4-20250514"), ("anthropic", "claude-sonnet-4@20250514"),
                         ("anthropic", "claude-opus-4-1-20250805"), ("anthropic", "claude-haiku-4-5-20251001"),
                         ("anthropic", "claude-3-5-sonnet-20240620"), ("google", "gemini-2.5-pro"),
                         ("google", "gemini-2.5-flash"), ("google", "gemini-2.0-flash")]:
        assert table.lookup(plist, model) is not None, model
    assert table.lookup("openai", "gpt-4o-mini").input < table.lookup("openai", "gpt-4o").input
    assert table.lookup("google", "gemini-2.5-flash-lite").model == "gemini-2.5-flash-lite*"
    assert table.lookup("openai", "gpt-5.5-2026-04-23") is None     # newer than the file: unpriced


# ---------------------------------------------------------------- malformed lines

def test_malformed_lines_are_skipped_and_reported(run, tmp_path: Path) -> None:
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
    assert lines[11] == "  ... and 1 more" and len(lines) == 12
    assert f"  {stats}:5: input_tokens is not a non-negative integer or null" in lines
    assert f"  {stats}:8: owner is not a string or null" in lines


def test_malformed_line_in_a_big_file_keeps_line_numbers(run, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(scan, "CHUNK_BYTES", 2048)
    records = [rec(f"2026-11-10T10:{i // 60:02d}:{i % 60:02d}.000Z", input_tokens=i) for i in range(600)]
    lines_ = [line(r) for r in records]
    lines_[333] = lines_[333][:50] + "\n"
    stats = write(tmp_path / "data" / "stats.jsonl", lines_)
    code, out, err = run("--format", "json", "--by", "provider", stats=stats)
    [row] = json.loads(out)
    assert row["requests"] == 599 and row["input_tokens"] == sum(range(600)) - 333
    assert f"{stats}:334: not valid JSON" in err and "skipped 1 malformed line:" in err


# ---------------------------------------------------------------- the fast path agrees with json.loads

def reference(paths: list[Path], by: tuple[str, ...], since: str | None, until: str | None) -> dict:
    """What the scanner must compute, the slow obvious way."""
    sums: dict[tuple, list[int]] = {}
    for path in paths:
        for raw in path.read_bytes().split(b"\n"):
            try:
                r = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(r, dict) or not isinstance(r.get("timestamp"), str):
                continue
            ts = scan.canonical_ts(r["timestamp"])
            if ts is None or (since and ts < since) or (until and ts >= until):
                continue
            toks = [r.get(k) for k in scan.TOKEN_FIELDS]
            if any(t is not None and (type(t) is not int or t < 0) for t in toks):
                continue
            key = []
            for name in by + scan.PRICING_FIELDS:
                key.append(ts[:10] if name == "day" else ts[:13] + ":00Z" if name == "hour" else r.get(name))
            if any(v is not None and type(v) is not (int if n == "status" else str)
                   for n, v in zip(by + scan.PRICING_FIELDS, key) if n not in ("day", "hour")):
                continue
            acc = sums.setdefault(tuple(key), [0] * 6)
            acc[0] += 1
            for i, t in enumerate(toks, 1):
                acc[i] += t or 0
    return sums


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
                                        '{"timestamp":"2026-11-02T00:00:00Z","input_tokens":"7"}\n'])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(st.tuples(records, oddities, st.booleans()), min_size=1, max_size=120),
       by=st.sampled_from([("owner",), ("day", "status"), ("hour", "lmgate_id", "model"), ()]),
       window=st.sampled_from([(None, None), ("2026-11-02T00:00:00", None), (None, "2026-11-04T12:00:00"),
                               ("2026-11-02T05:00:00", "2026-11-03T00:00:00")]),
       compact=st.booleans(), chunk=st.sampled_from([256, 1024, 1 << 20]))
def test_fast_path_agrees_with_json_loads(tmp_path: Path, monkeypatch, items, by, window, compact, chunk) -> None:
    monkeypatch.setattr(scan, "CHUNK_BYTES", chunk)
    out = []
    for r, odd, odd_first in items:
        ts = f"2026-11-{r['day']:02d}T{r['hour']:02d}:00:00{r['frac']}Z"
        fields = {k: v for k, v in r.items() if k not in ("day", "hour", "frac")}
        text = line(rec(ts, **fields), compact)
        out += [odd, text] if odd_first else [text, odd]
    path = write(tmp_path / f"s-{len(out)}-{compact}-{chunk}.jsonl", out)
    scanner = Scanner(by, *window)
    with open(path, "rb") as f:
        scanner.scan_stream(f, str(path))
    assert scanner.sums == reference([path], by, *window)
    FAST_CHUNKS.append(scanner.fast_chunks)


FAST_CHUNKS: list[int] = []


def test_fast_path_was_exercised_above() -> None:
    if not FAST_CHUNKS:
        pytest.skip("runs after test_fast_path_agrees_with_json_loads")
    assert sum(FAST_CHUNKS) > 0


def test_a_bad_key_late_in_a_chunk_leaves_no_trace(tmp_path: Path, monkeypatch) -> None:
    """The fast path adds rows before it meets a malformed group value; it must take them back."""
    monkeypatch.setattr(scan, "CHUNK_BYTES", 8192)
    records = [line(rec(owner=f"o{i % 3}", input_tokens=i)) for i in range(100)]
    records[77] = line(rec(owner=42))
    records[78] = line(rec(owner="new-owner", input_tokens=5))
    path = write(tmp_path / "s.jsonl", records)
    scanner = Scanner(("owner",))
    with open(path, "rb") as f:
        scanner.scan_stream(f, str(path))
    assert scanner.fast_chunks and scanner.slow_chunks == 1
    assert scanner.sums == reference([path], ("owner",), None, None)
    assert scanner.bad_samples == [(str(path), 78, "owner is not a string or null")]


def test_fast_token_columns_take_only_plain_counts() -> None:
    p = b'input_tokens":'
    assert scan._int_column([p + b"5", p + b"null", p + b"12"], p, 3) == [5, 0, 12]
    for odd in (b"1e5", b"-1", b"true", b"05", b"", b'"5"', b"5.0", b"1_000", b" 5"):
        assert scan._int_column([p + b"5", p + odd], p, 2) is None, odd
    assert scan._int_column([p + b"5", b'total_tokens":3'], p, 2) is None


@pytest.mark.parametrize("by", [("owner", "day"), ("provider",), GROUP_FIELDS])
def test_fast_path_takes_the_writers_records(tmp_path: Path, monkeypatch, by: tuple[str, ...]) -> None:
    """Only speed depends on this: ordinary records, nulls included, never need the careful path."""
    monkeypatch.setattr(scan, "CHUNK_BYTES", 4096)
    denied = dict(owner=None, lmgate_id=None, model=None, status=403, error_type="forbidden",
                  input_tokens=None, output_tokens=None, cache_read_tokens=None, total_tokens=None)
    records = [rec(f"2026-11-10T10:00:{i % 60:02d}.{i % 1000:03d}Z", input_tokens=i, reasoning_tokens=i % 3 or None)
               if i % 4 else rec("2026-11-10T11:00:00.000Z", **denied) for i in range(200)]
    for compact in (True, False):
        path = write(tmp_path / f"s{compact}.jsonl", records, compact)
        scanner = Scanner(by)
        with open(path, "rb") as f:
            scanner.scan_stream(f, "x")
        assert scanner.fast_chunks > 5 and scanner.slow_chunks == 0
        assert scanner.sums == reference([path], by, None, None)


def test_parallel_ranges_give_the_same_result(tmp_path: Path, monkeypatch) -> None:
    data = tmp_path / "data"
    write(data / "stats.20261105T000000Z.jsonl",
          [rec(f"2026-11-0{1 + i % 4}T10:00:00.000Z", owner=f"o{i % 7}", input_tokens=i) for i in range(400)]
          + ["torn {\n"] + [rec(owner="late")] * 50)
    write(data / "stats.jsonl", [rec("2026-11-06T00:00:00.000Z", input_tokens=i) for i in range(300)] + ['{"x":'])
    monkeypatch.setattr(scan, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(scan, "RANGE_BYTES", 5000)
    results = []
    for workers in (1, 3):
        scanner = Scanner(("owner", "day"), since="2026-11-02T00:00:00")
        assert scanner.scan(data / "stats.jsonl", workers=workers)
        results.append((scanner.sums, scanner.bad_count, scanner.bad_samples))
    assert results[0] == results[1]
    assert results[0][2] == [(str(data / "stats.20261105T000000Z.jsonl"), 401, "not valid JSON"),
                             (str(data / "stats.jsonl"), 301, "not valid JSON (incomplete last line)")]


# ---------------------------------------------------------------- output formats

def test_json_and_csv_columns_are_stable(run, tmp_path: Path) -> None:
    stats = write(tmp_path / "data" / "stats.jsonl", [rec(), rec(model="mystery", error_type="rate_limited")])
    for by in ("owner,provider,model", "day,hour,status,error_type", "endpoint,lmgate_id"):
        fields = by.split(",")
        rows = as_json(run("--format", "json", "--by", by, stats=stats))
        assert rows and all(list(r) == fields + COUNTER_KEYS for r in rows)
        assert all(type(r[k]) is int for r in rows for k in COUNTER_KEYS[:-1])
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
