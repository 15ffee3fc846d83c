"""lmgate.spool: the sidecar reads nginx's spool files in order, loses no line and doubles none
across restarts, and deletes a file only once it is old, read to its end and on disk as records."""

from __future__ import annotations

import collections
import json
import logging
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import lmgate.spool as spool_mod
from lmgate.spool import CHECKPOINT_NAME, DONE_AFTER_SECONDS, SLOT_SECONDS, STATS_MARK, SpoolReader, slot_of
from tests.support.spool_lines import append, spool_file

pytestmark = pytest.mark.unit

SLOT = 1_700_000_000          # a slot start (a multiple of 10 seconds)
OLD_ENOUGH = DONE_AFTER_SECONDS  # commit deletes a file read to its end this long after its slot began
KEY = "sk-lmgate-test-spool-0123456789abcdef"


class Reader:
    """A SpoolReader over `folder` that collects the lines it hands on."""

    def __init__(self, folder: Path, max_line: int = 1000, fail_on: bytes | None = None) -> None:
        self.lines: list[bytes] = []
        self.fail_on = fail_on
        self.spool = SpoolReader(folder, self._take, max_line)

    def _take(self, line: bytes) -> None:
        if self.fail_on is not None and self.fail_on in line:
            raise ValueError("not a spool line")
        self.lines.append(line)

    def read_all(self) -> list[bytes]:
        while self.spool.read(1000):
            pass
        return self.lines


def lines(*names: str) -> bytes:
    return b"".join(name.encode() + b"\n" for name in names)


def checkpoint(folder: Path) -> dict:
    return json.loads((folder / CHECKPOINT_NAME).read_text())


@pytest.fixture
def folder(tmp_path) -> Path:
    path = tmp_path / "spool"
    path.mkdir()
    return path


# ---------------------------------------------------------------- names

@pytest.mark.parametrize("name,expected", [
    ("calls-1700000000.jsonl", 1700000000), ("calls-0.jsonl", 0), ("calls-.jsonl", None),
    ("calls-17x.jsonl", None), ("calls-1700000000.jsonl.tmp", None), ("calls-1700000000.json", None),
    (".checkpoint.json", None), ("stats.jsonl", None), ("calls--5.jsonl", None),
])
def test_slot_of(name, expected):
    assert slot_of(name) == expected


# ---------------------------------------------------------------- reading

def test_lines_are_handed_on_in_slot_order_across_files(folder):
    # Created out of order; the slot in the name decides, not the creation time or the name's sort.
    append(spool_file(folder, SLOT + 20), lines("c1", "c2"))
    append(spool_file(folder, SLOT), lines("a1", "a2"))
    append(spool_file(folder, 999_990), lines("z1"))     # fewer digits: earlier, though it sorts later as text
    append(spool_file(folder, SLOT + 10), lines("b1"))
    append(folder / "notes.txt", lines("not", "spool"))
    append(folder / "calls-x.jsonl", lines("not", "spool"))
    r = Reader(folder)
    assert r.spool.read(100) == 6
    assert r.lines == [b"z1", b"a1", b"a2", b"b1", b"c1", b"c2"]
    assert r.spool.lines == 6 and r.spool.bad_lines == 0
    assert r.spool.read(100) == 0


def test_read_hands_on_at_most_max_lines_and_goes_on_from_there(folder):
    append(spool_file(folder, SLOT), lines(*[f"l{i}" for i in range(5)]))
    append(spool_file(folder, SLOT + 10), lines("m0", "m1"))
    r = Reader(folder)
    assert r.spool.read(3) == 3
    assert r.lines == [b"l0", b"l1", b"l2"]
    assert r.spool.read(3) == 3
    assert r.spool.read(3) == 1
    assert r.lines == [b"l0", b"l1", b"l2", b"l3", b"l4", b"m0", b"m1"]


