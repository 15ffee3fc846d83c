"""Records written after the spool's last checkpoint (lmgate.writer.request_ids_after), and the
spool folder nginx gets (lmgate.nginx_conf._prepare_spool)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from lmgate.nginx_conf import RenderError, _prepare_spool
from lmgate.writer import StatsWriter, request_ids_after

pytestmark = pytest.mark.unit


def write(writer: StatsWriter, *ids: str) -> None:
    for rid in ids:
        writer.add({"request_id": rid, "status": 200})
    assert writer.flush()


def test_ids_after_the_mark_in_the_same_file(tmp_path):
    w = StatsWriter(tmp_path / "stats.jsonl", 10**9, 10)
    write(w, "a", "b")
    mark = w.mark()
    write(w, "c", "d")
    assert request_ids_after(w.path, mark) == {"c", "d"}
    assert request_ids_after(w.path, w.mark()) == set()
    assert request_ids_after(w.path, None) == set()


def test_ids_after_the_mark_across_a_rotation(tmp_path):
    w = StatsWriter(tmp_path / "stats.jsonl", 80, 10)
    write(w, "a")
    mark = w.mark()
    write(w, "b")
    write(w, "c", "d", "e")  # past 80 bytes: the file is rotated first
    assert list(tmp_path.glob("stats.*.jsonl")), "the test needs a rotation"
    assert request_ids_after(w.path, mark) == {"b", "c", "d", "e"}


def test_a_replaced_stats_file_is_not_compared(tmp_path):
    w = StatsWriter(tmp_path / "stats.jsonl", 10**9, 10)
    write(w, "a")
    mark = w.mark()
    w.path.unlink()
    write(w, "b")
    assert request_ids_after(w.path, mark) == set()


def test_unreadable_lines_after_the_mark_are_passed_over(tmp_path):
    w = StatsWriter(tmp_path / "stats.jsonl", 10**9, 10)
    write(w, "a")
    mark = w.mark()
    with open(w.path, "ab") as f:
        f.write(b"not json\n" + json.dumps({"status": 200}).encode() + b"\n[1]\n")
    write(w, "b")
    assert request_ids_after(w.path, mark) == {"b"}


def test_spool_folder_is_created_private(tmp_path):
    folder = tmp_path / "a" / "spool"
    _prepare_spool(folder, None)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    folder.chmod(0o755)  # an existing folder (e.g. from a checkout) is closed too
    _prepare_spool(folder, None)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the folder to nginx's workers")
def test_as_root_the_folder_goes_to_the_workers_who_must_reach_it(tmp_path):
    import pwd
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(RenderError) as err:
        _prepare_spool(private / "spool", "nobody")
    message = str(err.value)
    assert "\n" not in message and str(private) in message and "LMGATE_STATS__SPOOL_DIR" in message

    open_folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"lmgate-unit-{os.getpid()}"
    try:
        _prepare_spool(open_folder, "nobody")
        assert os.stat(open_folder).st_uid == pwd.getpwnam("nobody").pw_uid
    finally:
        open_folder.rmdir()
