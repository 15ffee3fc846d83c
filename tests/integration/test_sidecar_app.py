"""The sidecar app through aiohttp's test client: /auth, the spool it reads (lines in, records
out), /livez, /readyz, reload, restart and shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from multidict import CIMultiDict

import lmgate.pipeline
import lmgate.writer
from lmgate.allowlist import AllowListHolder
from lmgate.keys import hash_key
from lmgate.app import create_app
from lmgate.pipeline import SPOOL
from lmgate.settings import load_settings
from lmgate.spool import CHECKPOINT_NAME, SLOT_SECONDS, STATS_MARK
from tests.support.spool_lines import append, slot, spool_file, spool_line
from tests.support.wait import wait_until_async

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config" / "lmgate.yaml"

KEY_ALICE = "sk-proj-alice-0123456789abcdef"
KEY_BOB = "sk-ant-bob-fedcba9876543210"
KEY_CAROL = "AIzaSyCarol-000111222333444"
KEY_UNKNOWN = "sk-proj-mallory-999999999999"
HEAD_BYTES, TAIL_BYTES = 1024, 2048
OLD = 6 * SLOT_SECONDS        # a slot this far back is finished: its file is deleted once read and flushed

OPENAI_BODY = json.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}}).encode()


def allowlist_text(*rows: tuple[str, str, str]) -> str:
    return "id,api_key,owner,added\n" + "".join(f"{i},{k},{o},2024-01-01\n" for i, k, o in rows)


DEFAULT_ROWS = (("alice", KEY_ALICE, "Alice Smith"), ("bob", hash_key(KEY_BOB), "Bob"),
                ("carol", KEY_CAROL, "Zoë Carol"))


def write_allowlist(path: Path, text: str, seconds_ago: float = 10.0) -> None:
    path.write_text(text, encoding="utf-8")
    when = time.time_ns() - int(seconds_ago * 1e9)
    os.utime(path, ns=(when, when))


def call_line(rid: str = "r1", body: bytes = OPENAI_BODY, **fields) -> bytes:
    """The spool line nginx writes for a call alice made just now (see tests/support/spool_lines.py)."""
    fields.setdefault("ts", f"{time.time():.3f}")
    fields.setdefault("t", "0.250")
    fields.setdefault("own", "Alice Smith")
    return spool_line(body, rid=rid, head_max=HEAD_BYTES, tail_max=TAIL_BYTES, **fields)


def spool_checkpoint(spool: Path) -> dict:
    """The spool's checkpoint without its mark of the stats file: spool file name -> [inode, offset]."""
    state = json.loads((spool / CHECKPOINT_NAME).read_text())
    state.pop(STATS_MARK, None)
    return state


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "torn line in the stats file"
    return [json.loads(line) for line in data.splitlines()]


class Gate:
    """One sidecar app under test, its files and its test client."""

    def __init__(self, client, settings, holder, allowlist: Path, stats: Path, spool: Path):
        self.client, self.settings, self.holder = client, settings, holder
        self.allowlist, self.stats, self.spool = allowlist, stats, spool
        self.app = client.server.app

    def records(self) -> list[dict]:
        return read_records(self.stats)

    def rids(self) -> list[str]:
        return [r["request_id"] for r in self.records()]

    async def wait_records(self, n: int, timeout: float = 5.0) -> list[dict]:
        await wait_until_async(lambda: len(self.records()) >= n, timeout, f"{n} records")
        return self.records()

    async def wait_rid(self, rid: str, timeout: float = 5.0) -> list[dict]:
        await wait_until_async(lambda: rid in self.rids(), timeout, f"the record of {rid}")
        return self.records()

    def write(self, *lines: bytes, slot_start: int | None = None) -> Path:
        """Append lines (in one write) to the spool file nginx writes now, or to another slot's."""
        path = spool_file(self.spool, slot() if slot_start is None else slot_start)
        append(path, b"".join(line + b"\n" for line in lines))
        return path

    async def readyz(self) -> tuple[int, dict]:
        resp = await self.client.get("/readyz")
        return resp.status, await resp.json()

    async def wait_ready(self, predicate, timeout: float = 5.0) -> tuple[int, dict]:
        """/readyz once predicate(status, body) holds."""
        answers = []

        async def ready() -> tuple[int, dict] | None:
            answers.append(await self.readyz())
            return answers[-1] if predicate(*answers[-1]) else None

        try:
            return await wait_until_async(ready, timeout, "/readyz to show it", interval=0.02)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last answer: {answers[-1] if answers else None}") from None

    async def auth(self, headers=None, query: str | None = None,
                   path: str = "/gemini/v1beta/models/gemini-2.0-flash:generateContent"):
        """GET /auth as nginx's auth subrequest sends it: the client's headers plus its URI."""
        hdrs = CIMultiDict(headers or {})
        hdrs["X-LMGate-Query"] = path if query is None else f"{path}?{query}"
        resp = await self.client.get("/auth", headers=hdrs)
        body = await resp.read()
        return resp, body


