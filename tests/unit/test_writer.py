"""lmgate.writer: buffered JSON Lines, rotation that never overwrites, and riding out disk failures."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
import time
import types
from pathlib import Path

import pytest

import lmgate.writer as writer_mod
from lmgate.writer import StatsWriter, rotated_name
from tests.support.wait import wait_until_async

pytestmark = pytest.mark.unit

ROTATED = re.compile(r"stats\.(\d{8}T\d{6}Z)(-\d+)?\.jsonl")


def rec(i: int, **extra) -> dict:
    return {"request_id": f"r{i:05d}", "owner": "Zoë", "input_tokens": i, **extra}


def lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "torn last line"
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def all_records(folder: Path) -> list[dict]:
    """Every record in the live and rotated files, oldest file first."""
    files = sorted(folder.glob("stats.*.jsonl"), key=lambda p: p.stat().st_mtime_ns)
    if (folder / "stats.jsonl").exists():
        files.append(folder / "stats.jsonl")
    out = []
    for f in files:
        out.extend(lines(f))
    return out


class FakeOS:
    """Stands in for the `os` module inside lmgate.writer; os.write misbehaves on demand."""

    def __init__(self) -> None:
        self.fail: OSError | None = None
        self.partial_bytes: int | None = None   # write this many bytes, then raise `fail`
        self.write_calls = 0

    def __getattr__(self, name):
        return getattr(os, name)

    def write(self, fd, data):
        self.write_calls += 1
        if self.fail is None:
            return os.write(fd, data)
        if self.partial_bytes:
            os.write(fd, bytes(data[: self.partial_bytes]))
        raise self.fail


@pytest.fixture
def fake_os(monkeypatch) -> FakeOS:
    fake = FakeOS()
    monkeypatch.setattr(writer_mod, "os", fake)
    return fake


def freeze_clock(monkeypatch, wall: float, mono: list[float] | None = None) -> None:
    """Freeze lmgate.writer's view of time (wall clock for names, monotonic for log throttling)."""
    mono = mono if mono is not None else [1000.0]
    fake = types.SimpleNamespace(time=lambda: wall, gmtime=time.gmtime, strftime=time.strftime,
                                 monotonic=lambda: mono[0])
    monkeypatch.setattr(writer_mod, "time", fake)


# ---------------------------------------------------------------- buffering

def test_records_are_buffered_until_flush(tmp_path):
    path = tmp_path / "stats.jsonl"
    w = StatsWriter(path, rotate_bytes=10**9, flush_interval=10)
    for i in range(3):
        w.add(rec(i))
    assert w.buffered == 3
    assert not path.exists()
    assert w.flush() is True
    assert w.buffered == 0 and w.written == 3
    assert lines(path) == [rec(0), rec(1), rec(2)]


def test_a_flush_is_due_at_flush_bytes_and_not_again_while_the_disk_refuses(tmp_path, fake_os, monkeypatch):
    """Under load, records go to disk in pieces of FLUSH_BYTES before the interval is up; a disk
    that refuses them is tried again each interval, not at each record."""
    monkeypatch.setattr(writer_mod, "FLUSH_BYTES", 1000)
    path = tmp_path / "stats.jsonl"
    w = StatsWriter(path, 10**9, flush_interval=3600)
    while not w.flush_due:
        w.add(rec(w.buffered))
    assert w.flush() is True and not w.flush_due
    sizes = [len(line) + 1 for line in path.read_bytes().splitlines()]  # as written
    assert sum(sizes[:-1]) < 1000 <= sum(sizes)
    fake_os.fail = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    for i in range(len(sizes) + 1):
        w.add(rec(i))
    assert w.flush() is False
    assert w.buffered == len(sizes) + 1 and not w.flush_due
    fake_os.fail = None
    assert w.flush() is True and not w.flush_due
    assert len(lines(path)) == 2 * len(sizes) + 1


def test_flush_with_nothing_buffered(tmp_path):
    path = tmp_path / "stats.jsonl"
    w = StatsWriter(path, 10**9, 10)
    assert w.flush() is True
    assert not path.exists()


def test_flush_appends(tmp_path):
    path = tmp_path / "stats.jsonl"
    path.write_text('{"old":true}\n')
    w = StatsWriter(path, 10**9, 10)
    w.add(rec(1))
    w.flush()
    w.add(rec(2))
    w.add(rec(3))
    w.flush()
    assert lines(path) == [{"old": True}, rec(1), rec(2), rec(3)]
    assert w.written == 3