def test_lines_appended_later_are_read(folder):
    path = spool_file(folder, SLOT)
    append(path, lines("a"))
    r = Reader(folder)
    r.read_all()
    append(path, lines("b", "c"))
    append(spool_file(folder, SLOT + 10), lines("d"))
    assert r.read_all() == [b"a", b"b", b"c", b"d"]


def test_partial_last_line_is_held_until_complete(folder):
    path = spool_file(folder, SLOT)
    append(path, b"first\nsec")
    r = Reader(folder)
    assert r.spool.read(100) == 1
    assert r.lines == [b"first"]
    assert r.spool.backlog_bytes == 3                 # "sec" is not handed on yet
    append(path, b"ond")
    assert r.spool.read(100) == 0
    append(path, b"\nthird\n")
    assert r.spool.read(100) == 2
    assert r.lines == [b"first", b"second", b"third"]
    assert r.spool.bad_lines == 0 and r.spool.backlog_bytes == 0


def test_empty_lines_are_passed_over(folder):
    append(spool_file(folder, SLOT), b"\n\na\n\nb\n")
    r = Reader(folder)
    assert r.read_all() == [b"a", b"b"]
    assert r.spool.lines == 2 and r.spool.bad_lines == 0


def test_long_line_is_skipped_counted_and_the_next_is_read(folder, monkeypatch, caplog):
    """A line longer than any nginx writes is skipped, as far as its newline; the next line is read."""
    monkeypatch.setattr(spool_mod, "READ_BYTES", 64)   # the line spans several reads
    append(spool_file(folder, SLOT), b"a\n" + b'{"u":"' + KEY.encode() + b"x" * 500 + b'"}\nb\n')
    r = Reader(folder, max_line=100)
    with caplog.at_level(logging.ERROR, logger="lmgate.spool"):
        assert r.read_all() == [b"a", b"b"]
    assert r.spool.bad_lines == 1
    assert "over 100 bytes" in caplog.text and KEY not in caplog.text


def test_long_line_is_skipped_when_read_whole_in_one_go(folder):
    append(spool_file(folder, SLOT), b"a\n" + b"x" * 500 + b"\nb\n")
    r = Reader(folder, max_line=100)
    got = r.read_all()
    assert got == [b"a", b"b"] and r.spool.bad_lines == 1, (
        f"a 500-byte line with max_line=100 was handed on: {[len(x) for x in got]} bytes, "
        f"{r.spool.bad_lines} bad")


def test_long_line_still_being_written_is_skipped_to_its_newline(folder):
    path = spool_file(folder, SLOT)
    append(path, b"a\n" + b"x" * 500)          # nginx is still writing the line
    r = Reader(folder, max_line=100)
    assert r.read_all() == [b"a"]
    assert r.spool.bad_lines == 1
    append(path, b"yyy\nb\n")                  # the rest of the long line, then the next one
    got = r.read_all()
    assert got == [b"a", b"b"] and r.spool.bad_lines == 1, (
        f"the rest of a skipped line was handed on as a line: {got}, {r.spool.bad_lines} bad")


def test_on_line_that_raises_counts_a_bad_line_and_reading_goes_on(folder, caplog):
    path = spool_file(folder, SLOT)
    append(path, lines("good1", f"bad {KEY}", "good2"))
    append(spool_file(folder, SLOT + 10), lines("bad again", "good3"))
    r = Reader(folder, fail_on=b"bad")
    with caplog.at_level(logging.ERROR, logger="lmgate.spool"):
        assert r.read_all() == [b"good1", b"good2", b"good3"]
    assert r.spool.bad_lines == 2 and r.spool.lines == 5
    errors = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(errors) == 2
    assert path.name in errors[0] and "not a spool line" in errors[0]
    assert KEY not in caplog.text


def test_missing_folder_is_an_error_until_it_appears(tmp_path):
    folder = tmp_path / "later"
    r = Reader(folder)
    assert r.spool.read(10) == 0
    assert r.spool.last_error and str(folder) in r.spool.last_error
    assert r.spool.backlog_bytes == 0
    append(spool_file(folder, SLOT), lines("a"))
    assert r.read_all() == [b"a"]
    assert r.spool.last_error is None


