"""The spool between nginx and the sidecar, end to end: nginx appends one line per call to
stats.spool_dir, the sidecar turns the lines into records and deletes what it has recorded.

What a user relies on: calls are recorded even when the sidecar was down or killed while they
happened, no call is recorded twice, the spool does not grow without bound, and it holds no key.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys

import httpx
import pytest

from tests.support.gate import ALICE_KEY, BOB_KEY, CONFIG, UNLISTED_KEY, Gate
from tests.support.http import bearer, http_ok
from tests.support.wait import wait_until
from tests.support.hardening import alive, readyz

pytestmark = pytest.mark.e2e

CHAT = {"id": "chatcmpl-s", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}


def spool_files(g: Gate) -> list[str]:
    return sorted(n for n in os.listdir(g.spool) if n.endswith(".jsonl"))


def call(g: Gate, path: str, key: str, n: int = 1) -> list[int]:
    with httpx.Client() as client:
        return [client.post(g.base("openai") + path, headers=bearer(key), content=b"{}").status_code
                for _ in range(n)]


def test_calls_refused_while_the_sidecar_is_down_are_recorded_once_it_is_back(mock_upstream, tmp_path):
    mock_upstream.reply("/v1/spool/outage", body=json.dumps(CHAT).encode())
    g = Gate(tmp_path, mock_upstream.url)
    g.start(command="nginx")  # nginx alone: the sidecar is down
    sidecar = None
    try:
        assert call(g, "/v1/spool/outage", ALICE_KEY, 5) == [403] * 5  # fail closed
        assert g.records() == []
        wait_until(lambda: spool_files(g), 5, "nginx's spool lines")

        sidecar = subprocess.Popen([sys.executable, "-m", "lmgate", "serve", "--config", str(CONFIG)],
                                   env=g.env, cwd=g.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        records = g.new_records(0, 5)
        assert [r["error_type"] for r in records] == ["gate_unavailable"] * 5
        assert {r["endpoint"] for r in records} == {"/openai/v1/spool/outage"}
        assert all(r["status"] == 403 and r["lmgate_id"] is None for r in records)
        # nginx masks the key itself: an auditor still sees whose calls were refused.
        assert {r["masked_key"] for r in records} == {"..." + ALICE_KEY[-6:]}
        # Calls once it is back are recorded as usual, after the backlog.
        assert call(g, "/v1/spool/outage", ALICE_KEY) == [200]
        latest = g.new_records(5, 1)[-1]
        assert (latest["lmgate_id"], latest["input_tokens"], latest["output_tokens"]) == ("alice", 11, 7)
    finally:
        if sidecar is not None:
            sidecar.send_signal(signal.SIGTERM)
            sidecar.wait(20)
        assert g.stop() == 0


def test_a_sidecar_killed_before_its_flush_loses_no_record_and_doubles_none(own_gate, mock_upstream):
    # Nothing reaches the stats file but at shutdown: what the killed sidecar had read is gone
    # from its memory, and must come back from the spool.
    g = own_gate(LMGATE_STATS__FLUSH_INTERVAL_SECONDS="3600")
    mock_upstream.reply("/v1/spool/kill", body=json.dumps(CHAT).encode())
    assert call(g, "/v1/spool/kill", ALICE_KEY, 120) == [200] * 120
    wait_until(lambda: readyz(g)[1]["stats_buffered"] >= 120, 10, "120 records read from the spool")
    first = g.sidecar_pid()
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: not alive(first) and "the sidecar is back" in g.log(), 20, "lmgate up to restart the sidecar")
    assert call(g, "/v1/spool/kill", BOB_KEY, 30) == [200] * 30
    assert g.stop() == 0  # the restarted sidecar flushes at shutdown
    records = g.records()
    assert len(records) == 150, len(records)
    assert len({r["request_id"] for r in records}) == 150, "a call was recorded twice"
    assert sorted(r["lmgate_id"] for r in records) == ["alice"] * 120 + ["bob"] * 30


def _serve(g: Gate, log_name: str) -> subprocess.Popen:
    log = open(g.workdir / log_name, "wb")
    return subprocess.Popen([sys.executable, "-m", "lmgate", "serve", "--config", str(CONFIG)],
                            env=g.env, cwd=g.workdir, stdout=log, stderr=subprocess.STDOUT)


def test_a_sidecar_killed_between_a_flush_and_its_checkpoint_records_nothing_twice(mock_upstream, tmp_path):
    mock_upstream.reply("/v1/spool/window", body=json.dumps(CHAT).encode())
    g = Gate(tmp_path, mock_upstream.url)
    g.start(command="nginx")
    checkpoint = g.spool / ".checkpoint.json"
    sidecars = [_serve(g, "sidecar1.log")]
    try:
        wait_until(lambda: http_ok(g.sidecar_url("/livez")), 10, "the sidecar")
        assert call(g, "/v1/spool/window", ALICE_KEY, 20) == [200] * 20
        g.new_records(0, 20)
        wait_until(lambda: checkpoint.exists() and "stats" in json.loads(checkpoint.read_text()), 5,
                   "a checkpoint that marks the stats file")
        old = checkpoint.read_bytes()
        assert call(g, "/v1/spool/window", BOB_KEY, 30) == [200] * 30
        g.new_records(20, 30)
        wait_until(lambda: checkpoint.read_bytes() != old, 5, "the checkpoint of the second batch")
        # As if the kill came after the second batch's flush but before its checkpoint.
        sidecars[0].kill()
        sidecars[0].wait(10)
        checkpoint.write_bytes(old)

        sidecars.append(_serve(g, "sidecar2.log"))
        wait_until(lambda: http_ok(g.sidecar_url("/livez")), 10, "the second sidecar")
        assert call(g, "/v1/spool/window", ALICE_KEY, 10) == [200] * 10
        g.new_records(50, 10)  # and no more: a doubled record would show up within it
        records = g.records()
    finally:
        for sidecar in sidecars:
            if sidecar.poll() is None:
                sidecar.send_signal(signal.SIGTERM)
                sidecar.wait(20)
        assert g.stop() == 0
    assert len(records) == 60 and len({r["request_id"] for r in records}) == 60
    assert sorted(r["lmgate_id"] for r in records) == ["alice"] * 30 + ["bob"] * 30
    assert "30 calls were recorded after the last checkpoint" in (g.workdir / "sidecar2.log").read_text()


def test_recorded_spool_files_are_deleted(own_gate, mock_upstream):
    g = own_gate()
    mock_upstream.reply("/v1/spool/cleanup", body=json.dumps(CHAT).encode())
    assert call(g, "/v1/spool/cleanup", ALICE_KEY, 3) == [200] * 3
    g.new_records(0, 3)
    first = spool_files(g)
    assert first and all(n.startswith("calls-") for n in first)
    # A file is deleted once its second has been over for 2 s and it is recorded; keep calling so
    # that newer files exist, as they would under traffic.
    wait_until(lambda: call(g, "/v1/spool/cleanup", ALICE_KEY) and not set(first) & set(spool_files(g)),
               20, f"{first} to leave the spool", interval=1)
    checkpoint = json.loads((g.spool / ".checkpoint.json").read_text())
    assert not set(first) & set(checkpoint), "the checkpoint still names deleted files"
    records = g.records()
    assert len(records) == len({r["request_id"] for r in records})


def test_the_spool_holds_no_key_and_only_its_owner_can_open_it(own_gate, mock_upstream):
    g = own_gate()
    mock_upstream.reply("/v1/spool/keys", body=json.dumps(CHAT).encode())
    mock_upstream.reply("/v1beta/models/lmgate-spool-test:generateContent", body=b'{"candidates":[]}')
    with httpx.Client() as client:
        for key in (ALICE_KEY, BOB_KEY, UNLISTED_KEY):
            client.post(g.base("openai") + "/v1/spool/keys", headers=bearer(key), content=b"{}")
            client.post(g.base("anthropic") + "/v1/spool/keys", headers={"x-api-key": key}, content=b"{}")
            client.post(g.base("gemini") + f"/v1beta/models/lmgate-spool-test:generateContent?key={key}",
                        content=b"{}")
    g.new_records(0, 9)
    text = b"".join((g.spool / n).read_bytes() for n in spool_files(g))
    assert text.count(b"\n") == 9
    for key in (ALICE_KEY, BOB_KEY, UNLISTED_KEY):
        assert key.encode() not in text and key[:-6].encode() not in text
    mode = stat.S_IMODE(os.stat(g.spool).st_mode)
    assert mode & 0o077 == 0, f"the spool folder is open to others: {oct(mode)}"
