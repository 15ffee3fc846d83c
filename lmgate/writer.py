"""Buffered, size-rotated JSON Lines writer for usage records.

Records are appended to an in-memory buffer and written every `flush_interval` seconds (and on
shutdown). If the disk write fails (permissions, disk full) the records stay buffered, the error is
logged once per interval, and the next flush tries again: writing resumes by itself. Past
`rotate_bytes` the file is renamed to `<stem>.<UTC timestamp><suffix>` (never overwriting) first.

With the path `-` (STDOUT) each flush writes its batch to standard output instead, one record per
line and nothing else there, for a log shipper (Kubernetes): no rotation, no mark, and a batch is
committed once written (a flush cut short keeps exactly the bytes not yet written).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("lmgate.stats")

# Bound on records held while the disk refuses writes; past it the oldest are dropped and counted.
MAX_BUFFERED_RECORDS = 1_000_000
# Buffered bytes past which a flush is due before its interval: under load, records reach the disk
# in pieces of this size, as one big write stalled nginx (docs/performance-history.md).
FLUSH_BYTES = 1 << 20
# stats.output_path that means standard output.
STDOUT = Path("-")


def rotated_name(path: Path, when: float | None = None) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if when is None else when))
    candidate = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
    counter = 0
    while candidate.exists():
        counter += 1
        candidate = path.with_name(f"{path.stem}.{stamp}-{counter}{path.suffix}")
    return candidate


class StatsWriter:
    def __init__(self, path: Path, rotate_bytes: int, flush_interval: float) -> None:
        self.path = path
        self.to_stdout = path == STDOUT
        self.rotate_bytes = rotate_bytes
        self.flush_interval = flush_interval
        self._lines: list[bytes] = []
        self._bytes = 0  # in _lines
        self.written = 0
        self.dropped = 0
        self.last_error: str | None = None
        self._last_error_logged = 0.0
        # Called after each flush that left nothing buffered: everything added is on disk.
        self.on_flushed: Callable[[], None] | None = None
        # For /metrics: flushes that wrote records, rotations, refused writes; and a hook that
        # sees every record added (lmgate/metrics.py).
        self.flushes = 0
        self.rotations = 0
        self.write_errors = 0
        self.on_add: Callable[[dict[str, Any]], None] | None = None

    def add(self, record: dict[str, Any]) -> None:
        try:
            # Not OPT_APPEND_NEWLINE: its result keeps orjson's 4 KiB buffer; the concatenation
            # makes a right-sized copy (docs/performance-history.md).
            line = orjson.dumps(record) + b"\n"
        except TypeError:
            # A lone surrogate (from a malformed body) becomes a \udXXX escape: still valid JSON.
            line = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode(
                "utf-8", "backslashreplace") + b"\n"
        self._lines.append(line)
        self._bytes += len(line)
        if self.on_add is not None:
            self.on_add(record)
        if len(self._lines) > MAX_BUFFERED_RECORDS:
            self._bytes -= len(self._lines.pop(0))
            self.dropped += 1

    @property
    def buffered(self) -> int:
        return len(self._lines)

    @property
    def flush_due(self) -> bool:
        """FLUSH_BYTES are buffered, and the disk took the last flush (a disk that refuses writes
        is tried again each interval, not at each record)."""
        return self._bytes >= FLUSH_BYTES and self.last_error is None

    def flush(self) -> bool:
        """Write everything buffered; return False (and keep the records) if the disk refused."""
        if not self._lines:
            self._flushed()
            return True
        data = b"".join(self._lines)
        if self.to_stdout:
            return self._flush_stdout(data)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._rotate_if_needed(len(data))
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                start = os.fstat(fd).st_size
                try:
                    written = 0
                    while written < len(data):
                        written += os.write(fd, data[written:])
                except OSError:
                    # Undo a partial batch so the retry neither tears a line nor doubles records.
                    os.ftruncate(fd, start)
                    raise
            finally:
                os.close(fd)
        except OSError as exc:
            self.write_errors += 1
            self._log_error(f"cannot write stats to {self.path}: {exc.strerror or exc}")
            return False
        self.flushes += 1
        self.written += len(self._lines)
        self._lines, self._bytes = [], 0
        if self.last_error:
            log.info("stats writing resumed: %s", self.path)
            self.last_error = None
        self._flushed()
        return True

    def _flush_stdout(self, data: bytes) -> bool:
        written = 0
        try:
            while written < len(data):
                written += os.write(1, data[written:])
        except OSError as exc:
            # What went out stays out: keep only the rest, so the retry neither doubles nor tears.
            self._drop_written(written)
            self._log_error(f"cannot write stats to standard output: {exc.strerror or exc}")
            return False
        self.written += len(self._lines)
        self._lines, self._bytes = [], 0
        if self.last_error:
            log.info("stats writing resumed: standard output")
            self.last_error = None
        self._flushed()
        return True

    def _drop_written(self, written: int) -> None:
        done = 0
        while self._lines and written >= len(self._lines[0]):
            written -= len(self._lines[0])
            self._bytes -= len(self._lines.pop(0))
            done += 1
        if written:
            self._lines[0] = self._lines[0][written:]
            self._bytes -= written
        self.written += done

    def mark(self) -> tuple[int, int] | None:
        """(inode, size) of the stats file, None before it exists (and for standard output)."""
        if self.to_stdout:
            return None
        try:
            info = self.path.stat()
        except OSError:
            return None
        return info.st_ino, info.st_size

    def _flushed(self) -> None:
        if self.on_flushed is not None:
            self.on_flushed()

    def _rotate_if_needed(self, incoming: int) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size and size + incoming > self.rotate_bytes:
            target = rotated_name(self.path)
            os.rename(self.path, target)
            self.rotations += 1
            log.info("stats rotated to %s", target)

    def _log_error(self, message: str) -> None:
        now = time.monotonic()
        if message != self.last_error or now - self._last_error_logged >= self.flush_interval:
            log.error("%s (%d records kept in memory, retrying every %gs)", message,
                      len(self._lines), self.flush_interval)
            self._last_error_logged = now
        self.last_error = message

    async def flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            try:
                self.flush()
            except Exception:  # the flusher must outlive any surprise
                log.exception("stats flush failed")


def request_ids_after(path: Path, mark: tuple[int, int] | None) -> set[str]:
    """The request ids of the records written to `path` after `mark` ((inode, size) of the file
    at some earlier moment), including a rotation in between: the rotated file (found by its
    inode) from the mark on, and then the whole current file."""
    if mark is None or path == STDOUT:
        return set()
    inode, size = mark
    try:
        current = path.stat()
    except FileNotFoundError:
        current = None
    if current is not None and current.st_ino == inode:
        parts = [(path, size)]
    else:
        rotated = [p for p in path.parent.glob(f"{path.stem}.*{path.suffix}") if p.stat().st_ino == inode]
        if not rotated:  # the file was replaced or removed by hand: nothing to compare with
            return set()
        parts = [(rotated[0], size)]
        if current is not None:
            parts.append((path, 0))
    ids = set()
    for file, start in parts:
        with open(file, "rb") as f:
            f.seek(start)
            for line in f:
                try:
                    ids.add(orjson.loads(line)["request_id"])
                except (ValueError, KeyError, TypeError):
                    continue
    ids.discard(None)
    return ids