# ---------------------------------------------------------------- checkpoint

def test_commit_saves_the_checkpoint_and_a_new_reader_resumes_after_it(folder):
    a, b = spool_file(folder, SLOT), spool_file(folder, SLOT + 10)
    append(a, lines("a1", "a2"))
    append(b, lines("b1"))
    r1 = Reader(folder)
    r1.read_all()
    r1.spool.commit(now=SLOT + OLD_ENOUGH - 1)           # too recent to delete anything
    assert checkpoint(folder) == {a.name: [a.stat().st_ino, 6], b.name: [b.stat().st_ino, 3]}
    r1.spool.close()
    append(a, lines("a3"))
    append(b, lines("b2", "b3"))
    r2 = Reader(folder)
    assert r2.read_all() == [b"a3", b"b2", b"b3"]
    assert r1.lines + r2.lines == [b"a1", b"a2", b"b1", b"a3", b"b2", b"b3"]


def test_lines_read_but_not_committed_are_read_again(folder):
    path = spool_file(folder, SLOT)
    append(path, lines("a1", "a2"))
    r1 = Reader(folder)
    r1.read_all()
    r1.spool.commit(now=SLOT)
    append(path, lines("a3", "a4"))
    assert r1.read_all()[-2:] == [b"a3", b"a4"]          # read, but their records never reached disk
    r1.spool.close()
    r2 = Reader(folder)
    assert r2.read_all() == [b"a3", b"a4"]


def test_a_partial_line_is_not_committed(folder):
    path = spool_file(folder, SLOT)
    append(path, b"a1\na2-half")
    r1 = Reader(folder)
    r1.read_all()
    r1.spool.commit(now=SLOT)
    assert checkpoint(folder)[path.name][1] == 3
    r1.spool.close()
    append(path, b"-rest\n")
    assert Reader(folder).read_all() == [b"a2-half-rest"]


def test_file_replaced_under_the_same_name_is_read_from_its_start(folder):
    path = spool_file(folder, SLOT)
    append(path, lines("old1", "old2", "old3"))
    r1 = Reader(folder)
    r1.read_all()
    r1.spool.commit(now=SLOT)
    r1.spool.close()
    old_inode = path.stat().st_ino
    replacement = folder / "replacement.tmp"
    append(replacement, lines("new1", "new2", "new3", "new4"))
    os.replace(replacement, path)                          # both existed at once: a new inode
    assert path.stat().st_ino != old_inode
    assert Reader(folder).read_all() == [b"new1", b"new2", b"new3", b"new4"]


def test_a_deleted_file_that_comes_back_is_read_from_its_start(folder):
    path = spool_file(folder, SLOT)
    append(path, lines("a1", "a2"))
    r = Reader(folder)
    r.read_all()
    r.spool.commit(now=SLOT + OLD_ENOUGH)
    assert not path.exists()
    append(path, lines("late"))                            # a line nginx wrote late, into a new file
    assert r.read_all() == [b"a1", b"a2", b"late"]


def test_commit_saves_the_stats_mark_and_a_new_reader_finds_it(folder):
    """The checkpoint also says how long the stats file was at the commit (lmgate/pipeline.py skips
    records past it when their lines come again)."""
    path = spool_file(folder, SLOT)
    append(path, lines("a1"))
    r1 = Reader(folder)
    r1.read_all()
    r1.spool.commit(now=SLOT, stats_mark=(77, 1234))
    assert checkpoint(folder) == {path.name: [path.stat().st_ino, 3], STATS_MARK: [77, 1234]}
    r1.spool.close()
    append(path, lines("a2"))
    r2 = Reader(folder)
    assert r2.spool.stats_mark == (77, 1234)
    assert r2.read_all() == [b"a2"]                      # the mark is not a file to read
    r2.spool.commit(now=SLOT + OLD_ENOUGH)               # no new mark: the last one stays
    assert checkpoint(folder) == {STATS_MARK: [77, 1234]}
    assert not path.exists()