def test_lines_are_compact_utf8_json(tmp_path):
    path = tmp_path / "stats.jsonl"
    w = StatsWriter(path, 10**9, 10)
    w.add({"owner": "Zoë 😀", "note": "line\nbreak", "n": None})
    w.flush()
    raw = path.read_bytes()
    assert raw.count(b"\n") == 1
    assert "Zoë 😀".encode() in raw
    assert json.loads(raw) == {"owner": "Zoë 😀", "note": "line\nbreak", "n": None}


@pytest.mark.parametrize("value", ["gpt-\ud800", "\udcff tail"], ids=["high", "low"])
def test_lone_surrogate_is_escaped_and_the_next_records_follow(tmp_path, value):
    """A malformed body can leave a lone surrogate in a model name: still one strict JSON line."""
    path = tmp_path / "stats.jsonl"
    w = StatsWriter(path, 10**9, 10)
    w.add(rec(1, model=value))
    w.add(rec(2))
    assert w.flush() is True
    raw = path.read_bytes()
    raw.decode("utf-8")                                   # valid UTF-8 throughout
    assert lines(path) == [rec(1, model=value), rec(2)]


def test_integer_past_64_bits_is_written(tmp_path):
    path = tmp_path / "stats.jsonl"
    w = StatsWriter(path, 10**9, 10)
    w.add(rec(1, status=10**30))
    assert w.flush() is True
    assert lines(path) == [rec(1, status=10**30)]


def test_creates_missing_folder(tmp_path):
    path = tmp_path / "a" / "b" / "stats.jsonl"
    w = StatsWriter(path, 10**9, 10)
    w.add(rec(1))
    assert w.flush() is True
    assert lines(path) == [rec(1)]


def test_new_file_is_not_world_readable(tmp_path):
    path = tmp_path / "stats.jsonl"
    old = os.umask(0)
    try:
        w = StatsWriter(path, 10**9, 10)
        w.add(rec(1))
        w.flush()
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o007 == 0


# ---------------------------------------------------------------- rotation

def test_rotation_past_rotate_bytes(tmp_path):
    path = tmp_path / "stats.jsonl"
    one = len(json.dumps(rec(0), ensure_ascii=False, separators=(",", ":")).encode()) + 1
    w = StatsWriter(path, rotate_bytes=one * 3, flush_interval=10)
    for i in range(3):
        w.add(rec(i))
    w.flush()                                   # exactly rotate_bytes: no rotation yet
    assert list(tmp_path.iterdir()) == [path]
    w.add(rec(3))
    w.flush()                                   # would pass rotate_bytes: rotate first
    rotated = [p for p in tmp_path.iterdir() if p != path]
    assert len(rotated) == 1
    m = ROTATED.fullmatch(rotated[0].name)
    assert m, rotated[0].name
    stamp = time.strptime(m.group(1), "%Y%m%dT%H%M%SZ")
    assert abs(time.mktime(stamp) - time.mktime(time.gmtime())) < 120
    assert lines(rotated[0]) == [rec(0), rec(1), rec(2)]
    assert lines(path) == [rec(3)]
    assert path.stat().st_size <= one * 3


def test_oversized_single_batch_into_empty_file_is_written(tmp_path):
    path = tmp_path / "stats.jsonl"
    w = StatsWriter(path, rotate_bytes=10, flush_interval=10)
    for i in range(5):
        w.add(rec(i))
    assert w.flush() is True
    assert list(tmp_path.iterdir()) == [path]
    assert len(lines(path)) == 5


def test_two_rotations_in_the_same_second_never_overwrite(tmp_path, monkeypatch):
    freeze_clock(monkeypatch, wall=1_700_000_000.25)
    path = tmp_path / "stats.jsonl"
    w = StatsWriter(path, rotate_bytes=1, flush_interval=10)
    for i in range(4):
        w.add(rec(i))
        assert w.flush() is True
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["stats.20231114T221320Z-1.jsonl", "stats.20231114T221320Z-2.jsonl",
                     "stats.20231114T221320Z.jsonl", "stats.jsonl"]
    assert lines(tmp_path / "stats.20231114T221320Z.jsonl") == [rec(0)]
    assert lines(tmp_path / "stats.20231114T221320Z-1.jsonl") == [rec(1)]
    assert lines(tmp_path / "stats.20231114T221320Z-2.jsonl") == [rec(2)]
    assert lines(path) == [rec(3)]


