"""Reading the stats files: every rotated file in rotation order, then the current one, summed into
one accumulator per group in constant memory (no record is kept).

Speed. `json.loads` costs 3-4 µs per 500-byte record on a small server, so chunks of whole lines
(1 MiB) take a fast path that never builds a dict per record. The writer puts each record on one
line with the same keys in the same order, and inside a JSON string every `"` is escaped, so the
item separator (`,"`, or `, "`) occurs only between items. One `bytes.split` cuts a chunk into
items, and a field becomes a column by slicing that list (`parts[i::K-1]`): C loops throughout,
and one short Python loop per record that adds its tokens to its group.

- Alignment: the last item of line j and the first of line j+1 share one part ("...}\\n{..."); each
  of those parts must hold exactly one newline, and the first and last items of every line are
  checked, so every line has exactly K items.
- Checks: timestamps over the joined column; token columns must be bare non-negative integers or
  null; the fields a report can read must be strings or null (status: an integer or null), and
  those in the group key are decoded with json.loads once per distinct value.
- A chunk that fails any check (a torn or garbage line, another key order, a wrong type, ...) is read
  again line by line with json.loads, which decides, skips and reports malformed lines. The totals
  never depend on the path taken, except that the fast path does not look into fields no report
  reads (request_id, masked_key, duration_ms, ...).

The key order (the "layout") is learned from the lines themselves, so the fast path follows the
writer when its fields change; a layout it cannot use only makes the report slower.

Inputs of PARALLEL_MIN_BYTES or more are cut into ranges of whole lines, read by one process per
available CPU; ranges are merged in file order, so malformed lines keep their line numbers.
"""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
import re
import threading
from concurrent.futures import ProcessPoolExecutor
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
# Every field a report can read. Their types are checked whatever --by says, so that the totals
# do not depend on the grouping: string or null (status: integer or null).
CHECKED_FIELDS = ("owner", "lmgate_id", "provider", "api_format", "model", "endpoint", "status",
                  "error_type")
TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
                "reasoning_tokens")

CHUNK_BYTES = 1 << 20
MAX_LINE_BYTES = 64 << 20     # a longer "line" is garbage: reported and skipped, never buffered
MAX_BAD_SAMPLES = 10
# A rotated file only holds records written before it was renamed: skip it when it was renamed
# this long before --since (a margin for clock adjustments).
ROTATION_MARGIN = dt.timedelta(hours=1)

_CANON_TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?Z"
_CANON_TS_RE = re.compile(_CANON_TS)
_DIGITS_TO_0 = bytes.maketrans(b"123456789", b"000000000")
_NONE = object()
_BAD = object()


def ts_bound(when: dt.datetime) -> str:
    """A time bound as compared with record timestamps: UTC, whole seconds, no zone letter.

    A timestamp `YYYY-MM-DDTHH:MM:SS[.fff]Z` sorts before this string exactly when it is earlier
    than this second, and at or after it otherwise.
    """
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def canonical_ts(value: str) -> str | None:
    """A record timestamp as `YYYY-MM-DDTHH:MM:SS[.f]Z` in UTC, or None if it is not ISO 8601."""
    if _CANON_TS_RE.fullmatch(value):
        return value
    if len(value) < 13 or value[10] not in "T ":
        return None                     # a bare date is not a call's time
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)     # the writer only writes UTC
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


# ---------------------------------------------------------------- finding the files

@dataclass(frozen=True)
class StatsFile:
    path: Path
    rotated_at: dt.datetime | None     # None for the current file


