"""Reading the stats files with DuckDB: every rotated file (plain or .gz) in rotation order, then the
current one, as one `records` view of valid records; plus what was malformed, by file and line.

DuckDB's JSON reader parses the lines in parallel, in C++. Every field is read as raw JSON, so that
the checks below decide exactly which records are valid, whatever DuckDB would coerce: the same
rules as the writer's records (docs/report.md, "Malformed lines"). A line that is not a JSON object
comes out of the reader as a row of nulls, hence without a timestamp: malformed too. Blank lines
are skipped by the reader.

Which lines were malformed, and why, is told by a second, plain Python pass over the files that
have any (a rare event: a torn last line after a crash), since the reader keeps no line numbers.
"""

from __future__ import annotations

import datetime as dt
import errno
import glob
import gzip
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import orjson

from lmgate.providers import PROVIDERS

# Fields a report can be grouped by.
GROUP_FIELDS = ("owner", "lmgate_id", "provider", "model", "endpoint", "day", "hour", "status",
                "error_type")
# Fields a report reads, checked whatever --by says so that totals never depend on the grouping:
# strings or null (status: an integer or null); token counts: non-negative integers or null.
STRING_FIELDS = ("lmgate_id", "owner", "provider", "api_format", "endpoint", "model", "error_type")
TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
                "reasoning_tokens")
# The other fields of a record: typed in the `records` view when they can be, never checked.
LOOSE_FIELDS = {"request_id": "VARCHAR", "method": "VARCHAR", "stream": "BOOLEAN",
                "total_tokens": "UBIGINT", "duration_ms": "DOUBLE", "response_bytes": "UBIGINT",
                "masked_key": "VARCHAR", "folded_calls": "UBIGINT"}
# The `records` view's columns, in the writer's order (lmgate/records.py).
RECORD_FIELDS = ("timestamp", "request_id", "lmgate_id", "owner", "provider", "api_format",
                 "method", "endpoint", "model", "stream", "status", *TOKEN_FIELDS, "total_tokens",
                 "duration_ms", "response_bytes", "masked_key", "error_type", "folded_calls")

MAX_BAD_SAMPLES = 10
# A longer line is malformed. Records are a few hundred bytes; DuckDB's read buffers grow with it.
MAX_LINE_BYTES = 16 << 20
# A rotated file only holds records written before it was renamed: skip it when it was renamed
# this long before --since (a margin for clock adjustments).
ROTATION_MARGIN = dt.timedelta(hours=1)


def ts_bound(when: dt.datetime) -> str:
    """A time bound as compared with record timestamps: UTC, whole seconds, no zone letter."""
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


# ---------------------------------------------------------------- finding the files

@dataclass(frozen=True)
class StatsFile:
    path: Path
    rotated_at: dt.datetime | None     # None for the current file


def stats_files(current: Path) -> list[StatsFile]:
    """Rotated files beside `current` (oldest first: timestamp, then counter), then `current`.

    Rotation renames `<stem><suffix>` to `<stem>.<%Y%m%dT%H%M%SZ>[-N]<suffix>` (lmgate/writer.py);
    a rotated file may have been compressed since (`.gz`). The current file is listed even when it
    does not exist.
    """
    pattern = re.compile(re.escape(current.stem) + r"\.(\d{8}T\d{6}Z)(?:-(\d+))?"
                         + re.escape(current.suffix) + r"(\.gz)?\Z")
    found = []
    try:
        names = os.listdir(current.parent)
    except OSError:
        names = []
    for name in names:
        m = pattern.match(name)
        if m:
            try:
                when = dt.datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ")
            except ValueError:
                continue
            found.append((m.group(1), int(m.group(2) or 0), bool(m.group(3)),
                          StatsFile(current.parent / name, when.replace(tzinfo=dt.timezone.utc))))
    found.sort(key=lambda item: item[:3])
    return [item[3] for item in found] + [StatsFile(current, None)]


def is_glob(text: str) -> bool:
    return glob.has_magic(text)


def _stats_like(name: str) -> bool:
    """A file a folder given to --stats contributes: JSON Lines, plain or compressed."""
    return name.endswith((".jsonl", ".jsonl.gz"))


