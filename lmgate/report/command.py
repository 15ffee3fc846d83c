"""`lmgate report` and `lmgate export`: arguments, and the run from the stats files to the output."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import errno
import json
import re
import sys
from decimal import Decimal
from pathlib import Path
from typing import TextIO

import duckdb

from lmgate.report.html import write_html
from lmgate.report.output import Report, notes, write_csv, write_json, write_table
from lmgate.report.prices import PriceError, Pricer, load_prices
from lmgate.report.query import GROUP_FIELDS, RECORD_FIELDS, Records, open_many, open_records, ts_bound
from lmgate.writer import STDOUT
from lmgate.report.summary import summarize

DEFAULT_BY = "owner,provider,model"
FORMATS = ("table", "csv", "json", "html")
_DURATION = re.compile(r"(\d+)([dhm])")
_UNIT = {"d": "days", "h": "hours", "m": "minutes"}


class UsageError(Exception):
    """A bad argument; the message is one line naming it."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def add_window_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--since", metavar="DATE|DURATION",
        help="first moment counted: 2026-11-01 (start of that day, UTC), 2026-11-01T12:00:00Z, "
             "or a duration before now: 7d, 24h, 30m (default: everything)")
    parser.add_argument(
        "--until", metavar="DATE",
        help="end of the window, exclusive: 2026-11-02 counts up to the end of 2026-11-01 UTC; "
             "also a date-time or a duration before now (default: now)")


def add_stats_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stats", metavar="PATH|FOLDER|GLOB", action="append",
        help="read these stats files instead of stats.output_path: a stats file (and its rotated "
             "files), a folder (its *.jsonl and *.jsonl.gz files, at any depth) or a quoted glob "
             "such as 'bucket-sync/*/stats*.jsonl*'; repeatable, each file read once")


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    add_window_arguments(parser)
    add_stats_argument(parser)
    parser.add_argument(
        "--by", metavar="FIELDS", default=DEFAULT_BY,
        help=f"comma list of {', '.join(GROUP_FIELDS)} (default: {DEFAULT_BY})")
    parser.add_argument("--format", choices=FORMATS, default="table",
                        help="table (80 columns), csv, json, or html (a page with charts; "
                             "use --out) (default: table)")
    parser.add_argument("--out", type=Path, metavar="FILE",
                        help="write the report to FILE instead of stdout")
    parser.add_argument("--prices", type=Path, metavar="PATH",
                        help="price overrides (default: report.prices_path in the config)")
    parser.add_argument("--sql", metavar="QUERY",
                        help="run this SQL (DuckDB) over the view `records` (one row per valid "
                             f"record in the window: {', '.join(RECORD_FIELDS)}) and print its "
                             "result instead of the report")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    add_window_arguments(parser)
    add_stats_argument(parser)
    parser.add_argument("--parquet", type=Path, metavar="FILE", required=True,
                        help="write the valid records of the window to this Parquet file")


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


def _report_malformed(records: Records, err: TextIO) -> None:
    if records.bad_count:
        print(f"lmgate report: skipped {records.bad_count:,} malformed "
              f"line{'s' if records.bad_count != 1 else ''}:", file=err)
        for path, lineno, reason in records.bad_samples:
            print(f"  {path}:{lineno}: {reason}", file=err)
        if records.bad_count > len(records.bad_samples):
            print(f"  ... and {records.bad_count - len(records.bad_samples):,} more", file=err)


def _open(stats_path: Path, since: dt.datetime | None, until: dt.datetime | None,
          err: TextIO, command: str = "report", specs: list[str] | None = None) -> Records | None:
    stats_path = Path(stats_path)
    window = {"since": ts_bound(since) if since else None, "until": ts_bound(until) if until else None}
    if not specs and stats_path == STDOUT:
        print(f"lmgate {command}: stats.output_path is \"-\" (the sidecar's standard output): name "
              "the files the log shipper wrote with --stats", file=err)
        return None
    try:
        records = open_many(specs, **window) if specs else open_records(stats_path, **window)
    except OSError as exc:
        where = "--stats " if specs and exc.errno == errno.ENOENT else ""
        print(f"lmgate {command}: cannot read {where}{exc.filename or stats_path}: {exc.strerror or exc}",
              file=err)
        return None
    if not records.found:
        named = ", ".join(specs) if specs else str(stats_path)
        print(f"lmgate {command}: no stats yet: {named} does not exist and there are no "
              "rotated files beside it; the report is empty", file=err)
    return records