def stats_files(current: Path) -> list[StatsFile]:
    """Rotated files beside `current` (oldest first: timestamp, then counter), then `current`.

    Rotation renames `<stem><suffix>` to `<stem>.<%Y%m%dT%H%M%SZ>[-N]<suffix>` (lmgate/writer.py).
    The current file is listed even when it does not exist.
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
            try:
                when = dt.datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ")
            except ValueError:
                continue
            found.append((m.group(1), int(m.group(2) or 0),
                          StatsFile(current.parent / name, when.replace(tzinfo=dt.timezone.utc))))
    found.sort(key=lambda item: item[:2])
    return [item[2] for item in found] + [StatsFile(current, None)]


# ---------------------------------------------------------------- the fast path

@dataclass(frozen=True)
class Layout:
    keys: tuple[str, ...]
    sep: bytes   # between items, up to the next key's opening quote: b',"' or b', "'
    kv: bytes    # after a key, up to its value: b'":' or b'": '


def detect_layout(keys: tuple[str, ...], line: bytes) -> Layout | None:
    """Key order and separators of a line that json.loads read as a dict with `keys`, in order."""
    names = [k.encode("utf-8", "surrogatepass") for k in keys]
    line = line.rstrip()
    for sep, kv in ((b',"', b'":'), (b', "', b'": ')):
        parts = line.split(sep)
        if len(parts) == len(names) and parts[0].startswith(b'{"' + names[0] + kv) and all(
                p.startswith(k + kv) for p, k in zip(parts[1:], names[1:])):
            return Layout(keys, sep, kv)
    return None


def _json_type_ok(name: str, value: object) -> bool:
    if value is None:
        return True
    if name == "status":
        return type(value) is int
    return type(value) is str


def _decode_item(name: str, kind: str, item: bytes) -> object:
    """The value of one `name":value` item (the first item starts `{"`, the last ends `}`)."""
    text = item if kind == "first" else b'{"' + item
    if kind != "last":
        text += b"}"
    try:
        obj = json.loads(text)
    except ValueError:
        return _BAD
    if type(obj) is not dict or len(obj) != 1 or name not in obj:
        return _BAD
    value = obj[name]
    return value if _json_type_ok(name, value) else _BAD


def _typed_column(items: list[bytes], name: str, kind: str, prefix: bytes) -> bool:
    """Whether every `name":value` item has the type _json_type_ok() wants (value not decoded)."""
    if kind != "mid":
        return all(_decode_item(name, kind, item) is not _BAD for item in set(items))
    if name == "status":
        text = b",".join(items).replace(prefix, b"").replace(b"null", b"0")
        return text.replace(b",", b"").isdigit()
    joined = b"\n" + b"\n\n".join(items) + b"\n"    # an item holds no newline
    return joined.count(b"\n" + prefix + b'"') + joined.count(b"\n" + prefix + b"null\n") == len(items)


def _int_column(items: list[bytes], prefix: bytes, n: int) -> list[int] | None:
    """`name":123` items -> ints (null -> 0); None unless every item is a bare int >= 0 or null."""
    text = b",".join(items)
    if text.count(prefix) != n:
        return None
    if b"null" in text:
        text = text.replace(prefix + b"null", prefix + b"0")
    # Deleting the prefix's bytes must delete exactly the n prefixes, and leave digits and commas.
    values = text.translate(None, prefix)
    if len(values) != len(text) - n * len(prefix) or not values.replace(b",", b"").isdigit():
        return None
    try:
        ints = json.loads(b"[" + values + b"]")     # also refuses leading zeros and empty items
    except ValueError:
        return None
    return ints if len(ints) == n else None


class _Plan:
    """How to cut the chunks of one layout into the columns a report needs."""

    def __init__(self, layout: Layout, key_fields: tuple[str, ...], lo: str | None,
                 hi: str | None) -> None:
        keys, kv = layout.keys, layout.kv
        self.sep = layout.sep
        self.k = len(keys)
        col = {name: i for i, name in enumerate(keys)}
        self.ts_col = col["timestamp"]
        prefix = (b'{"timestamp' if self.ts_col == 0 else b"timestamp") + kv + b'"'
        self.ts_re = re.compile(b"(?:" + re.escape(prefix) + _CANON_TS.encode() + b'"\n)*')
        self.ts_template: bytes | None = None      # the usual timestamp item, digits as 0
        # Bounds compare with whole timestamp items: the same prefix, then the ts_bound() text.
        self.lo = prefix + lo.encode() if lo else None
        self.hi = prefix + hi.encode() if hi else None
        at = len(prefix)
        slices = {"day": itemgetter(slice(at, at + 10)), "hour": itemgetter(slice(at, at + 13))}
        # (name, kind, column, getter): kind is first/mid/last (an item of the line), day/hour (a
        # slice of the timestamp item) or missing (no such key in this layout: null).
        self.key_cols: list[tuple[str, str, int | None, object]] = []
        for name in key_fields:
            if name in slices:
                self.key_cols.append((name, name, None, slices[name]))
            elif name not in col:
                self.key_cols.append((name, "missing", None, None))
            else:
                i = col[name]
                self.key_cols.append((name, _kind(i, self.k), i, None))
        # Checked fields the key leaves out: (name, kind, column, item prefix).
        self.check_cols = [(name, _kind(col[name], self.k), col[name], name.encode() + kv)
                           for name in CHECKED_FIELDS if name in col and name not in key_fields]
        # (index in TOKEN_FIELDS, column, item prefix)
        self.tok_cols = [(j, col[name], name.encode() + kv)
                         for j, name in enumerate(TOKEN_FIELDS) if name in col]
        # raw key -> values, for every valid raw key; (name, raw item) -> value or _BAD. Shared by
        # the plans of a process for the same layout and key, so that a worker reading many
        # ranges decodes each key once.
        self._decoded, self._items = _decode_caches(layout, tuple(key_fields))
        self.raw_sums: dict[tuple, list[int]] = {}

    @classmethod
    def make(cls, layout: Layout | None, key_fields: tuple[str, ...], lo: str | None,
             hi: str | None) -> _Plan | None:
        if layout is None:
            return None
        keys = layout.keys
        if len(keys) < 3 or "timestamp" not in keys or keys[-1] == "timestamp":
            return None
        for name in TOKEN_FIELDS:      # token columns are read as bare integers: middle items only
            if name in keys and keys.index(name) in (0, len(keys) - 1):
                return None
        return cls(layout, key_fields, lo, hi)

    def timestamps_ok(self, ts: list[bytes]) -> bool:
        """Every item is the timestamp key with a `YYYY-MM-DDTHH:MM:SS[.f]Z` value."""
        joined = b"\n".join(ts) + b"\n"
        if self.ts_template is not None and (
                joined.translate(_DIGITS_TO_0) == self.ts_template * len(ts)):
            return True                 # all shaped like the last checked one (digits aside)
        if self.ts_re.fullmatch(joined) is None:
            return False
        self.ts_template = (ts[0] + b"\n").translate(_DIGITS_TO_0)
        return True

    def decode_key(self, raw: tuple) -> tuple | None:
        """The values of a key read off raw items; None if one is malformed."""
        values = self._decoded.get(raw)
        if values is None:
            decoded = []
            for (name, kind, _, _), item in zip(self.key_cols, raw):
                if kind == "missing":
                    decoded.append(None)
                elif kind == "day":
                    decoded.append(item.decode("ascii"))
                elif kind == "hour":
                    decoded.append(item.decode("ascii") + ":00Z")
                else:
                    value = self._items.get((name, item), _NONE)
                    if value is _NONE:
                        value = self._items[(name, item)] = _decode_item(name, kind, item)
                    if value is _BAD:
                        return None
                    decoded.append(value)
            values = self._decoded[raw] = tuple(decoded)
        return values

    def add(self, data: bytes) -> int | None:
        """Add a chunk of whole lines to `raw_sums` (by raw key); returns its number of lines, or
        None (having added nothing) when the chunk needs the careful path."""
        k1 = self.k - 1                     # separators per line
        parts = data.split(self.sep)
        m = len(parts) - 1
        n, rest = divmod(m, k1)
        if rest or not n:
            return None
        edges = b"\n".join(parts[0:m + 1:k1]).split(b"\n")
        if len(edges) != 2 * n + 1 or edges[-1]:
            return None
        first, last = edges[0:2 * n:2], edges[1:2 * n:2]

        def column(i: int) -> list[bytes]:
            return first if i == 0 else last if i == k1 else parts[i:m:k1]

        ts = column(self.ts_col)
        if not self.timestamps_ok(ts):
            return None
        select = None
        lo, hi = self.lo, self.hi
        if lo or hi:
            early, late = min(ts), max(ts)
            if (lo and late < lo) or (hi and early >= hi):
                return n
            if (lo and early < lo) or (hi and late >= hi):
                select = [(lo is None or lo <= t) and (hi is None or t < hi) for t in ts]
        for name, kind, i, prefix in self.check_cols:
            if not _typed_column(column(i), name, kind, prefix):
                return None
        columns: list[Iterable] = []
        for _, _, i, get in self.key_cols:
            if get is not None:
                columns.append(map(get, ts))
            elif i is None:
                columns.append(repeat(None, n))
            else:
                columns.append(column(i))
        tokens: list[Iterable[int]] = [repeat(0)] * len(TOKEN_FIELDS)
        for j, i, prefix in self.tok_cols:
            items = column(i)
            if items.count(prefix + b"null") + items.count(prefix + b"0") == n:
                continue                    # all null or zero
            values = _int_column(items, prefix, n)
            if values is None:
                return None
            tokens[j] = values
        del parts, edges, first, last
        keys = zip(*columns)
        if select is not None:
            keys = compress(keys, select)
            tokens = [list(compress(values, select)) for values in tokens]
        keys = list(keys)
        sums = self.raw_sums
        get = sums.get
        added = []                          # keys this chunk put in `sums`
        for key, (t1, t2, t3, t4, t5) in zip(keys, zip(*tokens)):
            acc = get(key)
            if acc is None:
                if key not in self._decoded and self.decode_key(key) is None:
                    self._undo(keys[:keys.index(key)], tokens, added)    # its first row
                    return None
                acc = sums[key] = [0, 0, 0, 0, 0, 0]
                added.append(key)
            acc[0] += 1
            acc[1] += t1
            acc[2] += t2
            acc[3] += t3
            acc[4] += t4
            acc[5] += t5
        return n

    def _undo(self, keys: list[tuple], tokens: list, added: list[tuple]) -> None:
        """Take back the rows of a chunk that turned out to need the careful path."""
        sums = self.raw_sums
        for key, (t1, t2, t3, t4, t5) in zip(keys, zip(*tokens)):
            acc = sums[key]
            acc[0] -= 1
            acc[1] -= t1
            acc[2] -= t2
            acc[3] -= t3
            acc[4] -= t4
            acc[5] -= t5
        for key in added:
            del sums[key]

    def take_sums(self) -> dict[tuple, list[int]]:
        """The sums added so far, by decoded key (and start again from zero)."""
        sums: dict[tuple, list[int]] = {}
        for raw, add in self.raw_sums.items():
            _add_to(sums, self._decoded[raw], add)
        self.raw_sums = {}
        return sums


_CACHES: dict[tuple[Layout, tuple[str, ...]], tuple[dict, dict]] = {}
_CACHE_LIMIT = 1_000_000      # entries; past it a cache starts again (memory stays bounded)


def _decode_caches(layout: Layout, key_fields: tuple[str, ...]) -> tuple[dict, dict]:
    caches = _CACHES.get((layout, key_fields))
    if caches is None or len(caches[0]) + len(caches[1]) > _CACHE_LIMIT:
        caches = _CACHES[(layout, key_fields)] = ({}, {})
    return caches


def _kind(column: int, k: int) -> str:
    return "first" if column == 0 else "last" if column == k - 1 else "mid"


def _add_to(sums: dict[tuple, list[int]], key: tuple, add: list[int]) -> None:
    acc = sums.get(key)
    if acc is None:
        sums[key] = list(add)
    else:
        for i, v in enumerate(add):
            acc[i] += v


# ---------------------------------------------------------------- the scanner

@dataclass
class Scanner:
    """Sums records into `sums[key] = [requests, input, output, cache_read, cache_write, reasoning]`.

    `key` is the values of `by` followed by PRICING_FIELDS. Token sums are as written (null = 0);
    prices.billable() gives them one meaning across formats.
    """
    by: tuple[str, ...]
    since: str | None = None     # ts_bound() strings: since inclusive, until exclusive
    until: str | None = None
    sums: dict[tuple, list[int]] = field(default_factory=dict)
    bad_count: int = 0
    bad_samples: list[tuple[str, int, str]] = field(default_factory=list)   # (file, line, why)
    files_read: int = 0
    files_skipped: int = 0
    fast_chunks: int = 0
    slow_chunks: int = 0

    def __post_init__(self) -> None:
        self.key_fields = tuple(self.by) + PRICING_FIELDS
        self._plans: dict[Layout | None, _Plan | None] = {}
        self._layout: Layout | None = None

    # -- files

    def scan(self, current: Path, workers: int | None = None) -> bool:
        """Read the rotated files, then the current one; False when there is no file at all.

        Big inputs are cut into ranges of whole lines read by `workers` processes (default: one
        per available CPU); the sums are the same either way.
        """
        try:
            held = open(current, "rb")      # first: a rotation from now on renames what we hold
        except FileNotFoundError:
            held = None
        try:
            sources, found = self._sources(current, held)
            if workers is None:
                workers = available_cpus()
            total = sum(src.size for src in sources)
            if workers > 1 and total >= PARALLEL_MIN_BYTES:
                self._scan_parallel(sources, held, workers)
                return found
            for src in sources:
                if src.path == current and held is not None and src.file_id == _file_id(held):
                    self.scan_stream(held, src.label)
                    continue
                try:
                    f = open(src.path, "rb")
                except FileNotFoundError:
                    continue                # deleted since listed
                with f:
                    self.scan_stream(f, src.label)
        finally:
            if held:
                held.close()
        return found

    def _sources(self, current: Path, held: BinaryIO | None) -> tuple[list[_Source], bool]:
        held_id = _file_id(held) if held else None
        sources = []
        found = held is not None
        for item in stats_files(current)[:-1]:
            found = True
            if self.since and item.rotated_at and ts_bound(item.rotated_at + ROTATION_MARGIN) < self.since:
                self.files_skipped += 1
                continue
            try:
                st = os.stat(item.path)
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) != held_id:   # else: the current file, renamed after we opened it
                sources.append(_Source(item.path, str(item.path), (st.st_dev, st.st_ino), st.st_size))
        if held is not None:
            sources.append(_Source(current, str(current), held_id, os.fstat(held.fileno()).st_size))
        return sources, found

    def _scan_parallel(self, sources: list[_Source], held: BinaryIO | None, workers: int) -> None:
        # About four ranges per worker: few results to merge, and little idle time at the end.
        step = max(RANGE_BYTES, sum(src.size for src in sources) // (workers * 4))
        ranges = []
        for src in sources:
            try:
                f = held if held is not None and _file_id(held) == src.file_id else open(src.path, "rb")
            except FileNotFoundError:
                continue
            try:
                ranges += [(src, start, end) for start, end in _split(f, src.size, step)]
            finally:
                if f is not held:
                    f.close()
        args = (self.by, self.since, self.until)
        with ProcessPoolExecutor(min(workers, len(ranges)), mp_context=_mp_context()) as pool:
            futures = [pool.submit(_scan_range, str(src.path), src.file_id, start, end, *args)
                       for src, start, end in ranges]
            offsets: dict[str, int] = {}
            for (src, start, end), future in zip(ranges, futures):
                part = future.result()
                if part == "moved" and held is not None and _file_id(held) == src.file_id:
                    part = _scan_part(held, start, end, *args)    # rotated meanwhile: read ours
                if not isinstance(part, tuple):
                    continue                                     # deleted meanwhile
                sums, bad_count, bad_samples, lines, fast, slow = part
                self._merge(sums)
                offset = offsets.get(src.label, 0)
                for _, lineno, reason in bad_samples:
                    self._bad(src.label, offset + lineno, reason, count=False)
                self.bad_count += bad_count
                offsets[src.label] = offset + lines
                self.fast_chunks += fast
                self.slow_chunks += slow
        self.files_read += len({src.label for src, _, _ in ranges})

    def scan_stream(self, f: BinaryIO, label: str) -> int:
        """Add every line of an open file (from its position); returns the number of lines read.
        `label` names the file in malformed-line reports."""
        self.files_read += 1
        self._layout = None
        try:
            return self._read(f, label)
        finally:
            for plan in self._plans.values():
                if plan is not None and plan.raw_sums:
                    self._merge(plan.take_sums())

    def _read(self, f: BinaryIO, label: str) -> int:
        lineno = 0              # lines before the current chunk
        while True:
            data = f.read(CHUNK_BYTES)
            if not data:
                return lineno
            if not data.endswith(b"\n"):         # complete the last line
                more = f.readline(MAX_LINE_BYTES)
                data += more
                if not more.endswith(b"\n"):     # end of file, or an over-long line
                    cut = data.rfind(b"\n") + 1
                    if cut:
                        lineno = self._chunk(data[:cut], label, lineno)
                    if len(more) < MAX_LINE_BYTES:
                        return self._careful(data[cut:], label, lineno, unterminated=True)
                    lineno += 1
                    self._bad(label, lineno, f"line longer than {MAX_LINE_BYTES >> 20} MiB")
                    while not (more := f.readline(MAX_LINE_BYTES)).endswith(b"\n"):
                        if not more:
                            return lineno
                    continue
            lineno = self._chunk(data, label, lineno)

    def _chunk(self, data: bytes, label: str, lineno: int) -> int:
        """Add a chunk of whole lines; returns the number of its last line."""
        if self._layout is None:
            self._layout = _learn(data[:data.find(b"\n")])
        plan = self._plans.get(self._layout, _NONE)
        if plan is _NONE:
            plan = self._plans[self._layout] = _Plan.make(
                self._layout, self.key_fields, self.since, self.until)
        if plan is not None:
            n = plan.add(data)
            if n is not None:
                self.fast_chunks += 1
                return lineno + n
        self.slow_chunks += 1
        return self._careful(data, label, lineno)

    def _merge(self, result: dict[tuple, list[int]]) -> None:
        for key, add in result.items():
            _add_to(self.sums, key, add)

    # -- the careful path: json.loads per line; it decides what is malformed

    def _careful(self, data: bytes, label: str, lineno: int, unterminated: bool = False) -> int:
        lines = data.split(b"\n")
        if not unterminated:
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
                self._bad(label, lineno, "not valid JSON" + (" (incomplete last line)" if unterminated else ""))
                continue
            if type(rec) is not dict:
                self._bad(label, lineno, "not a JSON object")
                continue
            problem = self._add(rec, result)
            if problem:
                self._bad(label, lineno, problem)
            else:
                learned = (rec, line)
        self._merge(result)
        if learned is not None:         # the fast path tries the layout of the last good line
            self._layout = detect_layout(tuple(learned[0]), learned[1])
        return lineno

    def _add(self, rec: dict, result: dict[tuple, list[int]]) -> str | None:
        """Add one parsed record to `result`; returns why it is malformed, or None."""
        ts = rec.get("timestamp")
        if type(ts) is not str:
            return "timestamp missing or not a string"
        ts = canonical_ts(ts)
        if ts is None:
            return "timestamp is not an ISO 8601 date-time"
        if (self.since and ts < self.since) or (self.until and ts >= self.until):
            return None     # outside the window: not inspected further (as on the fast path)
        for name in CHECKED_FIELDS:
            if not _json_type_ok(name, rec.get(name)):
                return f"{name} is not {'an integer' if name == 'status' else 'a string'} or null"
        values = []
        for name in self.key_fields:
            if name == "day":
                values.append(ts[:10])
            elif name == "hour":
                values.append(ts[:13] + ":00Z")
            else:
                values.append(rec.get(name))
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

    def _bad(self, label: str, lineno: int, reason: str, count: bool = True) -> None:
        if count:
            self.bad_count += 1
        if len(self.bad_samples) < MAX_BAD_SAMPLES:
            self.bad_samples.append((label, lineno, reason))


def _learn(line: bytes) -> Layout | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return detect_layout(tuple(rec), line) if type(rec) is dict else None


def _file_id(f: BinaryIO) -> tuple[int, int]:
    st = os.fstat(f.fileno())
    return st.st_dev, st.st_ino


# ---------------------------------------------------------------- parallel ranges

PARALLEL_MIN_BYTES = 64 << 20     # below this, starting processes costs more than it saves
RANGE_BYTES = 32 << 20           # the smallest range given to a worker


@dataclass(frozen=True)
class _Source:
    path: Path
    label: str
    file_id: tuple[int, int]
    size: int           # read up to here: records appended during the report are left out


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _mp_context() -> multiprocessing.context.BaseContext:
    # fork is cheap and safe in a process with one thread (the CLI); otherwise spawn.
    if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _split(f: BinaryIO, size: int, step: int) -> list[tuple[int, int]]:
    """[start, end) byte ranges of about `step` bytes that begin and end at line starts."""
    bounds = [0]
    at = step
    while at < size:
        f.seek(at)
        f.readline(MAX_LINE_BYTES)
        at = f.tell()
        if at >= size:
            break
        bounds.append(at)
        at += step
    bounds.append(size)
    return list(zip(bounds, bounds[1:]))


class _Bounded:
    """A binary file seen from `start` for `length` bytes."""

    def __init__(self, f: BinaryIO, start: int, length: int) -> None:
        f.seek(start)
        self.f = f
        self.left = length

    def read(self, size: int) -> bytes:
        data = self.f.read(min(size, self.left)) if self.left > 0 else b""
        self.left -= len(data)
        return data

    def readline(self, limit: int) -> bytes:
        data = self.f.readline(min(limit, self.left)) if self.left > 0 else b""
        self.left -= len(data)
        return data


def _scan_part(f: BinaryIO, start: int, end: int, by: tuple[str, ...], since: str | None,
               until: str | None) -> tuple:
    scanner = Scanner(by, since, until)
    lines = scanner.scan_stream(_Bounded(f, start, end - start), "")   # type: ignore[arg-type]
    return (scanner.sums, scanner.bad_count, scanner.bad_samples, lines, scanner.fast_chunks,
            scanner.slow_chunks)


def _scan_range(path: str, file_id: tuple[int, int], start: int, end: int, by: tuple[str, ...],
                since: str | None, until: str | None) -> tuple | str:
    """Worker: the sums of one range; "moved" if the path is another file now, "gone" if none."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return "gone"
    with f:
        if _file_id(f) != file_id:
            return "moved"
        return _scan_part(f, start, end, by, since, until)