def test_no_stats_mark_without_a_checkpoint(folder):
    assert Reader(folder).spool.stats_mark is None
    (folder / CHECKPOINT_NAME).write_text(json.dumps({STATS_MARK: "x"}))
    assert Reader(folder).spool.stats_mark is None


def test_checkpoint_entries_of_files_that_are_gone_are_dropped(folder):
    (folder / CHECKPOINT_NAME).write_text(json.dumps({"calls-10.jsonl": [5, 100]}))
    append(spool_file(folder, SLOT), lines("a"))
    r = Reader(folder)
    r.read_all()
    r.spool.commit(now=SLOT)
    assert set(checkpoint(folder)) == {spool_file(folder, SLOT).name}


@pytest.mark.parametrize("text", [b"not json", b"[1, 2]", b'"calls"', b"\xff\xfe{", b"", b'{"calls-1.jsonl": '],
                         ids=["garbage", "list", "string", "bytes", "empty", "torn"])
def test_unreadable_checkpoint_is_logged_and_files_are_read_from_their_start(folder, caplog, text):
    append(spool_file(folder, SLOT), lines("a1", "a2"))
    (folder / CHECKPOINT_NAME).write_bytes(text)
    with caplog.at_level(logging.ERROR, logger="lmgate.spool"):
        r = Reader(folder)
    assert "checkpoint" in caplog.text and CHECKPOINT_NAME in caplog.text
    assert r.read_all() == [b"a1", b"a2"]
    r.spool.commit(now=SLOT)
    assert checkpoint(folder) == {spool_file(folder, SLOT).name: [spool_file(folder, SLOT).stat().st_ino, 6]}


@pytest.mark.parametrize("entry", [[1], "6", [None, 6], [1.5, 6], [True, 6], {"inode": 1}],
                         ids=["short", "text", "null", "float", "bool", "object"])
def test_checkpoint_entry_of_the_wrong_shape_reads_the_file_from_its_start(folder, entry):
    path = spool_file(folder, SLOT)
    append(path, lines("a1", "a2"))
    (folder / CHECKPOINT_NAME).write_text(json.dumps({path.name: entry}))
    assert Reader(folder).read_all() == [b"a1", b"a2"]


def test_checkpoint_for_another_inode_reads_the_file_from_its_start(folder):
    path = spool_file(folder, SLOT)
    append(path, lines("a1", "a2"))
    (folder / CHECKPOINT_NAME).write_text(json.dumps({path.name: [path.stat().st_ino + 1, 3]}))
    assert Reader(folder).read_all() == [b"a1", b"a2"]


@pytest.mark.parametrize("offset", [-3, 2 ** 70], ids=["negative", "huge"])
def test_checkpoint_with_an_impossible_offset_does_not_stop_reading(folder, offset):
    path = spool_file(folder, SLOT)
    append(path, lines("a1", "a2"))
    (folder / CHECKPOINT_NAME).write_text(json.dumps({path.name: [path.stat().st_ino, offset]}))
    r = Reader(folder)
    try:
        got = r.read_all()
    except (OSError, OverflowError) as exc:
        raise AssertionError(f"read() raised {type(exc).__name__}: {exc}") from None
    assert got in ([b"a1", b"a2"], [])


def test_checkpoint_that_cannot_be_saved_is_a_problem_until_it_can(folder):
    (folder / CHECKPOINT_NAME).mkdir()                     # in the way of the checkpoint
    append(spool_file(folder, SLOT), lines("a"))
    r = Reader(folder)
    r.read_all()
    r.spool.commit(now=SLOT)
    assert r.spool.last_error and "checkpoint" in r.spool.last_error
    append(spool_file(folder, SLOT), lines("b"))
    assert r.read_all() == [b"a", b"b"]                  # reading goes on meanwhile
    (folder / CHECKPOINT_NAME).rmdir()
    r.spool.commit(now=SLOT)
    assert r.spool.last_error is None
    assert checkpoint(folder)[spool_file(folder, SLOT).name][1] == 4