def _duckdb_error(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _window_args(args: argparse.Namespace, now: dt.datetime) -> tuple[dt.datetime | None, dt.datetime | None]:
    since = parse_when(getattr(args, "since", None), "--since", now)
    until = parse_when(getattr(args, "until", None), "--until", now)
    if since and until and ts_bound(since) >= ts_bound(until):
        raise UsageError(f"--since ({ts_bound(since)}Z) is not before --until ({ts_bound(until)}Z)")
    return since, until


def run_report(args: argparse.Namespace, stats_path: Path, prices_path: Path,
               out: TextIO | None = None, prices_optional: bool = False) -> int:
    """Print the report of `stats_path` and its rotated files; 0, or 2 on a bad argument/file.
    `prices_optional`: `prices_path` is the default overrides file, which may be absent."""
    out = out or sys.stdout
    err = sys.stderr
    now = _now()
    sql = getattr(args, "sql", None)
    try:
        by_text = getattr(args, "by", None)
        by = parse_by(DEFAULT_BY if by_text is None else by_text)
        since, until = _window_args(args, now)
        fmt = getattr(args, "format", None) or "table"
        if fmt not in FORMATS:
            raise UsageError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
        if sql and fmt == "html":
            raise UsageError("--format html is a report: --sql prints table, csv or json")
        chosen = getattr(args, "prices", None)
        if sql or (chosen is None and prices_optional and not Path(prices_path).exists()):
            overrides = None
        else:
            overrides = load_prices(Path(chosen or prices_path))
    except (UsageError, PriceError) as exc:
        print(f"lmgate report: {exc}", file=err)
        return 2

    records = _open(stats_path, since, until, err, specs=getattr(args, "stats", None))
    if records is None:
        return 2
    with records:
        try:
            if sql:
                records.check()
                _report_malformed(records, err)
                if getattr(args, "out", None) is None:
                    return _run_sql(records, sql, fmt, out, err)
                try:
                    with open(args.out, "w", encoding="utf-8") as file:
                        return _run_sql(records, sql, fmt, file, err)
                except OSError as exc:
                    print(f"lmgate report: --out: cannot write {args.out}: {exc.strerror or exc}",
                          file=err)
                    return 2
            pricer = Pricer(overrides)
            report = summarize(records, by, pricer, _window(since, until))
            views = _html_views(records, pricer) if fmt == "html" else {}
            _report_malformed(records, err)
        except duckdb.IOException as exc:
            print(f"lmgate report: cannot read the stats files: {_duckdb_error(exc)}", file=err)
            return 2
    target = getattr(args, "out", None)
    if target is not None:
        try:
            with open(target, "w", encoding="utf-8") as file:
                _write(report, views, fmt, file, err, now)
        except OSError as exc:
            print(f"lmgate report: --out: cannot write {target}: {exc.strerror or exc}", file=err)
            return 2
        return 0
    _write(report, views, fmt, out, err, now)
    out.flush()
    return 0


# The groupings the html page shows beside the table's.
HTML_VIEWS = {"day": ("day",), "owner": ("owner",), "lmgate_id": ("lmgate_id",),
              "model": ("provider", "model")}


def _html_views(records: Records, pricer: Pricer) -> dict[str, Report]:
    # Each grouping is one more pass; the malformed lines were counted by the first.
    bad = records.bad_count, list(records.bad_samples)
    views = {name: summarize(records, by, pricer) for name, by in HTML_VIEWS.items()}
    records.bad_count, records.bad_samples = bad
    return views


def _write(report: Report, views: dict[str, Report], fmt: str, out: TextIO, err: TextIO,
           now: dt.datetime) -> None:
    if fmt == "html":
        write_html(report, views, out, now.strftime("%Y-%m-%d %H:%M:%SZ"))
    elif fmt == "table":
        write_table(report, out)
    else:
        (write_json if fmt == "json" else write_csv)(report, out)
    if fmt in ("json", "csv"):
        for line in notes(report):          # keep stdout machine-readable
            print(f"lmgate report: {line}", file=err)


def _run_sql(records: Records, sql: str, fmt: str, out: TextIO, err: TextIO) -> int:
    try:
        cursor = records.con.execute(sql)
        names = [d[0] for d in cursor.description or ()]
        rows = cursor.fetchall() if names else []
    except duckdb.IOException:
        raise
    except duckdb.Error as exc:
        print(f"lmgate report: --sql: {_duckdb_error(exc)}", file=err)
        return 2
    if fmt == "json":
        objects = [dict(zip(names, row, strict=True)) for row in rows]
        out.write(json.dumps(objects, indent=2, ensure_ascii=False, default=_json_value) + "\n")
    elif fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(names)
        writer.writerows([["" if v is None else _json_value(v) for v in row] for row in rows])
    else:
        cells = [names] + [["" if v is None else str(_json_value(v)) for v in row] for row in rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(names))]
        for row in cells:
            out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")
    out.flush()
    return 0


def _json_value(value: object) -> object:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")
    if isinstance(value, (dt.date, dt.time, Decimal)):
        return str(value) if not isinstance(value, Decimal) else float(value)
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)


def run_export(args: argparse.Namespace, stats_path: Path) -> int:
    """`lmgate export --parquet FILE`: the valid records of the window as Parquet."""
    err = sys.stderr
    try:
        since, until = _window_args(args, _now())
    except UsageError as exc:
        print(f"lmgate export: {exc}", file=err)
        return 2
    target = Path(args.parquet)
    records = _open(stats_path, since, until, err, "export", getattr(args, "stats", None))
    if records is None:
        return 2
    with records:
        try:
            records.check()
            _report_malformed(records, err)
            count = records.con.execute("SELECT count(*) FROM records").fetchone()[0]
            records.con.execute(f"COPY (SELECT * FROM records) TO {_sql_path(target)} "
                                "(FORMAT parquet, COMPRESSION zstd)")
        except duckdb.IOException as exc:
            print(f"lmgate export: {_duckdb_error(exc)}", file=err)
            return 2
    print(f"lmgate export: wrote {count:,} records to {target}", file=err)
    return 0


def _sql_path(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"