@pytest.fixture
def make_gate(tmp_path, aiohttp_client):
    """make_gate(env overrides..., stats_path=..., spool_dir=...) -> Gate with a running app.
    Gates made one after the other share their allow-list, stats file and spool (a restart)."""
    async def make(*, stats_path: Path | None = None, spool_dir: Path | None = None, rows=DEFAULT_ROWS,
                   **env: str) -> Gate:
        allowlist = tmp_path / "allowlist.csv"
        write_allowlist(allowlist, allowlist_text(*rows))
        stats = stats_path or tmp_path / "data" / "stats.jsonl"
        spool = spool_dir or tmp_path / "spool"
        environ = {
            "LMGATE_AUTH__ALLOWLIST_PATH": str(allowlist),
            "LMGATE_AUTH__POLL_INTERVAL_SECONDS": "30",
            "LMGATE_STATS__OUTPUT_PATH": str(stats),
            "LMGATE_STATS__SPOOL_DIR": str(spool),
            "LMGATE_STATS__FLUSH_INTERVAL_SECONDS": "0.05",
            "LMGATE_STATS__CAPTURE_HEAD_BYTES": str(HEAD_BYTES),
            "LMGATE_STATS__CAPTURE_TAIL_BYTES": str(TAIL_BYTES),
            **env,
        }
        settings = load_settings(CONFIG, environ=environ)
        holder = AllowListHolder(settings.auth.allowlist_path, settings.auth.poll_interval_seconds)
        client = await aiohttp_client(create_app(settings, holder))
        return Gate(client, settings, holder, allowlist, stats, spool)

    return make


# ---------------------------------------------------------------- /auth

@pytest.mark.parametrize("headers,query,who,owner,key", [
    ({"Authorization": f"Bearer {KEY_ALICE}"}, None, "alice", "Alice Smith", KEY_ALICE),
    ({"x-api-key": KEY_BOB}, None, "bob", "Bob", KEY_BOB),              # listed in its sha256: form
    ({"x-goog-api-key": KEY_CAROL}, None, "carol", "Zoë Carol", KEY_CAROL),
    ({}, f"alt=sse&key={KEY_CAROL}", "carol", "Zoë Carol", KEY_CAROL),
    ({"Authorization": f"Bearer {KEY_ALICE}", "x-api-key": KEY_ALICE}, f"key={KEY_ALICE}",
     "alice", "Alice Smith", KEY_ALICE),
], ids=["bearer", "x-api-key", "x-goog-api-key", "query-key", "same-key-everywhere"])
async def test_auth_allows_listed_key(make_gate, headers, query, who, owner, key):
    gate = await make_gate()
    resp, body = await gate.auth(headers, query)
    assert resp.status == 200
    assert body == b""
    assert resp.headers["X-LMGate-ID"] == quote(who, safe="")
    assert resp.headers["X-LMGate-Owner"] == quote(owner, safe="@+")
    assert resp.headers["X-LMGate-Key"] == quote("..." + key[-6:], safe="")
    assert key not in str(resp.headers)
    assert "X-LMGate-Reason" not in resp.headers
    # nginx may use this yes one second past auth.cache_seconds while it asks again.
    assert resp.headers["Cache-Control"] == "stale-while-revalidate=1"


@pytest.mark.parametrize("headers,query,reason", [
    ({}, None, "no API key"),
    ({}, "alt=sse", "no API key"),
    ({"x-api-key": ""}, "key=", "no API key"),
    ({"Authorization": f"Bearer {KEY_UNKNOWN}"}, None, "not on the allow-list"),
    ({"x-api-key": hash_key(KEY_ALICE)}, None, "not on the allow-list"),   # the hash is not the key
    ({"Authorization": f"Bearer {KEY_ALICE}", "x-api-key": KEY_BOB}, None, "more than one"),
    ({"x-goog-api-key": KEY_CAROL}, f"key={KEY_ALICE}", "more than one"),
    ({"Authorization": f"Basic {KEY_ALICE}"}, None, "Bearer"),
    ({"Authorization": f"Bearer {KEY_ALICE} {KEY_BOB}"}, None, "Bearer"),
    ({"Authorization": "Bearer"}, None, "Bearer"),
], ids=["missing", "query-without-key", "empty", "unknown", "hash-form", "conflict", "conflict-query",
        "basic", "two-tokens", "empty-bearer"])
