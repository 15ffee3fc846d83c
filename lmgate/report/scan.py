"""Reading the stats files: every rotated file in rotation order, then the current one, summed into
one accumulator per group in constant memory (no record is kept).

Speed. `json.loads` costs about 4 µs per 500-byte record here, so most chunks take a fast path that
never builds a dict per record. The writer puts every record on one line with the same keys in the
same order, and inside a JSON string a `"` is always escaped, so the item separator (`,"` or
`, "`) only occurs between items. A 4 MiB chunk is therefore cut into items with one `str.split`,
and each field becomes a column by slicing that list (`parts[i::K]`): C loops, no per-record dict.

- Alignment: every line holds exactly one "\\n", so if the column of last items holds n of them,
  every line has exactly K items.
- The timestamp column is checked by one regex over the joined column; token columns must be plain
  non-negative integers or null; string fields are decoded with `json.loads` once per distinct value.
- A chunk that fails any check (a torn or garbage line, another key order, an escaped character the
  fast path does not handle, a wrong type) is read again line by line with `json.loads`, which
  decides, skips and reports the malformed lines. So the result never depends on which path ran,
  except that the fast path does not inspect fields the report does not use (request_id,
  masked_key, ...).

The key order (the "layout") is learned from the lines themselves, so the fast path follows the
writer if its fields change; a layout the fast path cannot use only makes the report slower.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import itemgetter
from pathlib import Path
from typing import BinaryIO, Iterable

# Fields a report can be grouped by.
GROUP_FIELDS = ("owner", "lmgate_id", "provider", "model", "endpoint", "day", "hour", "status",
                "error_type")
# Fields every accumulator key ends with: what prices a record and what classifies it.
PRICING_FIELDS = ("provider", "api_format", "model", "error_type")
TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
                "reasoning_tokens")

CHUNK_BYTES = 4 << 20
MAX_LINE_BYTES = 64 << 20     # a longer "line" is garbage: reported and skipped, never buffered
MAX_BAD_SAMPLES = 10
# A rotated file holds records written before it was renamed; skip it when renamed this long
# before --since (a margin for clock adjustments).
ROTATION_MARGIN = dt.timedelta(hours=1)

_CANON_TS = r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?Z'
_CANON_TS_RE = re.compile(_CANON_TS)
_NONE = object()


def ts_bound(when: dt.datetime) -> str:
    """A time bound as compared with record timestamps: UTC, whole seconds, no zone letter.

    A record timestamp `YYYY-MM-DDTHH:MM:SS[.fff]Z` sorts before this string exactly when it is
    earlier than this second, and after or equal to it otherwise.
    """
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def canonical_ts(value: str) -> str | None:
    """A record timestamp as `YYYY-MM-DDTHH:MM:SS[.f]Z` in UTC, or None if it is not ISO 8601."""
    if _CANON_TS_RE.fullmatch(value):
        return value
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    if "T" not in value and " " not in value:
        return None                     # a bare date is not a call's timestamp
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)     # the writer only writes UTC
    when = when.astimezone(dt.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


# ---------------------------------------------------------------- finding the files

@dataclass(frozen=True)
class StatsFile:
    path: Path
    rotated_at: dt.datetime | None     # None for the current file


def stats_files(current: Path) -> list[StatsFile]:
    """Rotated files beside `current` (oldest first: timestamp, then counter), then `current`.

    Rotation renames `<stem><suffix>` to `<stem>.<%Y%m%dT%H%M%SZ>[-N]<suffix>`. The current file is
    listed even if it does not exist yet (the reader skips it then).
    """
    pattern = re.compile(re.escape(current.stem) + r"\.(\d{8}T\d{6}Z)(?:-(\d+))?"
                         + re.escape(current.suffix) + r"\Z")
    found = []
    try:
        names = os.listdir(current.parent)
    except OSError:
        names = []
    for name in names:
        m = pattern.match(name)
        if m:
            when = dt.datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
            found.append((m.group(1), int(m.group(2) or 0), StatsFile(current.parent / name, when)))
    found.sort(key=lambda item: item[:2])
    return [item[2] for item in found] + [StatsFile(current, None)]


# ---------------------------------------------------------------- fast path plan per layout

@dataclass(frozen=True)
class Layout:
    keys: tuple[str, ...]
    sep: str     # between items, up to the next key's opening quote: ',"' or ', "'
    kv: str      # after a key, up to its value: '":' or '": '


def detect_layout(keys: tuple[str, ...], line: str) -> Layout | None:
    for sep, kv in ((',"', '":'), (', "', '": ')):
        parts = line.split(sep)
        if len(parts) == len(keys) and parts[0].startswith('{"' + keys[0] + kv) and all(
                p.startswith(k + kv) for p, k in zip(parts[1:], keys[1:])):
            return Layout(keys, sep, kv)
    return None


class _Plan:
    """How to cut one layout into the columns a report needs; None-able via `make`."""

    def __init__(self, layout: Layout, key_fields: tuple[str, ...], lo: str | None,
                 hi: str | None) -> None:
        keys, kv = layout.keys, layout.kv
        self.sep = layout.sep
        self.k = len(keys)
        col = {name: i for i, name in enumerate(keys)}
        self.ts_col = col["timestamp"]
        prefix = ('{"timestamp' if self.ts_col == 0 else "timestamp") + kv
        self.ts_re = re.compile("(?:" + re.escape(prefix) + '"' + _CANON_TS + '")*')
        start = len(prefix) + 1
        self.lo = prefix + '"' + lo if lo else None
        self.hi = prefix + '"' + hi if hi else None
        day, hour = itemgetter(slice(start, start + 10)), itemgetter(slice(start, start + 13))
        self.key_cols: list[tuple[str, str, int | None, object]] = []
        for name in key_fields:
            if name == "day":
                self.key_cols.append((name, "day", None, day))
            elif name == "hour":
                self.key_cols.append((name, "hour", None, hour))
            elif name not in col:
                self.key_cols.append((name, "missing", None, None))
            else:
                i = col[name]
                kind = "first" if i == 0 else "last" if i == self.k - 1 else "mid"
                self.key_cols.append((name, kind, i, None))
        self.tok_cols = [(col.get(name), name + kv) for name in TOKEN_FIELDS]

    @classmethod
    def make(cls, layout: Layout, key_fields: tuple[str, ...], lo: str | None,
             hi: str | None) -> _Plan | None:
        keys = layout.keys
        if "timestamp" not in keys or keys[-1] == "timestamp" or len(keys) < 2:
            return None
        for name in TOKEN_FIELDS:      # token columns are read as bare integers: middle items only
            if name in keys and keys.index(name) in (0, len(keys) - 1):
                return None
        return cls(layout, key_fields, lo, hi)


def _int_column(column: list[str], prefix: str, n: int) -> list[int] | None:
    """`name":123` items -> ints (null -> 0); None if any item is not a plain non-negative int."""
    text = "\n".join(column)
    if text.count(prefix) != n:
        return None
    text = text.replace(prefix, "")
    if "null" in text:
        text = text.replace("null", "0")
    if not (text.isascii() and text.replace("\n", "").isdigit()):
        return None
    try:
        return list(map(int, text.split("\n")))
    except ValueError:          # an empty value
        return None


def _json_type_ok(name: str, value: object) -> bool:
    if value is None:
        return True
    if name == "status":
        return type(value) is int
    return type(value) is str


# ---------------------------------------------------------------- the scanner

@dataclass
class Scanner:
    """Sums records into `sums[key] = [requests, input, output, cache_read, cache_write, reasoning]`.

    `key` is the values of `by` followed by PRICING_FIELDS. Token sums are raw (as written);
    prices.billable() gives them meaning per format.
    """
    by: tuple[str, ...]
    since: str | None = None     # ts_bound() strings; since inclusive, until exclusive
    until: str | None = None
    sums: dict[tuple, list[int]] = field(default_factory=dict)
    bad_count: int = 0
    bad_samples: list[str] = field(default_factory=list)
    files_read: int = 0
    fast_chunks: int = 0
    slow_chunks: int = 0

    def __post_init__(self) -> None:
        self.key_fields = tuple(self.by) + PRICING_FIELDS
        self._plans: dict[Layout, _Plan | None] = {}
        self._layout: Layout | None = None
        self._values: dict[tuple[str, str, str], object] = {}

    # -- files

    def scan(self, current: Path) -> bool:
        """Read the rotated files and the current one; False when none of them exists."""
        any_file = False
        opened = None
        try:
            opened = open(current, "rb")    # first: a rotation from now on renames what we hold
        except FileNotFoundError:
            pass
        try:
            held = os.fstat(opened.fileno()) if opened else None
            for item in stats_files(current)[:-1]:
                if self._skip_rotated(item):
                    any_file = True
                    continue
                try:
                    with open(item.path, "rb") as f:
                        st = os.fstat(f.fileno())
                        if held and (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino):
                            continue            # the current file, renamed after we opened it
                        any_file = True
                        self.scan_stream(f, str(item.path))
                except FileNotFoundError:
                    continue                    # removed since listed
            if opened:
                any_file = True
                self.scan_stream(opened, str(current))
        finally:
            if opened:
                opened.close()
        return any_file

    def _skip_rotated(self, item: StatsFile) -> bool:
        return bool(self.since and item.rotated_at
                    and ts_bound(item.rotated_at + ROTATION_MARGIN) < self.since)

    def scan_stream(self, f: BinaryIO, label: str) -> None:
        self.files_read += 1
        self._layout = None
        lineno = 0          # lines before the current chunk
        tail = b""
        skipping = False    # inside an over-long line, dropping bytes up to its end
        while True:
            data = f.read(CHUNK_BYTES)
            if not data:
                break
            if skipping:
                nl = data.find(b"\n")
                if nl < 0:
                    continue
                data = data[nl + 1:]
                lineno += 1
                skipping = False
            if tail:
                data = tail + data
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                if len(data) > MAX_LINE_BYTES:
                    self._bad(label, lineno + 1, f"line longer than {MAX_LINE_BYTES >> 20} MiB")
                    tail, skipping = b"", True
                else:
                    tail = data
                continue
            tail = data[cut:]
            chunk = data[:cut] if tail else data
            self._chunk(chunk, label, lineno)
            lineno += chunk.count(b"\n")
        if tail and not skipping:
            self._careful(tail, label, lineno, last_unterminated=True)

    # -- one chunk of whole lines

    def _chunk(self, data: bytes, label: str, lineno: int) -> None:
        n = data.count(b"\n")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None:
            if self._layout is None:
                self._layout = self._learn(text[:text.find("\n")])
            plan = self._plan(self._layout)
            if plan is not None:
                result = self._fast(plan, text, n)
                if result is not None:
                    self.fast_chunks += 1
                    self._merge(result)
                    return
        self.slow_chunks += 1
        self._careful(data, label, lineno)

    def _learn(self, line: str) -> Layout | None:
        try:
            rec = json.loads(line)
        except ValueError:
            return None
        return detect_layout(tuple(rec), line) if type(rec) is dict else None

    def _plan(self, layout: Layout | None) -> _Plan | None:
        if layout is None:
            return None
        if layout not in self._plans:
            self._plans[layout] = _Plan.make(layout, self.key_fields, self.since, self.until)
        return self._plans[layout]

    def _merge(self, result: dict[tuple, list[int]]) -> None:
        sums = self.sums
        for key, add in result.items():
            acc = sums.get(key)
            if acc is None:
                sums[key] = add
            else:
                for i, v in enumerate(add):
                    acc[i] += v

    def _fast(self, plan: _Plan, text: str, n: int) -> dict[tuple, list[int]] | None:
        """Sums for a chunk of n whole lines, or None if the chunk needs the careful path."""
        k = plan.k
        end = k * n
        parts = text.replace("\n", "\n" + plan.sep).split(plan.sep)
        if len(parts) != end + 1 or "".join(parts[k - 1:end:k]).count("\n") != n:
            return None
        ts = parts[plan.ts_col:end:k]
        if plan.ts_re.fullmatch("".join(ts)) is None:
            return None
        select = None
        lo, hi = plan.lo, plan.hi
        if lo or hi:
            first, last = min(ts), max(ts)
            if (lo and last < lo) or (hi and first >= hi):
                return {}
            if (lo and first < lo) or (hi and last >= hi):
                select = [(lo is None or lo <= t) and (hi is None or t < hi) for t in ts]
        columns: list[Iterable] = []
        for _, kind, i, get in plan.key_cols:
            if get is not None:
                columns.append(map(get, ts))
            elif i is None:
                columns.append(repeat(None, n))
            else:
                columns.append(parts[i:end:k])
        tokens: list[Iterable[int]] = []
        for i, prefix in plan.tok_cols:
            if i is None:
                tokens.append(repeat(0, n))
                continue
            ints = _int_column(parts[i:end:k], prefix, n)
            if ints is None:
                return None
            tokens.append(ints)
        del parts
        rows = zip(zip(*columns), zip(*tokens))
        if select is not None:
            rows = compress(rows, select)
        groups: defaultdict[tuple, list] = defaultdict(list)
        for key, toks in rows:
            groups[key].append(toks)
        result: dict[tuple, list[int]] = {}
        for raw, rows_ in groups.items():
            key = self._decode_key(plan, raw)
            if key is None:
                return None
            add = [len(rows_)]
            add.extend(map(sum, zip(*rows_)))
            acc = result.get(key)
            if acc is None:
                result[key] = add
            else:
                for j, v in enumerate(add):
                    acc[j] += v
        return result

    def _decode_key(self, plan: _Plan, raw: tuple) -> tuple | None:
        values = []
        for (name, kind, _, _), item in zip(plan.key_cols, raw):
            if kind == "day" or kind == "missing":
                values.append(item)
            elif kind == "hour":
                values.append(item + ":00Z")
            else:
                cache_key = (name, kind, item)
                value = self._values.get(cache_key, _NONE)
                if value is _NONE:
                    value = self._values[cache_key] = self._decode_item(name, kind, item)
                if value is _NONE:
                    return None
                values.append(value)
        return tuple(values)

    @staticmethod
    def _decode_item(name: str, kind: str, item: str) -> object:
        text = item if kind == "first" else '{"' + item
        if kind != "last":
            text += "}"
        try:
            obj = json.loads(text)
        except ValueError:
            return _NONE
        if type(obj) is not dict or len(obj) != 1 or name not in obj:
            return _NONE
        value = obj[name]
        return value if _json_type_ok(name, value) else _NONE

    # -- the careful path: json.loads per line; decides what is malformed

    def _careful(self, data: bytes, label: str, lineno: int, last_unterminated: bool = False) -> None:
        lines = data.split(b"\n")
        if not last_unterminated:
            lines.pop()         # data ends with "\n"
        result: dict[tuple, list[int]] = {}
        learned = None
        for line in lines:
            lineno += 1
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                reason = "invalid JSON"
                if last_unterminated:
                    reason += " (incomplete last line)"
                self._bad(label, lineno, reason)
                continue
            if type(rec) is not dict:
                self._bad(label, lineno, "not a JSON object")
                continue
            problem = self._add_record(rec, result)
            if problem:
                self._bad(label, lineno, problem)
            else:
                learned = (rec, line)
        self._merge(result)
        if learned is not None:
            rec, line = learned
            try:
                self._layout = detect_layout(tuple(rec), line.decode("utf-8"))
            except UnicodeDecodeError:
                self._layout = None

    def _add_record(self, rec: dict, result: dict[tuple, list[int]]) -> str | None:
        """Add one parsed record to `result`; the reason it is malformed, or None."""
        ts = rec.get("timestamp")
        if type(ts) is not str:
            return "timestamp missing or not a string"
        ts = canonical_ts(ts)
        if ts is None:
            return "timestamp is not an ISO 8601 date-time"
        if (self.since and ts < self.since) or (self.until and ts >= self.until):
            return None     # outside the window: not inspected further (as on the fast path)
        values = []
        for name in self.key_fields:
            if name == "day":
                values.append(ts[:10])
            elif name == "hour":
                values.append(ts[:13] + ":00Z")
            else:
                value = rec.get(name)
                if not _json_type_ok(name, value):
                    return f"{name} is not {'an integer' if name == 'status' else 'a string'} or null"
                values.append(value)
        add = [1]
        for name in TOKEN_FIELDS:
            value = rec.get(name)
            if value is None:
                add.append(0)
            elif type(value) is int and value >= 0:
                add.append(value)
            else:
                return f"{name} is not a non-negative integer or null"
        key = tuple(values)
        acc = result.get(key)
        if acc is None:
            result[key] = add
        else:
            for i, v in enumerate(add):
                acc[i] += v
        return None

    def _bad(self, label: str, lineno: int, reason: str) -> None:
        self.bad_count += 1
        if len(self.bad_samples) < MAX_BAD_SAMPLES:
            self.bad_samples.append(f"{label}:{lineno}: {reason}")
