"""The CSV allow-list: parsing, lookup by key, and reload by polling the file.

Every key is held as the SHA-256 of the key, whether the file names the key itself or its
`sha256:<hex>` form, so a lookup is one hash and one dict probe and no plain key is kept in memory.
"""

from __future__ import annotations

import asyncio
import codecs
import csv
import datetime as dt
import gc
import hashlib
import io
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from lmgate.providers import PROVIDERS

log = logging.getLogger("lmgate.allowlist")

REQUIRED_COLUMNS = ("id", "api_key", "owner", "added")
SETTLE_NS = 300_000_000  # a file changed less than this long ago may still be being written
# Seconds a thread may hold the GIL while another waits for it, during a parse (Python: 0.005).
PARSE_SWITCH_INTERVAL = 0.0005
# The file is decoded this much at a time, and its entries held in this many tables (AllowList):
# each step then holds the GIL briefly, and /auth keeps answering during a big reload.
PIECE_BYTES = 256 * 1024
SHARDS = 256  # one per value of a key digest's first byte, which picks the table
SHA256_FORM = re.compile(r"sha256:([0-9a-fA-F]{64})")


class AllowListError(Exception):
    """The allow-list cannot be used; the message is one line naming the file and line."""


# Per-key policy columns (all optional; an empty cell is no limit). The limit columns are also
# those of the owners file (auth.owners_path), whose limits apply to the sum of an owner's keys.
LIMIT_COLUMNS = ("rpm", "tpm", "budget_usd_day", "budget_usd_month", "budget_tokens_month")
POLICY_COLUMNS = ("expires", "disabled", "providers", "models", *LIMIT_COLUMNS)
# A models pattern: printable ASCII, no white space; `*` and `?` are its only wildcards (fnmatch's
# `[...]` is refused: nginx matches the same patterns in njs, and these two translate exactly).
_MODEL_PATTERN = re.compile(r"[!-Z\\^-z|~]+")


@dataclass(frozen=True, slots=True)
class Limits:
    """Counted limits of a key or an owner; None = no limit."""
    rpm: int | None = None
    tpm: int | None = None
    budget_usd_day: float | None = None
    budget_usd_month: float | None = None
    budget_tokens_month: int | None = None

    @property
    def counted(self) -> bool:
        """Whether the records must be counted for it (tokens or spend)."""
        return (self.tpm is not None or self.budget_usd_day is not None
                or self.budget_usd_month is not None or self.budget_tokens_month is not None)


@dataclass(frozen=True, slots=True)
class Policy:
    expires: float | None = None          # Unix time from which the key is refused
    disabled: bool = False
    providers: frozenset[str] | None = None
    models: tuple[str, ...] | None = None  # fnmatch patterns (case-sensitive)
    limits: Limits | None = None
    models_regex: str | None = None  # the patterns as one regular expression (models_regex())


def models_regex(patterns: tuple[str, ...]) -> str:
    """fnmatch patterns (`*`, `?` and literal characters) as one regular expression that means the
    same in Python's re and in JavaScript (njs checks request bodies with it)."""
    def one(pattern: str) -> str:
        return "".join("[\\s\\S]*" if c == "*" else "[\\s\\S]" if c == "?"
                       else c if c.isascii() and c.isalnum() else "\\" + c for c in pattern)
    return "^(?:" + "|".join(one(p) for p in patterns) + ")$"


@dataclass(frozen=True, slots=True)
class Entry:
    id: str
    owner: str
    line: int
    policy: Policy | None = None  # None: no policy column set (the fast path)


class AllowList:
    """An immutable, fully parsed allow-list. Replace it whole; never mutate it.

    Entries sit in SHARDS tables picked by the digest's first byte rather than in one dict: a
    table of a million entries is grown, and freed, in one step that holds the GIL for ~0.1 s,
    stalling /auth during a reload; a shard's steps are 1/256 of that.
    """

    def __init__(self, shards: list[dict[bytes, Entry]], source: str,
                 with_policy: list[Entry] | None = None) -> None:
        self._shards = shards
        self._size = sum(len(shard) for shard in shards)
        self.source = source
        # The entries that have a policy (usually few), and the owners file's limits.
        self.with_policy: list[Entry] = with_policy or []
        self.owners: dict[str, Limits] = {}

    def __len__(self) -> int:
        return self._size

    def lookup(self, key: str) -> Entry | None:
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        return self._shards[digest[0]].get(digest)

    def entries(self) -> Iterator[Entry]:
        for shard in self._shards:
            yield from shard.values()

    def release(self) -> None:
        """Free the entries a shard at a time (in a worker thread: see AllowListHolder)."""
        while self._shards:
            self._shards.pop()