# ---------------------------------------------------------------- deleting finished files

def test_commit_deletes_only_files_that_are_old_enough_and_read_to_their_end(folder):
    old = spool_file(folder, SLOT)
    recent = spool_file(folder, SLOT + 10)
    append(old, lines("a1", "a2"))
    append(recent, lines("b1"))
    r = Reader(folder)
    assert r.read_all() == [b"a1", b"a2", b"b1"]
    r.spool.commit(now=SLOT + 10 + OLD_ENOUGH - 1)
    assert not old.exists()
    assert recent.exists()                                 # 19 seconds after its slot began: nginx may still write
    assert set(checkpoint(folder)) == {recent.name}
    r.spool.commit(now=SLOT + 10 + OLD_ENOUGH)
    assert not recent.exists()
    assert checkpoint(folder) == {}
    assert r.spool.bad_lines == 0


def test_commit_never_deletes_lines_read_ahead_but_not_handed_on(folder):
    """The sidecar reads 128 lines at a time; a flush between two batches of an old file (a backlog
    after downtime) must not delete the lines of the file that were not handed on yet."""
    path = spool_file(folder, SLOT)
    append(path, lines(*[f"l{i}" for i in range(300)]))
    r = Reader(folder)
    assert r.spool.read(128) == 128
    r.spool.commit(now=SLOT + OLD_ENOUGH)
    got = r.read_all()
    assert len(got) == 300 and r.spool.bad_lines == 0, (
        f"{300 - len(got)} of 300 lines lost (file deleted: {not path.exists()}, "
        f"{r.spool.bad_lines} counted bad)")
    r.spool.commit(now=SLOT + OLD_ENOUGH)
    assert not path.exists()


def test_commit_never_deletes_a_file_that_was_never_opened(folder):
    first, second = spool_file(folder, SLOT), spool_file(folder, SLOT + 10)
    append(first, lines("a1", "a2"))
    append(second, lines("b1"))
    r = Reader(folder)
    assert r.spool.read(2) == 2                            # stops before opening the second file
    r.spool.commit(now=SLOT + 1000)
    assert not first.exists() and second.exists()
    assert r.read_all() == [b"a1", b"a2", b"b1"]


def test_commit_never_deletes_a_file_with_data_written_after_the_last_read(folder):
    path = spool_file(folder, SLOT)
    append(path, lines("a1"))
    r = Reader(folder)
    r.read_all()
    append(path, lines("a2"))                              # not read yet
    r.spool.commit(now=SLOT + 1000)
    assert path.exists()
    assert r.read_all() == [b"a1", b"a2"]
    r.spool.commit(now=SLOT + 1000)
    assert not path.exists()


def test_old_file_ending_in_a_torn_line_is_deleted_and_counted(folder, caplog):
    torn = spool_file(folder, SLOT)
    recent = spool_file(folder, SLOT + 10)
    append(torn, b"a1\n" + b'{"rid":"cut-' + KEY.encode())
    append(recent, b"b1\nb2-half")
    r = Reader(folder)
    assert r.read_all() == [b"a1", b"b1"]
    with caplog.at_level(logging.ERROR, logger="lmgate.spool"):
        r.spool.commit(now=SLOT + OLD_ENOUGH)
    assert not torn.exists()
    assert recent.exists()                                 # its partial line may still be completed
    assert r.spool.bad_lines == 1
    assert torn.name in caplog.text and "incomplete line" in caplog.text
    assert KEY not in caplog.text


def test_delete_leaves_other_files_alone(folder):
    append(spool_file(folder, SLOT), lines("a"))
    (folder / "notes.txt").write_text("mine")
    r = Reader(folder)
    r.read_all()
    r.spool.commit(now=SLOT + 1000)
    assert sorted(p.name for p in folder.iterdir() if p.name != CHECKPOINT_NAME) == ["notes.txt"]


