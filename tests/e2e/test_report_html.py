"""`lmgate report --format html` in a real browser (Debian's headless Chromium, installed by
`scripts/setup.sh --dev`): the page loads without console messages, its charts are in the DOM
with the numbers of `--format json`, and its screenshot is not blank."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.support.png import colours
from tests.support.report_history import write_history

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                                    "(scripts/setup.sh --dev installs it)")


def chromium(tmp_path: Path, page: Path, *mode: str) -> tuple[str, list[str]]:
    """Chromium's stdout and the page's console messages (Chromium logs them as CONSOLE lines)."""
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
         "--hide-scrollbars", "--window-size=1000,900", *mode, page.as_uri()],
        capture_output=True, text=True, timeout=90, cwd=tmp_path)
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    return result.stdout, console


def report(tmp_path: Path, stats: Path, *args: str) -> str:
    env = {**os.environ, "LMGATE_STATS__OUTPUT_PATH": str(stats)}
    result = subprocess.run([sys.executable, "-m", "lmgate", "report", *args], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


class Bars(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.bars: dict[tuple[str, str], float] = {}
        self.charts: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure" and a.get("class") == "chart":
            self.charts.append(a["id"])
        if tag == "rect" and "data-series" in a:
            self.bars[(a["data-series"], a["data-day"])] = float(a["data-value"])


@needs_chromium
def test_the_page_in_chromium(tmp_path: Path) -> None:
    stats = write_history(tmp_path / "data" / "stats.jsonl")
    page = tmp_path / "report.html"
    report(tmp_path, stats, "--format", "html", "--out", str(page))
    dom, console = chromium(tmp_path, page, "--dump-dom")
    assert console == []
    found = Bars()
    found.feed(dom)          # the DOM as Chromium built it, not the file's text
    assert found.charts == ["chart-spend", "chart-tokens"]
    per_day = json.loads(report(tmp_path, stats, "--format", "json", "--by", "day"))
    expected = {}
    for row in per_day:
        expected[("cost_usd", row["day"])] = pytest.approx(row["cost_usd"], abs=2e-6)
        for kind in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens"):
            expected[(kind, row["day"])] = row[kind]
    assert found.bars == expected

    shot = tmp_path / "report.png"
    chromium(tmp_path, page, f"--screenshot={shot}")
    # A page with text and coloured bars, not one colour.
    assert len(colours(shot)) > 20


@needs_chromium
def test_the_browser_check_sees_console_errors_and_blank_pages(tmp_path: Path) -> None:
    """The checks above can fail: a script error is a console line, a blank page is one colour."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><script>noSuchFunction()</script></body></html>")
    _, console = chromium(tmp_path, bad, "--dump-dom")
    assert any("noSuchFunction" in line for line in console)
    shot = tmp_path / "blank.png"
    chromium(tmp_path, bad, f"--screenshot={shot}")
    assert len(colours(shot)) == 1