def _lines(data: bytes, source: str) -> Iterator[str]:
    """The file's lines, decoded PIECE_BYTES at a time (each step holds the GIL; decoding 70 MB at
    once held it for ~0.3 s). A piece ends after a newline byte, which is never inside a UTF-8
    sequence, so pieces decode on their own; lines end at LF, CR or CRLF, as csv expects."""
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    while start < len(data):
        end = data.find(b"\n", start + PIECE_BYTES)
        end = len(data) if end < 0 else end + 1
        piece = data[start:end]
        try:
            text = piece.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, start + exc.start) + 1
            raise AllowListError(f"{source}:{line}: not UTF-8 text") from None
        if "\x00" in text:
            line = data.count(b"\n", 0, start + piece.index(b"\x00")) + 1
            raise AllowListError(f"{source}:{line}: contains a NUL byte (binary file?)")
        yield from io.StringIO(text, newline="")
        start = end


def _positive_int(cell: str) -> int:
    if not (cell.isascii() and cell.isdigit()):
        raise ValueError("must be a whole number >= 0")
    return int(cell)


def _usd(cell: str) -> float:
    try:
        value = Decimal(cell)
    except InvalidOperation:
        raise ValueError("must be an amount in USD, e.g. 12.50") from None
    if not value.is_finite() or value < 0:
        raise ValueError("must be an amount in USD >= 0")
    return float(value)


def _expires(cell: str) -> float:
    try:
        if len(cell) == 10:
            when = dt.datetime.combine(dt.date.fromisoformat(cell), dt.time())
        else:
            when = dt.datetime.fromisoformat(cell)
    except ValueError:
        raise ValueError("must be a date (2026-12-31) or a date-time (2026-12-31T18:00:00Z), UTC") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def _disabled(cell: str) -> bool:
    lowered = cell.lower()
    if lowered not in ("true", "false"):
        raise ValueError("must be true or false")
    return lowered == "true"


def _providers(cell: str) -> frozenset[str]:
    names = [name.strip() for name in cell.split("|")]
    for name in names:
        if name not in PROVIDERS:
            raise ValueError(f"unknown provider {name!r} (known: {'|'.join(PROVIDERS)})")
    return frozenset(names)


# The patterns reach nginx in a header of the /auth answer, which must fit its buffer (4 KiB).
MAX_MODELS_CELL = 1000
MAX_MODELS_REGEX = 2500


def _models(cell: str) -> tuple[str, ...]:
    patterns = tuple(p.strip() for p in cell.split("|"))
    for pattern in patterns:
        if not _MODEL_PATTERN.fullmatch(pattern):
            raise ValueError(f"pattern {pattern!r} must be printable ASCII without spaces or [ ], "
                             f"with * and ? as wildcards, e.g. gpt-4o-mini*")
    if len(cell) > MAX_MODELS_CELL or len(models_regex(patterns)) > MAX_MODELS_REGEX:
        raise ValueError(f"is too long (at most {MAX_MODELS_CELL} characters, fewer with many wildcards): "
                         f"use fewer, wider patterns")
    return patterns


_PARSERS = {"expires": _expires, "disabled": _disabled, "providers": _providers, "models": _models,
            "rpm": _positive_int, "tpm": _positive_int, "budget_usd_day": _usd,
            "budget_usd_month": _usd, "budget_tokens_month": _positive_int}


def _cells(row: list[str], columns: dict[str, int], source: str, line: int) -> dict[str, object]:
    """The policy cells of a row that are set, parsed; a bad one raises naming line and column."""
    parsed = {}
    for column, index in columns.items():
        cell = row[index].strip()
        if not cell:
            continue
        try:
            parsed[column] = _PARSERS[column](cell)
        except ValueError as exc:
            raise AllowListError(f"{source}:{line}: column {column}: {cell!r} {exc}") from None
    return parsed


def _limits(parsed: dict[str, object]) -> Limits | None:
    values = {c: parsed[c] for c in LIMIT_COLUMNS if c in parsed}
    return Limits(**values) if values else None


def _policy(parsed: dict[str, object]) -> Policy | None:
    if not parsed or parsed == {"disabled": False}:
        return None
    models = parsed.get("models")
    return Policy(expires=parsed.get("expires"), disabled=bool(parsed.get("disabled", False)),
                  providers=parsed.get("providers"), models=models, limits=_limits(parsed),
                  models_regex=models_regex(models) if models else None)