def test_rotation_does_not_overwrite_an_existing_file(tmp_path, monkeypatch):
    freeze_clock(monkeypatch, wall=1_700_000_000.0)
    path = tmp_path / "stats.jsonl"
    keep = tmp_path / "stats.20231114T221320Z.jsonl"
    keep.write_text('{"precious":1}\n')
    path.write_text('{"old":1}\n')
    w = StatsWriter(path, rotate_bytes=5, flush_interval=10)
    w.add(rec(1))
    w.flush()
    assert lines(keep) == [{"precious": 1}]
    assert lines(tmp_path / "stats.20231114T221320Z-1.jsonl") == [{"old": 1}]
    assert lines(path) == [rec(1)]


def test_rotated_name():
    p = Path("/x/data/stats.jsonl")
    assert rotated_name(p, 0) == Path("/x/data/stats.19700101T000000Z.jsonl")
    assert rotated_name(Path("/x/log"), 86399.9) == Path("/x/log.19700101T235959Z")


def test_many_rotations_lose_nothing(tmp_path):
    path = tmp_path / "stats.jsonl"
    w = StatsWriter(path, rotate_bytes=300, flush_interval=10)
    for i in range(60):
        w.add(rec(i))
        if i % 3 == 0:
            assert w.flush()
    assert w.flush()
    got = all_records(tmp_path)
    assert sorted(r["request_id"] for r in got) == [f"r{i:05d}" for i in range(60)]
    for f in tmp_path.iterdir():
        assert f.name == "stats.jsonl" or ROTATED.fullmatch(f.name), f.name


# ---------------------------------------------------------------- disk failures