# ---------------------------------------------------------------- backlog

def test_backlog_bytes(folder):
    a, b = spool_file(folder, SLOT), spool_file(folder, SLOT + 10)
    append(a, lines("a1", "a2"))                           # 6 bytes
    append(b, lines("b1"))                                 # 3 bytes
    append(folder / "notes.txt", b"x" * 100)               # not spool
    r = Reader(folder)
    assert r.spool.backlog_bytes == 9
    r.spool.read(1)
    assert r.spool.backlog_bytes == 6
    r.read_all()
    assert r.spool.backlog_bytes == 0
    append(b, b"b2-ha")
    r.read_all()
    assert r.spool.backlog_bytes == 5                      # read, but not a whole line yet
    r.spool.commit(now=SLOT)
    r.spool.close()
    r2 = Reader(folder)                                    # resumes from the checkpoint
    assert r2.spool.backlog_bytes == 5


# ---------------------------------------------------------------- restarts, lines torn anywhere

op = st.one_of(
    st.tuples(st.just("write"), st.integers(min_value=1, max_value=40)),
    st.tuples(st.just("next_file"), st.just(0)),
    st.tuples(st.just("read"), st.integers(min_value=1, max_value=5)),
    st.tuples(st.just("commit"), st.just(0)),
    st.tuples(st.just("restart"), st.booleans()),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, max_size=60), sizes=st.lists(st.integers(min_value=0, max_value=30), min_size=1))
def test_no_line_is_lost_and_only_uncommitted_lines_come_twice(tmp_path_factory, ops, sizes):
    """nginx writes lines in pieces across slot files; the sidecar reads some, commits (deleting
    finished files) and restarts (with or without a commit first) at any point. In the end every
    line was handed on; a line came twice only if a reader handed it on and stopped before
    committing it. (A commit here follows a read to the end: a commit between two reads of one
    file is test_commit_never_deletes_lines_read_ahead_but_not_handed_on.)"""
    folder = tmp_path_factory.mktemp("spool")
    slot, pending, written = SLOT, b"", []
    counter = iter(range(10 ** 6))

    def new_line() -> bytes:
        i = next(counter)
        line = b"line-%d-" % i + b"p" * sizes[i % len(sizes)]
        written.append(line)
        return line + b"\n"

    reader = Reader(folder)
    delivered: list[bytes] = []
    since_commit: list[bytes] = []
    allowed_twice: collections.Counter = collections.Counter()

    def read(n: int) -> None:
        before = len(reader.lines)
        reader.spool.read(n)
        since_commit.extend(reader.lines[before:])

    def commit() -> None:
        read(10 ** 6)
        # now: the current slot has just begun, so only files of slots long over are finished.
        reader.spool.commit(now=slot + SLOT_SECONDS / 2)
        since_commit.clear()

    for kind, arg in ops:
        if kind == "write":
            while len(pending) < arg:
                pending += new_line()
            append(spool_file(folder, slot), pending[:arg])
            pending = pending[arg:]
        elif kind == "next_file":
            if pending:                                    # nginx never leaves a line torn
                append(spool_file(folder, slot), pending)
                pending = b""
            slot += SLOT_SECONDS
        elif kind == "read":
            read(arg)
        elif kind == "commit":
            commit()
        else:
            if arg:
                commit()
            else:
                allowed_twice.update(since_commit)
                since_commit.clear()
            reader.spool.close()
            delivered.extend(reader.lines)
            reader = Reader(folder)
    if pending:
        append(spool_file(folder, slot), pending)
    while reader.spool.read(7):
        pass
    delivered.extend(reader.lines)
    assert reader.spool.bad_lines == 0
    counts = collections.Counter(delivered)
    assert set(counts) == set(written), "a line was lost"
    for line, n in counts.items():
        assert n == 1 + allowed_twice[line], (line, n, allowed_twice[line])
    reader.spool.close()