def csv_rows(data: bytes, source: str, check_header: Callable[[list[str], int], None],
          expected: str) -> Iterator[tuple[int, list[str], list[str]]]:
    """(line, header, row) for each row of a CSV file after its header (lower-cased, checked by
    `check_header`), blank rows skipped. A short row, malformed CSV or a file without a header is
    an AllowListError naming the line; `expected` says what header was expected."""
    reader = csv.reader(_lines(data, source), strict=True)
    header: list[str] | None = None
    try:
        row_start = 1
        for row in reader:
            line, row_start = row_start, reader.line_num + 1
            if not row or all(not cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip().lower() for cell in row]
                check_header(header, line)
                continue
            if len(row) < len(header):
                raise AllowListError(f"{source}:{line}: expected {len(header)} fields, found {len(row)}")
            yield line, header, row
    except csv.Error as exc:
        raise AllowListError(f"{source}:{reader.line_num}: malformed CSV: {exc}") from None
    if header is None:
        raise AllowListError(f"{source}:1: empty file (expected the header {expected})")


def parse_allowlist(data: bytes, source: str) -> AllowList:
    """Parse the CSV bytes; raise AllowListError naming `source` and the editor line number."""
    shards: list[dict[bytes, Entry]] = [{} for _ in range(SHARDS)]
    # The first line of each id, in shards too (by the id's hash), for the same reason.
    first_line_of_id: list[dict[str, int]] = [{} for _ in range(SHARDS)]
    columns: dict[str, int] = {}
    policy_columns: dict[str, int] = {}
    with_policy: list[Entry] = []

    def check_header(header: list[str], line: int) -> None:
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise AllowListError(f"{source}:{line}: header must name the columns {','.join(REQUIRED_COLUMNS)} "
                                 f"(missing: {', '.join(missing)})")
        columns.update({c: header.index(c) for c in REQUIRED_COLUMNS})
        policy_columns.update({c: header.index(c) for c in POLICY_COLUMNS if c in header})

    for line, _, row in csv_rows(data, source, check_header, ",".join(REQUIRED_COLUMNS)):
        values = {c: row[i].strip() for c, i in columns.items()}
        for column in REQUIRED_COLUMNS:
            if not values[column]:
                raise AllowListError(f"{source}:{line}: empty {column}")
        key = values["api_key"]
        if any(ch.isspace() for ch in key):
            raise AllowListError(f"{source}:{line}: api_key contains white space")
        match = SHA256_FORM.fullmatch(key)
        if match:
            digest = bytes.fromhex(match.group(1))
        elif key.lower().startswith("sha256:"):
            raise AllowListError(f"{source}:{line}: api_key sha256: form needs exactly 64 hex digits")
        else:
            digest = hashlib.sha256(key.encode("utf-8")).digest()
        id_lines = first_line_of_id[hash(values["id"]) % SHARDS]
        if values["id"] in id_lines:
            raise AllowListError(f"{source}:{line}: duplicate id {values['id']!r} "
                                 f"(first on line {id_lines[values['id']]})")
        shard = shards[digest[0]]
        if digest in shard:
            raise AllowListError(f"{source}:{line}: duplicate api_key "
                                 f"(same key as line {shard[digest].line})")
        id_lines[values["id"]] = line
        policy = _policy(_cells(row, policy_columns, source, line)) if policy_columns else None
        shard[digest] = entry = Entry(id=values["id"], owner=values["owner"], line=line, policy=policy)
        if policy is not None:
            with_policy.append(entry)
    while first_line_of_id:  # freed a shard at a time, as AllowList.release does
        first_line_of_id.pop()
    return AllowList(shards, source, with_policy)


def parse_owners(data: bytes, source: str) -> dict[str, Limits]:
    """The owners file (auth.owners_path): header `owner,` and any of LIMIT_COLUMNS; the limits
    of an owner apply to the sum over all of that owner's keys."""
    owners: dict[str, Limits] = {}
    lines: dict[str, int] = {}
    columns: dict[str, int] = {}

    def check_header(header: list[str], line: int) -> None:
        if "owner" not in header:
            raise AllowListError(f"{source}:{line}: header must name the column owner and any of "
                                 f"{','.join(LIMIT_COLUMNS)}")
        columns.update({c: header.index(c) for c in LIMIT_COLUMNS if c in header})

    for line, header, row in csv_rows(data, source, check_header, f"owner,{','.join(LIMIT_COLUMNS)}"):
        owner = row[header.index("owner")].strip()
        if not owner:
            raise AllowListError(f"{source}:{line}: empty owner")
        if owner in lines:
            raise AllowListError(f"{source}:{line}: duplicate owner {owner!r} (first on line {lines[owner]})")
        lines[owner] = line
        limits = _limits(_cells(row, columns, source, line))
        if limits is not None:
            owners[owner] = limits
    return owners


