"""The spool: nginx's access-log lines, one per call, read back by the sidecar.

nginx appends one JSON line per call (lmgate/records.py reads it) to
`<spool_dir>/calls-<slot>.jsonl`, where the slot is the second the call ended in, so nginx moves
to a new file every second without being told. The sidecar reads every file from
where it left off, hands each complete line to `on_line`, and after each flush of the stats file
saves how far it got (`.checkpoint.json`) and deletes the files it has finished. Lines are only
deleted once their records are on disk, so a sidecar that stops, crashes or falls behind loses
nothing: it resumes from the checkpoint. The checkpoint also marks how long the stats file was:
a sidecar killed between a flush and its checkpoint finds that flush's records past the mark at
its next start, and skips their lines instead of recording them twice (lmgate/pipeline.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("lmgate.spool")

SPOOL_PREFIX = "calls-"
SPOOL_SUFFIX = ".jsonl"
SLOT_SECONDS = 1    # nginx.conf.template's $lmgate_spool_slot: $msec without its fraction
# nginx closes a slot's file this long after its last line (nginx.conf.template's
# open_log_file_cache), before the sidecar deletes it.
NGINX_CLOSE_SECONDS = 1
# A slot's file is finished this long after the slot began: after nginx has closed it, and soon
# enough that it is deleted before the kernel writes it to disk (docs/performance-history.md,
# "Notes moved from code comments").
DONE_AFTER_SECONDS = SLOT_SECONDS + NGINX_CLOSE_SECONDS + 2
CHECKPOINT_NAME = ".checkpoint.json"
# Written by `lmgate nginx` / `lmgate up` once nginx has exited (removed when it starts): every
# spool line is written then. A pod's sidecar waits for it before it stops (deploy/kubernetes).
NGINX_STOPPED_NAME = ".nginx-stopped"
STATS_MARK = "stats"  # the checkpoint's entry for the stats file; never a spool file's name
# Bytes asked of each read: below glibc's 128 KiB mmap threshold, as every read allocates the
# whole size (docs/performance-history.md, "Notes moved from code comments").
READ_BYTES = 1 << 16


@dataclass
class _File:
    path: Path
    inode: int
    offset: int          # bytes already handed on (complete lines only)
    handle: object = None
    data: bytes = b""    # read but not yet handed on: the bytes from `offset` on
    skipping: bool = False  # inside a line over max_line, dropped up to its newline


def slot_of(name: str) -> int | None:
    """The slot start (Unix seconds) of a spool file name, or None for other files."""
    if not (name.startswith(SPOOL_PREFIX) and name.endswith(SPOOL_SUFFIX)):
        return None
    digits = name[len(SPOOL_PREFIX):-len(SPOOL_SUFFIX)]
    return int(digits) if digits.isdigit() else None


class SpoolReader:
    """Reads the spool folder in order of slot; not thread-safe, driven by the sidecar's loop."""

    def __init__(self, folder: Path, on_line: Callable[[bytes], None], max_line: int) -> None:
        self.folder = folder
        self.on_line = on_line      # raises for a line it cannot take; that line is skipped
        self.max_line = max_line
        self.files: dict[str, _File] = {}
        self.lines = 0
        self.bad_lines = 0
        self.last_error: str | None = None
        self._saved: dict[str, list[int]] = {}
        self.stats_mark: tuple[int, int] | None = None
        self._resume = self._load_checkpoint()

    # ------------------------------------------------------------------ reading

    def read(self, max_lines: int) -> int:
        """Hand on up to `max_lines` complete lines; return how many were handed on."""
        done = 0
        for name in self._names():
            f = self.files.get(name) or self._open(name)
            if f is None:
                continue
            done += self._read_file(f, max_lines - done)
            if done >= max_lines:
                break
        return done

    def _names(self) -> list[str]:
        try:
            names = [n for n in os.listdir(self.folder) if slot_of(n) is not None]
        except OSError as exc:
            self._error(f"cannot read the spool folder {self.folder}: {exc.strerror or exc}")
            return []
        self._clear_error_about("cannot read the spool folder")
        return sorted(names, key=lambda n: slot_of(n) or 0)

    def _open(self, name: str) -> _File | None:
        path = self.folder / name
        try:
            handle = open(path, "rb", buffering=0)  # noqa: SIM115 - kept open while the file is read
        except OSError as exc:
            self._error(f"cannot open {path}: {exc.strerror or exc}")
            return None
        info = os.fstat(handle.fileno())
        resume = self._resume.pop(name, None)
        offset = resume[1] if resume and resume[0] == info.st_ino else 0
        if not 0 <= offset <= info.st_size:
            log.error("spool: the checkpoint's offset %d for %s is outside the file (%d bytes); "
                      "reading it from its start", offset, name, info.st_size)
            offset = 0
        handle.seek(offset)
        f = self.files[name] = _File(path, info.st_ino, offset, handle)
        return f

    def _read_file(self, f: _File, max_lines: int) -> int:
        done = 0
        data, pos = f.data, 0
        while done < max_lines:
            end = data.find(b"\n", pos)
            if end < 0:
                if not f.skipping and len(data) - pos > self.max_line:
                    self._long_line(f)
                    f.skipping = True
                if f.skipping:  # drop what has come of the long line, keeping count of its bytes
                    f.offset += len(data) - pos
                    data, pos = b"", 0
                chunk = f.handle.read(READ_BYTES)
                if not chunk:
                    break
                data, pos = data[pos:] + chunk, 0
                continue
            if f.skipping:
                f.skipping = False  # the end of a long line
            elif end - pos > self.max_line:
                self._long_line(f)
            elif end > pos:
                self.lines += 1
                try:
                    self.on_line(data[pos:end])
                except Exception as exc:  # one bad line must not stop the others
                    self.bad_lines += 1
                    log.error("spool: cannot read the line at byte %d of %s: %s", f.offset, f.path.name,
                              str(exc)[:200])
            f.offset += end + 1 - pos
            pos = end + 1
            done += 1
        f.data = data[pos:]
        return done

    def _long_line(self, f: _File) -> None:
        """A line longer than any nginx writes (not nginx's, or torn): skipped, counted once."""
        self.bad_lines += 1
        log.error("spool: skipped a line of over %d bytes at byte %d of %s", self.max_line, f.offset,
                  f.path.name)

    @property
    def backlog_bytes(self) -> int:
        """Bytes in the spool not yet handed on (an estimate: files are still growing)."""
        total = 0
        for name in self._names():
            try:
                size = (self.folder / name).stat().st_size
            except OSError:
                continue
            f = self.files.get(name)
            total += size - (f.offset if f else self._resume.get(name, [0, 0])[1])
        return max(total, 0)

    # ------------------------------------------------------- checkpoint, cleanup

    def commit(self, now: float | None = None, stats_mark: tuple[int, int] | None = None) -> None:
        """Everything handed on so far is on disk: save the checkpoint, delete finished files.

        `stats_mark` ((inode, size) of the stats file after the flush) goes into the checkpoint:
        records past it, found at the next start, were written after the last checkpoint.
        """
        now = time.time() if now is None else now
        if stats_mark is not None:
            self.stats_mark = stats_mark
        for name, f in list(self.files.items()):
            slot = slot_of(name) or 0
            # Done: its second is over, it is read to its end, and nothing is left unhanded but
            # a torn last line (nginx died in the middle of a write).
            if (slot + DONE_AFTER_SECONDS <= now and b"\n" not in f.data
                    and f.offset + len(f.data) >= self._size(f)):
                if f.data:
                    self.bad_lines += 1
                    log.error("spool: %s ends in an incomplete line (%d bytes at offset %d); skipped",
                              f.path.name, len(f.data), f.offset)
                self._delete(name, f)
        for name in [n for n in self._resume if not (self.folder / n).exists()]:
            del self._resume[name]
        state = {name: [f.inode, f.offset] for name, f in self.files.items()}
        state.update({name: value for name, value in self._resume.items() if name not in state})
        if self.stats_mark is not None:
            state[STATS_MARK] = list(self.stats_mark)
        if state != self._saved:
            self._save_checkpoint(state)

    def _size(self, f: _File) -> int:
        try:
            return os.fstat(f.handle.fileno()).st_size
        except OSError:
            return 0

    def _delete(self, name: str, f: _File) -> None:
        f.handle.close()
        del self.files[name]
        try:
            os.unlink(f.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._error(f"cannot delete {f.path}: {exc.strerror or exc}")

    def _load_checkpoint(self) -> dict[str, list[int]]:
        path = self.folder / CHECKPOINT_NAME
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # Reading every file from its start again could double records: say so loudly.
            log.error("spool: ignoring unreadable checkpoint %s (%s): files are read from their start",
                      path, exc)
            return {}
        if not isinstance(state, dict):
            log.error("spool: ignoring checkpoint %s: not a JSON object", path)
            return {}
        good = {k: v for k, v in state.items()
                if isinstance(v, list) and len(v) == 2 and all(type(x) is int for x in v)}
        self._saved = dict(good)
        mark = good.pop(STATS_MARK, None)
        self.stats_mark = (mark[0], mark[1]) if mark else None
        return good

    def _save_checkpoint(self, state: dict[str, list[int]]) -> None:
        path = self.folder / CHECKPOINT_NAME
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(state, separators=(",", ":")))
            os.replace(tmp, path)
        except OSError as exc:
            self._error(f"cannot save the checkpoint {path}: {exc.strerror or exc}")
            return
        self._saved = state
        self._clear_error_about("cannot save the checkpoint")

    def close(self) -> None:
        for f in self.files.values():
            f.handle.close()
        self.files.clear()

    # ------------------------------------------------------------------ errors

    def _error(self, message: str) -> None:
        if message != self.last_error:
            log.error("spool: %s", message)
        self.last_error = message

    def _clear_error_about(self, prefix: str) -> None:
        if self.last_error and self.last_error.startswith(prefix):
            log.info("spool: recovered (%s)", self.last_error)
            self.last_error = None
