"""`lmgate report --format html`: the page's figures are the JSON report's, every value from the
records is escaped, and --out problems are one line. (The page in a real browser:
tests/e2e/test_report_html.py.)"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from lmgate.report import add_report_arguments, run_report
from tests.support.report_history import OWNERS, write_history

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
PRICES = REPO / "config" / "prices.yaml"


class Page(HTMLParser):
    """The chart bars (series, day, value), the ids present, and the table's text."""

    def __init__(self) -> None:
        super().__init__()
        self.bars: list[tuple[str, str, float]] = []
        self.ids: set[str] = set()
        self.names: dict[str, list[str]] = {}
        self._table: str | None = None
        self._in_pre = False
        self.pre = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "table":
            self._table = a.get("id")
        if tag == "rect" and "data-series" in a:
            self.bars.append((a["data-series"], a["data-day"], float(a["data-value"])))
        if tag == "tr" and "data-name" in a and self._table:
            self.names.setdefault(self._table, []).append(a["data-name"])
        if tag == "pre":
            self._in_pre = True

    def handle_endtag(self, tag):
        if tag == "pre":
            self._in_pre = False

    def handle_data(self, data):
        if self._in_pre:
            self.pre += data


def run(*argv: str, stats: Path) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    add_report_arguments(parser)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_report(parser.parse_args(list(argv)), stats, PRICES, out)
    return code, out.getvalue(), err.getvalue()


def test_the_page_figures_are_the_json_reports(tmp_path: Path) -> None:
    stats = write_history(tmp_path / "stats.jsonl")
    code, _, err = run("--format", "html", "--out", str(tmp_path / "r.html"), stats=stats)
    assert code == 0, err
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    _, out, _ = run("--format", "json", "--by", "day", stats=stats)
    per_day = {r["day"]: r for r in json.loads(out)}
    assert len(per_day) == 6
    spend = {day: v for series, day, v in page.bars if series == "cost_usd"}
    # To the micro-dollar: DuckDB may sum a day's costs in another order in another run.
    assert spend == pytest.approx({d: r["cost_usd"] for d, r in per_day.items()}, abs=2e-6)
    for series in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens"):
        assert {d: v for s, d, v in page.bars if s == series} == {d: r[series] for d, r in per_day.items()}
    assert {"chart-spend", "chart-tokens", "top-models", "top-owners", "top-keys", "error-rates",
            "report-table"} <= page.ids
    assert sorted(page.names["top-owners"]) == sorted(OWNERS)
    # The same table as --format table.
    _, table, _ = run("--format", "table", stats=stats)
    assert page.pre == table.rstrip("\n")
    # An owner that looks like markup is text, never a tag.
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    # Self-contained: nothing to fetch.
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in text and "src=" not in text


def test_html_without_records_is_a_page_with_empty_charts(tmp_path: Path) -> None:
    code, out, err = run("--format", "html", stats=tmp_path / "none.jsonl")
    assert code == 0 and "no stats yet" in err
    assert out.startswith("<!DOCTYPE html>") and "(no records)" in out


def test_out_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    stats = write_history(tmp_path / "stats.jsonl", days=1)
    code, _, err = run("--format", "html", "--out", str(tmp_path / "missing" / "r.html"), stats=stats)
    assert code == 2
    assert err.strip().count("\n") == 0 and "--out: cannot write" in err and "r.html" in err


def test_out_takes_every_format(tmp_path: Path) -> None:
    stats = write_history(tmp_path / "stats.jsonl", days=1)
    _, expected, _ = run("--format", "csv", stats=stats)
    assert run("--format", "csv", "--out", str(tmp_path / "r.csv"), stats=stats)[0] == 0
    assert (tmp_path / "r.csv").read_text(encoding="utf-8") == expected


def test_html_is_not_a_format_for_sql(tmp_path: Path) -> None:
    stats = write_history(tmp_path / "stats.jsonl", days=1)
    code, _, err = run("--format", "html", "--sql", "SELECT 1", stats=stats)
    assert code == 2 and "--format html" in err