async def test_auth_denies(make_gate, headers, query, reason):
    gate = await make_gate()
    resp, body = await gate.auth(headers, query)
    assert resp.status == 403
    assert body == b""
    assert reason in resp.headers["X-LMGate-Reason"]
    assert "X-LMGate-ID" not in resp.headers and "X-LMGate-Owner" not in resp.headers
    assert "Cache-Control" not in resp.headers  # nothing that could make nginx keep a refusal
    for key in (KEY_ALICE, KEY_BOB, KEY_CAROL, KEY_UNKNOWN):
        assert key not in str(resp.headers)


async def test_auth_unknown_key_reports_masked_key(make_gate):
    gate = await make_gate()
    resp, _ = await gate.auth({"x-api-key": KEY_UNKNOWN})
    assert resp.status == 403
    assert resp.headers["X-LMGate-Key"] == quote("..." + KEY_UNKNOWN[-6:], safe="")


async def test_auth_ignores_client_sent_identity_headers(make_gate):
    gate = await make_gate()
    resp, _ = await gate.auth({"Authorization": f"Bearer {KEY_BOB}", "X-LMGate-ID": "alice",
                               "X-LMGate-Owner": "Alice Smith", "X-LMGate-Key": "...forged"})
    assert resp.status == 200
    assert resp.headers["X-LMGate-ID"] == "bob"
    assert resp.headers["X-LMGate-Owner"] == "Bob"
    assert resp.headers["X-LMGate-Key"] == quote("..." + KEY_BOB[-6:], safe="")
    resp, _ = await gate.auth({"x-api-key": KEY_UNKNOWN, "X-LMGate-ID": "alice"})
    assert resp.status == 403 and "X-LMGate-ID" not in resp.headers


@pytest.mark.parametrize("name,first,second", [
    ("Authorization", f"Bearer {KEY_ALICE}", f"Bearer {KEY_UNKNOWN}"),
    ("x-api-key", KEY_ALICE, KEY_UNKNOWN),
])
async def test_auth_denies_repeated_header_with_different_keys(make_gate, name, first, second):
    gate = await make_gate()
    resp = await gate.client.get("/auth", headers=CIMultiDict([(name, first), (name, second)]))
    assert resp.status == 403


async def test_auth_reads_key_only_from_the_query_of_the_uri(make_gate):
    gate = await make_gate()
    # nginx hands over the client's whole URI; "key=" in the path is not a key
    resp, _ = await gate.auth({}, None, path=f"/gemini/v1beta/files/key={KEY_CAROL}")
    assert resp.status == 403 and "no API key" in resp.headers["X-LMGate-Reason"]
    encoded = "".join(f"%{b:02X}" for b in KEY_CAROL.encode())
    resp, _ = await gate.auth({}, f"key={encoded}&alt=sse")
    assert resp.status == 200 and resp.headers["X-LMGate-ID"] == "carol"


async def test_auth_without_uri_header_uses_headers_only(make_gate):
    gate = await make_gate()
    resp = await gate.client.get("/auth", headers={"x-api-key": KEY_ALICE})
    assert resp.status == 200 and resp.headers["X-LMGate-ID"] == "alice"
    resp = await gate.client.get("/auth")
    assert resp.status == 403


async def test_auth_post_is_not_allowed(make_gate):
    gate = await make_gate()
    resp = await gate.client.post("/auth", headers={"x-api-key": KEY_ALICE})
    assert resp.status == 405


# ---------------------------------------------------------------- the spool

async def test_a_spool_line_becomes_a_record_on_disk(make_gate):
    gate = await make_gate()
    gate.write(call_line(rid="abc123"))
    [r] = await gate.wait_records(1)
    assert r["request_id"] == "abc123"
    assert r["lmgate_id"] == "alice" and r["owner"] == "Alice Smith" and r["masked_key"] == "...abcdef"
    assert r["endpoint"] == "/openai/v1/chat/completions"
    assert (r["model"], r["input_tokens"], r["output_tokens"], r["total_tokens"]) == ("gpt-4o-mini", 11, 3, 14)
    assert r["status"] == 200 and r["error_type"] is None
    code, body = await gate.readyz()
    assert code == 200 and body["ready"] is True
    assert body["spool_lines_read"] == 1 and body["spool_bad_lines"] == 0
    assert body["spool_backlog_bytes"] == 0
    assert body["stats_written"] == 1