def files_of(spec: str) -> list[Path]:
    """The files a --stats folder or glob names, sorted by path: a glob's matches (`**` spans
    folders; a matching folder stands for its files), a folder's `*.jsonl` and `*.jsonl.gz` files
    at any depth. FileNotFoundError when there are none."""
    if is_glob(spec):
        matches = [Path(m) for m in glob.glob(spec, recursive=True)]
    else:
        matches = [Path(spec)]
    files: list[Path] = []
    for match in matches:
        if match.is_dir():
            files += [Path(root) / name for root, _, names in os.walk(match) for name in names
                      if _stats_like(name)]
        elif match.is_file():
            files.append(match)
    if not files:
        what = "matches no file" if is_glob(spec) else "holds no *.jsonl or *.jsonl.gz file"
        raise FileNotFoundError(errno.ENOENT, what, spec)
    return sorted(files)


# ---------------------------------------------------------------- the records

def connect() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB that never downloads anything (json, parquet and icu are built in)."""
    con = duckdb.connect(config={"autoinstall_known_extensions": False,
                                 "autoload_known_extensions": False})
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET enable_progress_bar = false")     # stdout is the report's
    return con


def sql_string(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def fmt_sql() -> str:
    """SQL over a `raw` row: the format whose token semantics apply (its api_format, else its
    provider's)."""
    formats = " ".join(f"WHEN '\"{api}\"' THEN '{api}'" for api in ("openai", "anthropic", "google"))
    providers = " ".join(f"WHEN '\"{p.name}\"' THEN '{p.api}'" for p in PROVIDERS.values())
    return (f"CASE j_api_format::VARCHAR {formats} ELSE CASE j_provider::VARCHAR {providers} END END")


def _types_ok_sql() -> str:
    """SQL over a `raw` row: every field a report reads has its type. JSON null is SQL NULL here;
    a token count must read back as the same unsigned integer."""
    checks = [f"(j_{name} IS NULL OR left(j_{name}::VARCHAR, 1) = '\"')" for name in STRING_FIELDS]
    checks.append("(j_status IS NULL OR j_status::VARCHAR IS NOT DISTINCT FROM "
                  "try_cast(j_status::VARCHAR AS BIGINT)::VARCHAR)")
    checks += [f"(j_{name} IS NULL OR j_{name}::VARCHAR IS NOT DISTINCT FROM t_{name}::VARCHAR)"
               for name in TOKEN_FIELDS]
    return " AND ".join(checks)


@dataclass
class Source:
    """A file handed to DuckDB: `read` is what it opens, `label` what messages name."""
    read: str
    label: str


@dataclass
class Records:
    """The stats files as DuckDB views: `checked` (rows in the window or bad, with `bad`) and
    `records` (the valid records of the window, typed)."""
    con: duckdb.DuckDBPyConnection
    sources: list[Source]
    found: bool                        # some stats file exists
    since: str | None = None           # ts_bound() strings: since inclusive, until exclusive
    until: str | None = None
    bad_count: int = 0
    bad_samples: list[tuple[str, int, str]] = field(default_factory=list)   # (file, line, why)
    _held: list = field(default_factory=list, repr=False)

    def close(self) -> None:
        for f in self._held:
            f.close()
        self._held.clear()
        self.con.close()

    def __enter__(self) -> Records:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def label(self, filename: str) -> str:
        for src in self.sources:
            if src.read == filename:
                return src.label
        return filename

    def check(self, counts: dict[str, int] | None = None) -> None:
        """Count the malformed lines (unless `counts`, per file, are known), and say which (the
        first MAX_BAD_SAMPLES) and why."""
        if counts is None:
            counts = dict(self.con.execute(
                "SELECT filename, count(*) FROM checked WHERE bad GROUP BY filename").fetchall())
        self.bad_count = sum(counts.values())
        for src in self.sources:
            if len(self.bad_samples) >= MAX_BAD_SAMPLES:
                break
            if counts.get(src.read):
                self.bad_samples += diagnose(src, self.since, self.until, counts[src.read],
                                             MAX_BAD_SAMPLES - len(self.bad_samples))


def open_records(current: Path, since: str | None = None, until: str | None = None) -> Records:
    """Views over `current` and its rotated files; OSError when the current file is unreadable.

    The current file is opened first and read through that handle, so a rotation from then on
    renames what we hold and no record is counted twice or missed.
    """
    current = Path(current)
    held = None
    try:
        held = open(current, "rb")
        os.read(held.fileno(), 0)       # a folder opens, but cannot be read
    except FileNotFoundError:
        held = None
    except OSError:
        if held:
            held.close()
        raise
    held_id = _file_id(held) if held else None
    sources: list[Source] = []
    found = held is not None
    for item in stats_files(current)[:-1]:
        found = True
        if since and item.rotated_at and ts_bound(item.rotated_at + ROTATION_MARGIN) < since:
            continue
        try:
            st = os.stat(item.path)
        except FileNotFoundError:
            continue
        if (st.st_dev, st.st_ino) != held_id:     # else: the current file, renamed after we opened it
            sources.append(Source(str(item.path), str(item.path)))
    con = connect()
    records = Records(con, sources, found, since, until)
    if held is not None:
        via = f"/proc/self/fd/{held.fileno()}"
        sources.append(Source(via if os.path.exists(via) else str(current), str(current)))
        records._held.append(held)
    _create_views(con, [src.read for src in sources], since, until)
    return records


def open_many(specs: list[str], since: str | None = None, until: str | None = None) -> Records:
    """Views over the files of several --stats arguments, e.g. many replicas' stats synced from a
    bucket: a stats file (with its rotated files, as open_records), a folder or a glob. A file
    reached twice (a folder and a glob that overlap, a symlink) is read once: each record counts
    once, since request ids are unique per replica's nginx and a file holds each record once.
    OSError when a file is unreadable or an argument names nothing."""
    chosen: list[tuple[Path, str]] = []         # (file, label)
    seen: set[tuple[int, int]] = set()
    held = []
    found = False
    try:
        for spec in specs:
            if not is_glob(spec) and not os.path.isdir(spec):
                # A stats file as the sidecar writes it: itself (held open, as open_records does)
                # and its rotated files.
                current = Path(spec)
                try:
                    f = open(current, "rb")
                    os.read(f.fileno(), 0)
                except FileNotFoundError:
                    f = None
                if f is not None:
                    held.append(f)
                rotated = stats_files(current)[:-1]
                if f is None and not rotated:       # named by hand: a typo, not "no stats yet"
                    raise FileNotFoundError(errno.ENOENT, "no such file, nor rotated files beside it",
                                            spec)
                found = True
                items = [(item.path, item.rotated_at) for item in rotated]
                for path, rotated_at in items:
                    if since and rotated_at and ts_bound(rotated_at + ROTATION_MARGIN) < since:
                        continue
                    _add(chosen, seen, path, str(path))
                if f is not None:
                    via = f"/proc/self/fd/{f.fileno()}"
                    if _file_id(f) not in seen:
                        seen.add(_file_id(f))
                        chosen.append((Path(via) if os.path.exists(via) else current, str(current)))
                continue
            for path in files_of(spec):
                found = True
                _add(chosen, seen, path, str(path))
    except BaseException:
        for f in held:
            f.close()
        raise
    sources = [Source(str(path), label) for path, label in chosen]
    con = connect()
    records = Records(con, sources, found, since, until)
    records._held.extend(held)
    _create_views(con, [src.read for src in sources], since, until)
    return records


def _add(chosen: list[tuple[Path, str]], seen: set[tuple[int, int]], path: Path, label: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:        # rotated or removed since it was listed
        return
    if (st.st_dev, st.st_ino) not in seen:
        seen.add((st.st_dev, st.st_ino))
        chosen.append((path, label))


def _create_views(con: duckdb.DuckDBPyConnection, files: list[str], since: str | None,
                  until: str | None) -> None:
    json_fields = ("status", *STRING_FIELDS, *TOKEN_FIELDS, *LOOSE_FIELDS)
    if files:
        # The timestamp as text (anything but a string fails to parse below), the rest as JSON.
        columns = ("{'timestamp': 'VARCHAR', "
                   + ", ".join(f"{sql_string(name)}: 'JSON'" for name in json_fields) + "}")
        listed = "[" + ", ".join(sql_string(f) for f in files) + "]"
        source = (f"read_json({listed}, format = 'newline_delimited', columns = {columns}, "
                  f"ignore_errors = true, filename = true, maximum_object_size = {MAX_LINE_BYTES})")
        raw = ", ".join(f'"{name}" AS j_{name}' for name in ("timestamp", *json_fields))
        con.execute(f"CREATE TEMP VIEW raw AS SELECT filename, {raw} FROM {source}")
    else:       # no file: an empty view with the same columns
        raw = ", ".join(f"NULL::JSON AS j_{name}" for name in json_fields)
        con.execute("CREATE TEMP VIEW raw AS SELECT NULL::VARCHAR AS filename, "
                    f"NULL::VARCHAR AS j_timestamp, {raw} LIMIT 0")
    window = []
    if since:
        window.append(f"ts >= TIMESTAMPTZ {sql_string(since + 'Z')}")
    if until:
        window.append(f"ts < TIMESTAMPTZ {sql_string(until + 'Z')}")
    in_window = " AND ".join(window) or "true"
    tokens = ", ".join(f"try_cast(j_{name}::VARCHAR AS UBIGINT) AS t_{name}" for name in TOKEN_FIELDS)
    # The writer's form first (fast), then other ISO 8601 forms, read as UTC unless they say;
    # a bare date is not a call's time.
    con.execute(f"""
        CREATE TEMP VIEW parsed AS SELECT *,
            coalesce(try_strptime(j_timestamp, '%Y-%m-%dT%H:%M:%S.%gZ')::TIMESTAMPTZ,
                     CASE WHEN length(j_timestamp) >= 13 AND substr(j_timestamp, 11, 1) IN ('T', ' ')
                          THEN try_cast(j_timestamp AS TIMESTAMPTZ) END) AS ts,
            {tokens}
        FROM raw""")
    # A line is bad when its timestamp is; a record outside the window is checked no further.
    con.execute(f"""
        CREATE TEMP VIEW checked AS SELECT * FROM (
            SELECT *, ts IS NOT NULL AND coalesce({in_window}, false) AS in_window,
                   ts IS NULL OR (({in_window}) AND NOT coalesce({_types_ok_sql()}, false)) AS bad
            FROM parsed)
        WHERE in_window OR bad""")
    strings = ", ".join(f"j_{name} ->> '$' AS {name}" for name in STRING_FIELDS)
    tokens = ", ".join(f"t_{name} AS {name}" for name in TOKEN_FIELDS)
    loose = ", ".join(f"try_cast(j_{name} AS {kind}) AS {name}" for name, kind in LOOSE_FIELDS.items())
    typed = f"ts AS timestamp, {strings}, j_status::BIGINT AS status, {tokens}, {loose}"
    con.execute(f"""
        CREATE TEMP VIEW records AS SELECT {", ".join(RECORD_FIELDS)} FROM (
            SELECT {typed} FROM checked WHERE NOT bad)""")


def _file_id(f) -> tuple[int, int]:
    st = os.fstat(f.fileno())
    return st.st_dev, st.st_ino


# ---------------------------------------------------------------- which lines, and why

def canonical_ts(value: str) -> str | None:
    """A record timestamp as `YYYY-MM-DDTHH:MM:SS[.f]Z` in UTC, or None if it is not ISO 8601."""
    if len(value) < 13 or value[10] not in "T ":
        return None                     # a bare date is not a call's time
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)     # the writer only writes UTC
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


def why_malformed(line: bytes, since: str | None, until: str | None) -> str | None:
    """Why one line is malformed, or None (blank lines and good records)."""
    if not line.strip():
        return None
    try:
        rec = orjson.loads(line)
    except ValueError:
        return "not valid JSON"
    if type(rec) is not dict:
        return "not a JSON object"
    ts = rec.get("timestamp")
    if type(ts) is not str:
        return "timestamp missing or not a string"
    ts = canonical_ts(ts)
    if ts is None:
        return "timestamp is not an ISO 8601 date-time"
    if (since and ts < since) or (until and ts >= until):
        return None         # outside the window: not inspected further
    for name in STRING_FIELDS:
        if not (rec.get(name) is None or type(rec[name]) is str):
            return f"{name} is not a string or null"
    if not (rec.get("status") is None or type(rec["status"]) is int):
        return "status is not an integer or null"
    for name in TOKEN_FIELDS:
        value = rec.get(name)
        if not (value is None or (type(value) is int and value >= 0)):
            return f"{name} is not a non-negative integer or null"
    return None


def diagnose(src: Source, since: str | None, until: str | None, bad: int,
             limit: int) -> list[tuple[str, int, str]]:
    """Up to `limit` malformed lines of one file that has `bad` of them: (file, line, reason).
    Reading stops once they are found."""
    found: list[tuple[str, int, str]] = []
    seen = 0
    opener = gzip.open if src.label.endswith(".gz") else open
    with opener(src.read, "rb") as f:
        lineno = 0
        for line in f:
            lineno += 1
            reason = why_malformed(line, since, until)
            if reason is None:
                continue
            if not line.endswith(b"\n") and reason == "not valid JSON":
                reason += " (incomplete last line)"
            found.append((src.label, lineno, reason))
            seen += 1
            if len(found) >= limit or seen >= bad:
                break
    return found