def test_parent_is_a_file_keeps_records_and_logs_once(tmp_path, caplog):
    blocker = tmp_path / "data"
    blocker.write_text("not a folder")
    path = blocker / "stats.jsonl"
    w = StatsWriter(path, 10**9, flush_interval=60)
    with caplog.at_level(logging.INFO, logger="lmgate.stats"):
        for i in range(5):
            w.add(rec(i))
            assert w.flush() is False
        assert w.buffered == 5 and w.written == 0
        assert w.last_error and str(path) in w.last_error
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, [r.getMessage() for r in errors]
        assert "kept in memory" in errors[0].getMessage()

        blocker.unlink()                      # the cause is gone
        w.add(rec(5))
        assert w.flush() is True
    assert w.buffered == 0 and w.written == 6 and w.last_error is None
    assert lines(path) == [rec(i) for i in range(6)]
    assert any("resumed" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert w.flush() is True
    assert lines(path) == [rec(i) for i in range(6)]   # nothing written twice


def test_error_is_logged_again_after_the_interval(tmp_path, caplog, monkeypatch):
    mono = [1000.0]
    freeze_clock(monkeypatch, wall=time.time(), mono=mono)
    blocker = tmp_path / "data"
    blocker.write_text("")
    w = StatsWriter(blocker / "stats.jsonl", 10**9, flush_interval=10)
    w.add(rec(1))
    with caplog.at_level(logging.ERROR, logger="lmgate.stats"):
        w.flush()
        mono[0] += 5
        w.flush()
        assert len(caplog.records) == 1
        mono[0] += 6
        w.flush()
        assert len(caplog.records) == 2


def test_disk_full_keeps_records_and_resumes(tmp_path, fake_os, caplog):
    path = tmp_path / "stats.jsonl"
    w = StatsWriter(path, 10**9, flush_interval=60)
    w.add(rec(0))
    assert w.flush() is True
    fake_os.fail = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with caplog.at_level(logging.ERROR, logger="lmgate.stats"):
        for i in range(1, 4):
            w.add(rec(i))
            assert w.flush() is False
    assert [r.levelno for r in caplog.records].count(logging.ERROR) == 1
    assert "No space left" in caplog.records[0].getMessage()
    assert w.buffered == 3
    assert lines(path) == [rec(0)]
    fake_os.fail = None
    assert w.flush() is True
    assert lines(path) == [rec(i) for i in range(4)]
    assert w.written == 4


@pytest.mark.parametrize("partial", [1, 17, 100])
def test_partial_write_leaves_no_torn_line_and_no_duplicate(tmp_path, fake_os, partial):
    path = tmp_path / "stats.jsonl"
    w = StatsWriter(path, 10**9, flush_interval=60)
    w.add(rec(0))
    w.flush()
    before = path.read_bytes()
    for i in range(1, 4):
        w.add(rec(i))
    fake_os.fail = OSError(errno.ENOSPC, "No space left on device")
    fake_os.partial_bytes = partial
    assert w.flush() is False
    assert fake_os.write_calls >= 1
    assert path.read_bytes() == before           # the half-written batch was taken back
    assert w.buffered == 3
    fake_os.fail = None
    assert w.flush() is True
    got = lines(path)
    assert got == [rec(i) for i in range(4)]


def test_short_writes_are_completed(tmp_path, monkeypatch):
    """os.write may write fewer bytes than asked without an error: the rest must follow."""
    class ShortOS(FakeOS):
        def write(self, fd, data):
            self.write_calls += 1
            return os.write(fd, bytes(data[:7]))

    short = ShortOS()
    monkeypatch.setattr(writer_mod, "os", short)
    path = tmp_path / "stats.jsonl"
    w = StatsWriter(path, 10**9, 60)
    for i in range(3):
        w.add(rec(i))
    assert w.flush() is True
    assert short.write_calls > 3
    assert lines(path) == [rec(0), rec(1), rec(2)]


def test_buffer_is_bounded_while_disk_refuses(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_mod, "MAX_BUFFERED_RECORDS", 5)
    blocker = tmp_path / "data"
    blocker.write_text("")
    path = blocker / "stats.jsonl"
    w = StatsWriter(path, 10**9, 60)
    for i in range(8):
        w.add(rec(i))
    assert w.flush() is False
    assert w.buffered == 5 and w.dropped == 3
    blocker.unlink()
    assert w.flush() is True
    assert lines(path) == [rec(i) for i in range(3, 8)]   # the oldest were dropped


# ---------------------------------------------------------------- on_flushed (the spool's commit)

def test_on_flushed_runs_after_each_successful_flush_empty_ones_too(tmp_path):
    path = tmp_path / "stats.jsonl"
    w = StatsWriter(path, 10**9, 10)
    seen = []
    w.on_flushed = lambda: seen.append((w.buffered, len(lines(path)) if path.exists() else 0))
    w.add(rec(1))
    w.add(rec(2))
    assert w.flush() is True
    assert seen == [(0, 2)]                               # after the records are on disk
    assert w.flush() is True                              # nothing buffered: everything added is on disk
    assert seen == [(0, 2), (0, 2)]


def test_on_flushed_does_not_run_after_a_failed_flush(tmp_path, fake_os):
    path = tmp_path / "stats.jsonl"
    w = StatsWriter(path, 10**9, 60)
    calls = []
    w.on_flushed = lambda: calls.append(w.written)
    w.add(rec(1))
    fake_os.fail = OSError(errno.ENOSPC, "No space left on device")
    assert w.flush() is False
    assert w.flush() is False
    assert calls == []
    fake_os.fail = None
    assert w.flush() is True
    assert calls == [1]


def test_on_flushed_does_not_run_when_the_folder_cannot_be_made(tmp_path):
    blocker = tmp_path / "data"
    blocker.write_text("")
    w = StatsWriter(blocker / "stats.jsonl", 10**9, 60)
    calls = []
    w.on_flushed = lambda: calls.append(1)
    w.add(rec(1))
    assert w.flush() is False
    assert calls == []


def test_on_flushed_unset_is_fine(tmp_path):
    w = StatsWriter(tmp_path / "stats.jsonl", 10**9, 10)
    assert w.on_flushed is None
    w.add(rec(1))
    assert w.flush() is True and w.flush() is True


async def test_flush_forever_calls_on_flushed(tmp_path):
    w = StatsWriter(tmp_path / "stats.jsonl", 10**9, flush_interval=0.01)
    calls = []
    w.on_flushed = lambda: calls.append(1)
    task = asyncio.create_task(w.flush_forever())
    try:
        await wait_until_async(lambda: len(calls) >= 3, 2, "three flushes")
    finally:
        task.cancel()


# ---------------------------------------------------------------- background flusher

async def test_flush_forever_writes_periodically(tmp_path):
    path = tmp_path / "stats.jsonl"
    w = StatsWriter(path, 10**9, flush_interval=0.02)
    task = asyncio.create_task(w.flush_forever())
    try:
        w.add(rec(1))
        await wait_until_async(lambda: path.exists() and bool(path.read_bytes()), 2, "the first flush")
        assert lines(path) == [rec(1)]
    finally:
        task.cancel()


async def test_flush_forever_survives_a_surprise(tmp_path, monkeypatch):
    w = StatsWriter(tmp_path / "stats.jsonl", 10**9, flush_interval=0.01)
    calls = []

    def boom():
        calls.append(1)
        raise ValueError("surprise")

    monkeypatch.setattr(w, "flush", boom)
    task = asyncio.create_task(w.flush_forever())
    try:
        await wait_until_async(lambda: len(calls) >= 3, 2, "three flushes")
        assert not task.done()
    finally:
        task.cancel()


# ---------------------------------------------------------------- standard output ("-")

class StdoutOS(FakeOS):
    """os.write to fd 1 goes to `out`; the rest is the real os module."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.fds: set[int] = set()

    def write(self, fd, data):
        self.fds.add(fd)
        self.write_calls += 1
        if self.fail is not None:
            # As the kernel does it: a short write returns its count, the next write fails.
            if self.partial_bytes:
                part, self.partial_bytes = bytes(data[: self.partial_bytes]), 0
                self.out += part
                return len(part)
            raise self.fail
        self.out += bytes(data)
        return len(data)


@pytest.fixture
def stdout_os(monkeypatch) -> StdoutOS:
    fake = StdoutOS()
    monkeypatch.setattr(writer_mod, "os", fake)
    return fake


def test_stdout_mode_writes_each_batch_to_fd_1_and_no_file(tmp_path, monkeypatch, stdout_os):
    monkeypatch.chdir(tmp_path)
    w = StatsWriter(writer_mod.STDOUT, rotate_bytes=10, flush_interval=60)
    flushed = []
    w.on_flushed = lambda: flushed.append(bytes(stdout_os.out))
    for i in range(3):
        w.add(rec(i))
    assert stdout_os.out == b""
    assert w.flush() is True
    w.add(rec(3))
    assert w.flush() is True
    assert stdout_os.fds == {1}
    assert [json.loads(line) for line in stdout_os.out.splitlines()] == [rec(i) for i in range(4)]
    # The checkpoint runs after each batch is out, and sees it whole.
    assert [len(out.splitlines()) for out in flushed] == [3, 4]
    assert w.written == 4
    # No file named "-", no rotation, no mark (nothing on disk to compare with after a restart).
    assert list(tmp_path.iterdir()) == []
    assert w.mark() is None
    assert writer_mod.request_ids_after(writer_mod.STDOUT, (1, 0)) == set()


@pytest.mark.parametrize("partial", [0, 1, 17, 100])
def test_stdout_cut_short_resumes_where_it_stopped(stdout_os, caplog, partial):
    """What reached stdout is committed: the retry writes exactly the rest, no line torn or doubled."""
    w = StatsWriter(writer_mod.STDOUT, rotate_bytes=10, flush_interval=60)
    for i in range(4):
        w.add(rec(i))
    stdout_os.fail = OSError(errno.EAGAIN, "Resource temporarily unavailable")
    stdout_os.partial_bytes = partial
    with caplog.at_level(logging.ERROR, logger="lmgate.stats"):
        assert w.flush() is False
    assert "standard output" in caplog.text
    assert w.last_error
    first_line = len(orjson_line(rec(0)))
    assert w.written == (1 if partial >= first_line else 0)
    assert w.buffered == 4 - w.written
    stdout_os.fail = None
    assert w.flush() is True
    assert [json.loads(line) for line in stdout_os.out.splitlines()] == [rec(i) for i in range(4)]
    assert w.written == 4 and w.buffered == 0 and w.last_error is None


def orjson_line(record: dict) -> bytes:
    w = StatsWriter(writer_mod.STDOUT, rotate_bytes=10, flush_interval=60)
    w.add(record)
    return w._lines[0]