async def test_every_outcome_becomes_one_record(make_gate):
    gate = await make_gate()
    stream = b"data: " + json.dumps({"model": "gpt-4o", "choices": []}).encode() + b"\n\n"
    gate.write(
        call_line(rid="answered"),
        call_line(rid="denied", s=403, err="forbidden", id="", own="", body=b"", n=151),
        call_line(rid="gate-down", s=403, err="gate_unavailable", id="", own="", mk="", body=b""),
        call_line(rid="client-gone", body=stream, ct="text/event-stream", done=False, last=False),
        call_line(rid="provider-cut", body=stream, ct="text/event-stream", last=False),
        call_line(rid="nginx-502", s=502, err="upstream_unreachable", body=b""),
        call_line(rid="rate-limited", s=429, body=b'{"error":{"message":"slow down"}}'),
    )
    records = {r["request_id"]: r for r in await gate.wait_records(7)}
    outcome = {rid: (r["status"], r["error_type"]) for rid, r in records.items()}
    assert outcome == {
        "answered": (200, None), "denied": (403, "forbidden"), "gate-down": (403, "gate_unavailable"),
        "client-gone": (499, "client_closed"), "provider-cut": (200, "upstream_unreachable"),
        "nginx-502": (502, "upstream_unreachable"), "rate-limited": (429, "rate_limited"),
    }
    assert records["denied"]["lmgate_id"] is None and records["denied"]["response_bytes"] == 151
    assert records["client-gone"]["model"] == "gpt-4o"


async def test_lines_across_slot_files_each_recorded_once_and_finished_files_deleted(make_gate):
    gate = await make_gate()
    now = slot()
    old1 = gate.write(*(call_line(rid=f"a{i}") for i in range(30)), slot_start=now - OLD - 10)
    old2 = gate.write(*(call_line(rid=f"b{i}") for i in range(30)), slot_start=now - OLD)
    current = gate.write(*(call_line(rid=f"c{i}") for i in range(40)))
    records = await gate.wait_records(100)
    assert len(records) == 100
    assert sorted(gate.rids()) == sorted([f"a{i}" for i in range(30)] + [f"b{i}" for i in range(30)]
                                         + [f"c{i}" for i in range(40)])
    # Slot order: the older files' lines come first.
    assert [r[0] for r in gate.rids()] == ["a"] * 30 + ["b"] * 30 + ["c"] * 40
    await wait_until_async(lambda: not old1.exists() and not old2.exists(), 5, "the old spool files' deletion")
    assert current.exists()                          # nginx may still be writing it
    assert spool_checkpoint(gate.spool) == {current.name: [current.stat().st_ino, current.stat().st_size]}
    await asyncio.sleep(0.2)                         # a few more flushes: nothing comes twice
    assert len(gate.records()) == 100


async def test_usage_at_the_tail_of_a_capture_at_the_size_limit(make_gate):
    gate = await make_gate()
    events = [{"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o",
               "choices": [{"index": 0, "delta": {"content": "x" * 40}}]}] * 200
    events.append({"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o", "choices": [],
                   "usage": {"prompt_tokens": 5, "completion_tokens": 200, "total_tokens": 205}})
    stream = "".join(f"data: {json.dumps(e)}\n\n" for e in events).encode() + b"data: [DONE]\n\n"
    assert len(stream) > HEAD_BYTES + TAIL_BYTES
    gate.write(call_line(rid="s1", body=stream, ct="text/event-stream", t="3.0"))
    [r] = await gate.wait_records(1)
    assert r["stream"] is True and r["model"] == "gpt-4o"
    assert (r["input_tokens"], r["output_tokens"]) == (5, 200)
    assert r["response_bytes"] == len(stream)


async def test_calls_made_while_the_sidecar_was_down_are_recorded_when_it_starts(make_gate, tmp_path):
    spool = tmp_path / "spool"
    now = slot()
    append(spool_file(spool, now - OLD), b"".join(call_line(rid=f"down{i}") + b"\n" for i in range(40)))
    append(spool_file(spool, now), b"".join(call_line(rid=f"now{i}") + b"\n" for i in range(10)))
    gate = await make_gate(spool_dir=spool)
    await gate.wait_records(50)
    assert sorted(gate.rids()) == sorted([f"down{i}" for i in range(40)] + [f"now{i}" for i in range(10)])
    await wait_until_async(lambda: not spool_file(spool, now - OLD).exists(), 5, "the old spool file's deletion")