def read_file(path: Path, what: str) -> bytes:
    """The file's bytes; an AllowListError naming it (`what`: "allow-list", ...) if it cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise AllowListError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise AllowListError(f"{path}: cannot read {what}: {exc.strerror}") from None


def load_owners(path: Path) -> dict[str, Limits]:
    return parse_owners(read_file(path, "owners file (auth.owners_path)"), str(path))


def load_allowlist(path: Path) -> AllowList:
    return parse_allowlist(read_file(path, "allow-list"), str(path))


def load_outside_gc(path: Path) -> AllowList:
    """load_allowlist(), its objects kept out of the cycle collector's scans.

    A million rows are millions of objects, and every scan of them holds the GIL: while the list
    is built (calls over 0.1 s during a 1M-row reload: 8-12 with the collector on, 2 without),
    and at each later full collection (797 ms for a list of a million, stalling /auth). They hold
    no reference cycles: build them with the collector paused and, once built, set everything
    there is aside from its scans for good. Garbage set aside would never be freed: collected
    first (cheap: the list in force is already set aside).
    """
    gc.collect()
    gc.disable()
    try:
        fresh = load_allowlist(path)
        gc.freeze()
        return fresh
    finally:
        gc.enable()


def _signature(path: Path) -> tuple[int, int, int, int] | None:
    # mtime_ns, size and inode together also catch a file replaced within the same mtime second.
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


class AllowListHolder:
    """Holds the current allow-list and reloads it when the file changes (parse a copy, then swap)."""

    def __init__(self, path: Path, poll_interval: float, owners_path: Path | None = None) -> None:
        self.path = path
        self.owners_path = owners_path
        self.poll_interval = poll_interval
        self._signature = self._signatures()
        self.current = self._load()
        self.last_error: str | None = None
        self.loaded_at = time.time()  # when the list in force was read (/readyz, lmgate doctor)
        self.pending = False
        # For /metrics: lists put in force after the first, and reloads refused.
        self.reloads = 0
        self.reload_errors = 0

    def _signatures(self) -> tuple:
        return (_signature(self.path), _signature(self.owners_path) if self.owners_path else None)

    def _load(self) -> AllowList:
        fresh = load_outside_gc(self.path)
        if self.owners_path is not None:
            fresh.owners = load_owners(self.owners_path)
        return fresh

    def _changed(self) -> bool:
        """Whether a file changed and has settled; marks it as seen."""
        signature = self._signatures()
        if signature == self._signature:
            return False
        if any(s is not None and 0 <= time.time_ns() - s[0] < SETTLE_NS for s in signature):
            # Still being written (truncate-then-write): read it once it has settled, so no
            # request ever sees a half-written list.
            self.pending = True
            return False
        self.pending = False
        self._signature = signature
        return True

    def check(self) -> bool:
        """Reload if the file changed; return True if a new list is now in force."""
        return self._changed() and self._apply(self._parse())

    async def check_async(self) -> bool:
        """check(), with the parsing in a thread: a huge list must not stall /auth meanwhile."""
        if not self._changed():
            return False
        # A short GIL switch interval, so the event loop's syscalls do not each wait up to 5 ms
        # for the parsing thread (docs/performance-history.md, "Notes moved from code comments").
        interval = sys.getswitchinterval()
        sys.setswitchinterval(PARSE_SWITCH_INTERVAL)
        try:
            fresh = await asyncio.to_thread(self._parse)
            old = self.current
            if not self._apply(fresh):
                return False
            # Freed here, the old list's last reference would free every entry in one step of
            # the event loop (~0.1 s for a million): a thread frees it a shard at a time.
            await asyncio.to_thread(old.release)
            return True
        finally:
            sys.setswitchinterval(interval)

    def _parse(self) -> AllowList | AllowListError:
        try:
            return self._load()
        except AllowListError as exc:
            return exc

    def _apply(self, fresh: AllowList | AllowListError) -> bool:
        if isinstance(fresh, AllowListError):
            if str(fresh) != self.last_error:
                log.error("allow-list not reloaded, previous list (%d keys) stays in force: %s",
                          len(self.current), fresh)
            self.last_error = str(fresh)
            self.reload_errors += 1
            return False
        # A write seen half-way (truncate-then-write) changes the signature again when it ends,
        # so the next poll parses the finished file.
        self.current, self.last_error, self.loaded_at = fresh, None, time.time()
        self.reloads += 1
        log.info("allow-list reloaded from %s: %d keys", self.path, len(fresh))
        return True

    async def poll_forever(self) -> None:
        while True:
            await asyncio.sleep(SETTLE_NS / 1e9 if self.pending else self.poll_interval)
            try:
                await self.check_async()
            except Exception:  # never let the poller die: the gate keeps the last good list
                log.exception("allow-list poll failed")
