"""`lmgate report`: arguments, and the run from the stats files to the printed report."""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
from pathlib import Path
from typing import TextIO

from lmgate.report.output import build, notes, write_csv, write_json, write_table
from lmgate.report.prices import PriceError, load_prices
from lmgate.report.scan import GROUP_FIELDS, Scanner, ts_bound

DEFAULT_BY = "owner,provider,model"
FORMATS = ("table", "csv", "json")
_DURATION = re.compile(r"(\d+)([dhm])")
_UNIT = {"d": "days", "h": "hours", "m": "minutes"}


class UsageError(Exception):
    """A bad argument; the message is one line naming it."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--since", metavar="DATE|DURATION",
        help="first moment counted: 2026-11-01 (start of that day, UTC), 2026-11-01T12:00:00Z, "
             "or a duration before now: 7d, 24h, 30m (default: everything)")
    parser.add_argument(
        "--until", metavar="DATE",
        help="end of the window, exclusive: 2026-11-02 counts up to the end of 2026-11-01 UTC; "
             "also a date-time or a duration before now (default: now)")
    parser.add_argument(
        "--by", metavar="FIELDS", default=DEFAULT_BY,
        help=f"comma list of {', '.join(GROUP_FIELDS)} (default: {DEFAULT_BY})")
    parser.add_argument("--format", choices=FORMATS, default="table",
                        help="table (80 columns), csv or json (default: table)")
    parser.add_argument("--prices", type=Path, metavar="PATH",
                        help="price file (default: report.prices_path in the config)")


def parse_by(text: str) -> tuple[str, ...]:
    fields: list[str] = []
    for name in (part.strip() for part in text.split(",")):
        if not name:
            continue
        if name not in GROUP_FIELDS:
            raise UsageError(f"--by: unknown field {name!r} (fields: {', '.join(GROUP_FIELDS)})")
        if name not in fields:
            fields.append(name)
    return tuple(fields)


def parse_when(text: str | None, option: str, now: dt.datetime) -> dt.datetime | None:
    """A date, a date-time (UTC unless it names an offset) or a duration before `now`."""
    if text is None:
        return None
    value = text.strip()
    m = _DURATION.fullmatch(value)
    if m:
        try:
            return now - dt.timedelta(**{_UNIT[m.group(2)]: int(m.group(1))})
        except OverflowError:
            raise UsageError(f"{option}: duration {text!r} is too long") from None
    try:
        if re.fullmatch(r"\d{4}-\d\d-\d\d", value):
            when = dt.datetime.combine(dt.date.fromisoformat(value), dt.time())
        elif re.fullmatch(r"\d{4}-\d\d-\d\d[T ].+", value):
            when = dt.datetime.fromisoformat(value)
        else:
            raise ValueError
    except ValueError:
        raise UsageError(f"{option}: {text!r} is not a date (2026-11-01), a date-time "
                         "(2026-11-01T12:00:00Z) or a duration (7d, 24h, 30m)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.astimezone(dt.timezone.utc)


def _window(since: dt.datetime | None, until: dt.datetime | None) -> str:
    if since is None and until is None:
        return ""
    start = ts_bound(since) + "Z" if since else "the first record"
    end = ts_bound(until) + "Z (exclusive)" if until else "now"
    return f"Window: {start} to {end}."


def run_report(args: argparse.Namespace, stats_path: Path, prices_path: Path,
               out: TextIO = sys.stdout) -> int:
    """Print the report of `stats_path` and its rotated files; 0, or 2 on a bad argument/file."""
    err = sys.stderr
    now = _now()
    try:
        by_text = getattr(args, "by", None)
        by = parse_by(DEFAULT_BY if by_text is None else by_text)
        since = parse_when(getattr(args, "since", None), "--since", now)
        until = parse_when(getattr(args, "until", None), "--until", now)
        if since and until and ts_bound(since) >= ts_bound(until):
            raise UsageError(f"--since ({ts_bound(since)}Z) is not before --until ({ts_bound(until)}Z)")
        fmt = getattr(args, "format", None) or "table"
        if fmt not in FORMATS:
            raise UsageError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
        prices = load_prices(Path(getattr(args, "prices", None) or prices_path))
    except (UsageError, PriceError) as exc:
        print(f"lmgate report: {exc}", file=err)
        return 2

    scanner = Scanner(by, since=ts_bound(since) if since else None,
                      until=ts_bound(until) if until else None)
    stats_path = Path(stats_path)
    try:
        found = scanner.scan(stats_path)
    except OSError as exc:
        print(f"lmgate report: cannot read {exc.filename or stats_path}: {exc.strerror or exc}",
              file=err)
        return 2
    if not found:
        print(f"lmgate report: no stats yet: {stats_path} does not exist and there are no "
              "rotated files beside it; the report is empty", file=err)
    if scanner.bad_count:
        print(f"lmgate report: skipped {scanner.bad_count:,} malformed "
              f"line{'s' if scanner.bad_count != 1 else ''}:", file=err)
        for path, lineno, reason in scanner.bad_samples:
            print(f"  {path}:{lineno}: {reason}", file=err)
        if scanner.bad_count > len(scanner.bad_samples):
            print(f"  ... and {scanner.bad_count - len(scanner.bad_samples):,} more", file=err)

    report = build(scanner.sums, by, prices, _window(since, until))
    if fmt == "table":
        write_table(report, out)
    else:
        (write_json if fmt == "json" else write_csv)(report, out)
        for line in notes(report):          # keep stdout machine-readable
            print(f"lmgate report: {line}", file=err)
    out.flush()
    return 0