async def test_a_partial_line_waits_for_its_end(make_gate):
    gate = await make_gate()
    line = call_line(rid="torn")
    path = gate.write(call_line(rid="before"))
    append(path, line[:40])                          # nginx is halfway through its write
    await gate.wait_rid("before")
    code, body = await gate.wait_ready(lambda c, b: b["spool_backlog_bytes"] == 40)
    assert body["spool_backlog_bytes"] == 40 and body["spool_lines_read"] == 1
    assert code == 200                               # a line being written is no problem
    append(path, line[40:] + b"\n")
    await gate.wait_rid("torn")
    assert gate.rids() == ["before", "torn"]
    code, body = await gate.wait_ready(lambda c, b: b["spool_backlog_bytes"] == 0)
    assert body["spool_lines_read"] == 2 and body["spool_backlog_bytes"] == 0


async def test_bad_lines_are_counted_and_never_stop_the_next(make_gate, caplog):
    gate = await make_gate()
    bad = [b"garbage " + KEY_UNKNOWN.encode(), b"{", b"[1,2,3]", b"\xff\xfe\x00",
           b'{"rid":"surrogate-\\ud800","s":"200"}',
           call_line(rid="torn").partition(b"\t")[0][:-3]]
    with caplog.at_level(logging.ERROR):
        for i, line in enumerate(bad):
            gate.write(line, call_line(rid=f"good{i}"))
        await gate.wait_records(len(bad))
        code, body = await gate.wait_ready(lambda c, b: b["spool_bad_lines"] == len(bad))
    assert gate.rids() == [f"good{i}" for i in range(len(bad))]
    assert body["spool_bad_lines"] == len(bad) and body["spool_lines_read"] == 2 * len(bad)
    assert code == 200 and body["ready"] is True     # bad lines are counted, not a problem
    assert sum("spool: cannot read the line" in r.getMessage() for r in caplog.records) == len(bad)
    assert KEY_UNKNOWN not in caplog.text


async def test_reader_survives_a_line_that_cannot_be_turned_into_a_record(make_gate, monkeypatch, caplog):
    import lmgate.records
    real = lmgate.records.from_meta

    def flaky(meta, body, received_at):
        if meta["rid"] == "boom":
            raise RuntimeError("unreadable line")
        return real(meta, body, received_at)

    monkeypatch.setattr(lmgate.records, "from_meta", flaky)
    gate = await make_gate()
    with caplog.at_level(logging.ERROR, logger="lmgate.spool"):
        for i in range(3):
            gate.write(call_line(rid="boom"), call_line(rid=f"good{i}"))
        await gate.wait_records(3)
    assert gate.rids() == ["good0", "good1", "good2"]
    assert sum("unreadable line" in r.getMessage() for r in caplog.records) == 3
    _, body = await gate.readyz()
    assert body["spool_bad_lines"] == 3


async def test_unknown_paths_are_404(make_gate):
    gate = await make_gate()
    for method, path in (("POST", "/nope?rid=x"), ("GET", "/auth/x"), ("GET", "/")):
        resp = await gate.client.request(method, path, data=OPENAI_BODY)
        assert resp.status == 404, (method, path)


async def test_readyz_503_when_the_spool_folder_cannot_be_made_and_recovers(make_gate, tmp_path):
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the spool's parent folder should be")
    gate = await make_gate(spool_dir=blocker / "spool")
    code, body = await gate.wait_ready(lambda c, b: c == 503 and any("cannot read" in p for p in b["problems"]))
    assert code == 503 and body["ready"] is False
    assert any(p.startswith("spool:") and "cannot read the spool folder" in p for p in body["problems"])
    blocker.unlink()
    (blocker / "spool").mkdir(parents=True)
    gate.write(call_line(rid="after"))
    await gate.wait_rid("after")
    code, body = await gate.wait_ready(lambda c, b: c == 200)
    assert code == 200 and body["problems"] == []


async def test_readyz_503_when_the_reader_has_stopped(make_gate, monkeypatch):
    async def gives_up(app):
        return None

    monkeypatch.setattr(lmgate.pipeline, "read_spool", gives_up)
    gate = await make_gate()
    code, body = await gate.wait_ready(lambda c, b: c == 503)
    assert code == 503
    assert "spool: the reader has stopped" in body["problems"]


async def test_reading_pauses_while_too_many_records_wait_for_the_disk(make_gate, tmp_path, monkeypatch):
    """While the stats disk refuses writes, the lines wait in the spool, not in memory."""
    monkeypatch.setattr(lmgate.pipeline, "MAX_PENDING_RECORDS", 10)
    monkeypatch.setattr(lmgate.pipeline, "BATCH", 5)
    blocker = tmp_path / "blocked"
    blocker.write_text("")
    gate = await make_gate(stats_path=blocker / "stats.jsonl")
    gate.write(*(call_line(rid=f"w{i}") for i in range(60)))
    code, body = await gate.wait_ready(lambda c, b: b["stats_buffered"] >= 10)
    await asyncio.sleep(0.2)
    code, body = await gate.readyz()
    assert code == 503
    assert 10 <= body["stats_buffered"] < 15 and body["spool_lines_read"] == body["stats_buffered"]
    assert body["spool_backlog_bytes"] > 0
    blocker.unlink()                                 # the disk takes writes again
    await gate.wait_records(60)
    assert sorted(gate.rids()) == sorted(f"w{i}" for i in range(60))


# ---------------------------------------------------------------- the stats disk, restarts

async def test_readyz_503_after_stats_write_fails_and_recovers(make_gate, tmp_path):
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the stats folder should be")
    gate = await make_gate(stats_path=blocker / "stats.jsonl")
    gate.write(call_line(rid="kept"))
    code, body = await gate.wait_ready(lambda c, b: c == 503 and b["stats_buffered"] == 1)
    assert code == 503
    assert body["ready"] is False
    assert any("stats" in p for p in body["problems"])
    assert body["stats_buffered"] == 1
    # Nothing is on disk, so the spool must not forget the line.
    assert not (gate.spool / CHECKPOINT_NAME).exists()

    blocker.unlink()                               # the cause is gone: writing resumes by itself
    records = await gate.wait_records(1)
    assert [r["request_id"] for r in records] == ["kept"]
    code, body = await gate.wait_ready(lambda c, b: c == 200)
    assert code == 200 and body["ready"] is True and body["stats_written"] == 1
    await wait_until_async(lambda: (gate.spool / CHECKPOINT_NAME).exists(), 5, "the checkpoint")


async def test_readyz_503_at_once_when_stats_folder_is_a_file(make_gate, tmp_path):
    blocker = tmp_path / "blocked"
    blocker.write_text("")
    gate = await make_gate(stats_path=blocker / "stats.jsonl")
    resp = await gate.client.get("/readyz")
    assert resp.status == 503


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
async def test_readyz_503_when_stats_folder_read_only(make_gate, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        gate = await make_gate(stats_path=folder / "stats.jsonl")
        resp = await gate.client.get("/readyz")
        assert resp.status == 503
    finally:
        folder.chmod(0o700)


async def test_a_restart_records_each_line_once(make_gate):
    first = await make_gate()
    first.write(*(call_line(rid=f"one{i}") for i in range(20)))
    await first.wait_records(20)
    await first.client.close()                       # flushes, saves the checkpoint
    second = await make_gate()
    second.write(*(call_line(rid=f"two{i}") for i in range(10)))
    await second.wait_records(30)
    await asyncio.sleep(0.2)
    assert sorted(second.rids()) == sorted([f"one{i}" for i in range(20)] + [f"two{i}" for i in range(10)])


async def test_lines_whose_records_never_reached_disk_are_recorded_after_a_restart(make_gate, tmp_path):
    """The stats disk refuses writes until the sidecar stops: the calls stay in the spool, and the
    next start records them."""
    stats_folder = tmp_path / "stats"
    stats_folder.write_text("not a folder")
    first = await make_gate(stats_path=stats_folder / "stats.jsonl")
    first.write(*(call_line(rid=f"held{i}") for i in range(25)))
    await first.wait_ready(lambda c, b: b["spool_lines_read"] == 25)
    await first.client.close()                       # the final flush fails too
    assert not (first.spool / CHECKPOINT_NAME).exists()
    stats_folder.unlink()
    second = await make_gate(stats_path=stats_folder / "stats.jsonl")
    await second.wait_records(25)
    await asyncio.sleep(0.2)
    assert sorted(second.rids()) == sorted(f"held{i}" for i in range(25))


async def test_killed_between_a_flush_and_its_checkpoint_records_nothing_twice(make_gate):
    """The lines after the last checkpoint come again at the next start; those whose records were
    already flushed (past the checkpoint's mark of the stats file) are skipped."""
    first = await make_gate()
    first.write(*(call_line(rid=f"a{i}") for i in range(10)))
    await first.wait_records(10)
    checkpoint = first.spool / CHECKPOINT_NAME
    await wait_until_async(lambda: checkpoint.exists() and STATS_MARK in json.loads(checkpoint.read_text()), 5,
                           "the stats file's mark in the checkpoint")
    old = checkpoint.read_bytes()
    first.write(*(call_line(rid=f"b{i}") for i in range(15)))
    await first.wait_records(25)
    await first.client.close()
    checkpoint.write_bytes(old)                      # as if killed before the second checkpoint
    second = await make_gate()
    second.write(*(call_line(rid=f"c{i}") for i in range(5)))
    await second.wait_records(30)
    await asyncio.sleep(0.2)
    assert sorted(second.rids()) == sorted([f"a{i}" for i in range(10)] + [f"b{i}" for i in range(15)]
                                           + [f"c{i}" for i in range(5)])


async def test_records_reach_the_disk_in_pieces_before_the_interval_under_load(make_gate, monkeypatch):
    """A long flush interval does not hold a busy sidecar's records until it is up: past
    FLUSH_BYTES they are written, and the spool's checkpoint follows."""
    monkeypatch.setattr(lmgate.writer, "FLUSH_BYTES", 20_000)
    gate = await make_gate(LMGATE_STATS__FLUSH_INTERVAL_SECONDS="3600")
    n = 300  # ~130 KB of records
    lines = [call_line(rid=f"p{i}") for i in range(n)]
    gate.write(*lines)
    _, body = await gate.wait_ready(lambda c, b: b["spool_lines_read"] == n)
    on_disk = gate.rids()
    assert len(on_disk) >= lmgate.pipeline.BATCH, f"only {len(on_disk)} of {n} records on disk"
    assert on_disk == [f"p{i}" for i in range(len(on_disk))]
    assert body["stats_buffered"] == n - len(on_disk)
    # The checkpoint is where the flushed records' lines end, not beyond.
    [(_, (_, offset))] = spool_checkpoint(gate.spool).items()
    assert offset == sum(len(line) + 1 for line in lines[:len(on_disk)])


async def test_graceful_shutdown_writes_every_line_read(make_gate):
    gate = await make_gate(LMGATE_STATS__FLUSH_INTERVAL_SECONDS="3600")
    n = 300
    gate.write(*(call_line(rid=f"q{i}") for i in range(n)))
    await gate.wait_ready(lambda c, b: b["spool_lines_read"] == n)
    assert gate.records() == []           # nothing flushed yet: the interval is an hour
    await gate.client.close()             # runs the app's cleanup: read the spool, flush the writer
    assert sorted(gate.rids()) == sorted(f"q{i}" for i in range(n))
    [(name, (_, offset))] = spool_checkpoint(gate.spool).items()
    assert offset == (gate.spool / name).stat().st_size
    stats = gate.stats.stat()
    assert json.loads((gate.spool / CHECKPOINT_NAME).read_text())[STATS_MARK] == [stats.st_ino, stats.st_size]


async def test_shutdown_reads_the_lines_the_reader_has_not_reached(make_gate, monkeypatch):
    async def stalled_reader(app):       # the reader is behind: nothing has been read
        await asyncio.Event().wait()

    monkeypatch.setattr(lmgate.pipeline, "read_spool", stalled_reader)
    gate = await make_gate(LMGATE_STATS__FLUSH_INTERVAL_SECONDS="3600")
    gate.write(*(call_line(rid=f"d{i}") for i in range(50)))
    _, ready = await gate.readyz()
    assert ready["spool_lines_read"] == 0 and ready["spool_backlog_bytes"] > 0
    await gate.client.close()
    assert sorted(gate.rids()) == sorted(f"d{i}" for i in range(50))


async def test_a_backlog_file_is_recorded_whole_when_a_flush_comes_between_two_batches(make_gate, monkeypatch):
    """After downtime the spool holds finished files; the reader takes them 128 lines at a time and
    the writer flushes in between. Every line must still be recorded."""
    async def one_batch_then_behind(app):
        while not app[SPOOL].read(lmgate.pipeline.BATCH):
            await asyncio.sleep(0.01)
        await asyncio.Event().wait()

    monkeypatch.setattr(lmgate.pipeline, "read_spool", one_batch_then_behind)
    n = 3 * lmgate.pipeline.BATCH
    gate = await make_gate()
    path = gate.write(*(call_line(rid=f"late{i}") for i in range(n)), slot_start=slot() - OLD)
    records = await gate.wait_records(lmgate.pipeline.BATCH)
    assert len(records) == lmgate.pipeline.BATCH
    await asyncio.sleep(0.2)                         # several flushes, each followed by a commit
    await gate.client.close()                        # shutdown reads the rest of the spool
    recorded = len(set(gate.rids()))
    assert recorded == n, f"{n - recorded} of {n} lines lost (file deleted: {not path.exists()})"


# ---------------------------------------------------------------- /livez, /readyz, hot reload

async def test_livez(make_gate):
    gate = await make_gate()
    resp = await gate.client.get("/livez")
    assert resp.status == 200 and await resp.text() == "ok\n"


async def test_readyz_ready(make_gate):
    gate = await make_gate()
    resp = await gate.client.get("/readyz")
    assert resp.status == 200
    body = await resp.json()
    assert body["ready"] is True and body["problems"] == []
    assert body["allowlist_keys"] == 3
    assert (body["spool_lines_read"], body["spool_bad_lines"], body["spool_backlog_bytes"]) == (0, 0, 0)


async def test_readyz_503_while_allowlist_edit_is_bad_old_list_serves(make_gate):
    gate = await make_gate()
    write_allowlist(gate.allowlist, allowlist_text(("alice", KEY_ALICE, "A"), ("alice", KEY_BOB, "B")), 5)
    assert gate.holder.check() is False
    resp = await gate.client.get("/readyz")
    assert resp.status == 503
    body = await resp.json()
    assert any("allow-list" in p and ":3:" in p for p in body["problems"])
    resp, _ = await gate.auth({"x-api-key": KEY_BOB})
    assert resp.status == 200 and resp.headers["X-LMGate-ID"] == "bob"   # previous list in force


async def test_hot_reload_through_check(make_gate):
    gate = await make_gate()
    new_key = "sk-proj-dave-abcdefabcdef0000"
    write_allowlist(gate.allowlist, allowlist_text(("bob", hash_key(KEY_BOB), "Bob"), ("dave", new_key, "Dave")), 5)
    assert gate.holder.check() is True
    resp, _ = await gate.auth({"Authorization": f"Bearer {new_key}"})
    assert resp.status == 200 and resp.headers["X-LMGate-ID"] == "dave"
    resp, _ = await gate.auth({"Authorization": f"Bearer {KEY_ALICE}"})
    assert resp.status == 403
    resp = await gate.client.get("/readyz")
    assert (await resp.json())["allowlist_keys"] == 2


async def test_hot_reload_by_the_poller(make_gate):
    gate = await make_gate(LMGATE_AUTH__POLL_INTERVAL_SECONDS="0.05")
    new_key = "sk-proj-erin-0000aaaa1111bbbb"
    write_allowlist(gate.allowlist, allowlist_text(("erin", new_key, "Erin")), 5)

    async def allowed():
        resp, _ = await gate.auth({"x-api-key": new_key})
        return resp.status == 200

    await wait_until_async(allowed, 5, "the new key to be allowed", interval=0.05)
    resp, _ = await gate.auth({"x-api-key": KEY_ALICE})
    assert resp.status == 403


async def test_bad_edit_then_good_edit_through_the_app(make_gate):
    gate = await make_gate()
    write_allowlist(gate.allowlist, "id,key\n", 8)
    gate.holder.check()
    assert (await gate.client.get("/readyz")).status == 503
    write_allowlist(gate.allowlist, allowlist_text(("alice", KEY_ALICE, "Alice")), 4)
    assert gate.holder.check() is True
    assert (await gate.client.get("/readyz")).status == 200
    resp, _ = await gate.auth({"x-api-key": KEY_BOB})
    assert resp.status == 403


async def test_stats_to_stdout_records_on_fd_1_checkpoint_follows_no_folder_asked(make_gate, tmp_path,
                                                                                  capfd, monkeypatch):
    """stats.output_path "-": records go to fd 1 as JSON lines, the spool is committed after each
    batch, and /readyz asks for no stats folder (in a pod the working folder is read-only)."""
    asked = []
    monkeypatch.setattr(lmgate.app, "_writable_folder",
                        lambda folder: asked.append(Path(folder)) or Path(folder) != Path("."))
    monkeypatch.chdir(tmp_path)
    gate = await make_gate(stats_path=Path("-"))
    assert gate.settings.stats.output_path == Path("-")
    capfd.readouterr()
    path = gate.write(call_line(rid="out-1"), call_line(rid="out-2"))
    size = path.stat().st_size

    def shipped() -> list[dict]:
        shipped.lines += capfd.readouterr().out.splitlines()
        return [json.loads(line) for line in shipped.lines]
    shipped.lines = []
    await wait_until_async(lambda: len(shipped()) >= 2, 5, "two records on stdout")
    assert [r["request_id"] for r in shipped()] == ["out-1", "out-2"]
    # Committed once written: the checkpoint has read the spool file to its end.
    def committed() -> bool:
        try:
            return spool_checkpoint(gate.spool).get(path.name, [0, 0])[1] == size
        except FileNotFoundError:
            return False
    await wait_until_async(committed, 5, "the checkpoint to mark the spool file read")
    code, body = await gate.readyz()
    assert code == 200 and body["problems"] == [] and body["stats_written"] == 2
    assert Path(".") not in asked
    assert not (tmp_path / "-").exists()
