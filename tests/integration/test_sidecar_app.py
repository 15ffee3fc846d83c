"""The sidecar app through aiohttp's test client: /auth, /stats, /livez, /readyz, reload, shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import given, settings as hsettings, strategies as st
from multidict import CIMultiDict
from yarl import URL

from lmgate.allowlist import AllowListHolder, hash_key
from lmgate.app import create_app
from lmgate.settings import load_settings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config" / "lmgate.yaml"

KEY_ALICE = "sk-proj-alice-0123456789abcdef"
KEY_BOB = "sk-ant-bob-fedcba9876543210"
KEY_CAROL = "AIzaSyCarol-000111222333444"
KEY_UNKNOWN = "sk-proj-mallory-999999999999"
HEAD_BYTES, TAIL_BYTES = 1024, 2048

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


def report_query(rid: str = "r1", id: str = "alice", owner: str = "Alice Smith", status: int = 200,
                 body: bytes = OPENAI_BODY, t: str = "0.250", ts: str | None = None) -> str:
    """The metadata lmgate.js sends with its POST /stats."""
    ts = ts or f"{time.time():.3f}"
    return (f"rid={rid}&id={quote(id, safe='')}&own={quote(owner, safe='')}&mk=...abcdef&p=openai&m=POST"
            f"&u=%2Fopenai%2Fv1%2Fchat%2Fcompletions&s={status}&ct=application%2Fjson&t={t}&ts={ts}"
            f"&h={len(body)}&n={len(body)}")


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "torn line in the stats file"
    return [json.loads(line) for line in data.splitlines()]


async def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(interval)


class Gate:
    """One sidecar app under test, its files and its test client."""

    def __init__(self, client, settings, holder, allowlist: Path, stats: Path):
        self.client, self.settings, self.holder = client, settings, holder
        self.allowlist, self.stats = allowlist, stats

    def records(self) -> list[dict]:
        return read_records(self.stats)

    async def wait_records(self, n: int, timeout: float = 5.0) -> list[dict]:
        await wait_for(lambda: len(self.records()) >= n, timeout)
        return self.records()

    async def auth(self, headers=None, query: str | None = None,
                   path: str = "/gemini/v1beta/models/gemini-2.0-flash:generateContent"):
        """GET /auth as nginx's auth subrequest sends it: the client's headers plus its URI."""
        hdrs = CIMultiDict(headers or {})
        hdrs["X-LMGate-Query"] = path if query is None else f"{path}?{query}"
        resp = await self.client.get("/auth", headers=hdrs)
        body = await resp.read()
        return resp, body

    async def post_stats(self, query: str, body: bytes = OPENAI_BODY):
        url = URL(f"http://{self.client.host}:{self.client.port}/stats?{query}", encoded=True)
        async with self.client.session.post(url, data=body,
                                            headers={"Content-Type": "application/octet-stream"}) as resp:
            await resp.read()
            return resp.status


@pytest.fixture
def make_gate(tmp_path, aiohttp_client):
    """make_gate(env overrides..., stats_path=...) -> Gate with a running app."""
    async def make(*, stats_path: Path | None = None, rows=DEFAULT_ROWS, **env: str) -> Gate:
        allowlist = tmp_path / "allowlist.csv"
        write_allowlist(allowlist, allowlist_text(*rows))
        stats = stats_path or tmp_path / "data" / "stats.jsonl"
        environ = {
            "LMGATE_AUTH__ALLOWLIST_PATH": str(allowlist),
            "LMGATE_AUTH__POLL_INTERVAL_SECONDS": "30",
            "LMGATE_STATS__OUTPUT_PATH": str(stats),
            "LMGATE_STATS__FLUSH_INTERVAL_SECONDS": "0.05",
            "LMGATE_STATS__CAPTURE_HEAD_BYTES": str(HEAD_BYTES),
            "LMGATE_STATS__CAPTURE_TAIL_BYTES": str(TAIL_BYTES),
            **env,
        }
        settings = load_settings(CONFIG, environ=environ)
        holder = AllowListHolder(settings.auth.allowlist_path, settings.auth.poll_interval_seconds)
        app = create_app(settings, holder, listen_fallback=False)
        client = await aiohttp_client(app)
        return Gate(client, settings, holder, allowlist, stats)

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
    assert resp.headers["X-LMGate-Owner"] == quote(owner, safe="")
    assert resp.headers["X-LMGate-Key"] == quote("..." + key[-6:], safe="")
    assert key not in str(resp.headers)
    assert "X-LMGate-Reason" not in resp.headers


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


# ---------------------------------------------------------------- /stats

async def test_stats_answers_204_and_the_record_reaches_disk(make_gate):
    gate = await make_gate()
    started = time.monotonic()
    status = await gate.post_stats(report_query(rid="abc123", owner="Alice Smith"))
    assert status == 204
    assert time.monotonic() - started < 1.0
    records = await gate.wait_records(1)
    assert len(records) == 1
    r = records[0]
    assert r["request_id"] == "abc123"
    assert r["lmgate_id"] == "alice" and r["owner"] == "Alice Smith"
    assert r["endpoint"] == "/openai/v1/chat/completions"
    assert (r["model"], r["input_tokens"], r["output_tokens"], r["total_tokens"]) == ("gpt-4o-mini", 11, 3, 14)
    assert r["status"] == 200 and r["error_type"] is None


async def test_stats_response_has_no_body(make_gate):
    gate = await make_gate()
    resp = await gate.client.post("/stats?" + report_query(), data=OPENAI_BODY)
    assert resp.status == 204
    assert await resp.read() == b""


async def test_stats_many_reports_each_recorded_once(make_gate):
    gate = await make_gate()
    statuses = await asyncio.gather(*(gate.post_stats(report_query(rid=f"r{i}")) for i in range(100)))
    assert set(statuses) == {204}
    records = await gate.wait_records(100)
    assert sorted(r["request_id"] for r in records) == sorted(f"r{i}" for i in range(100))


async def test_stats_head_tail_capture_at_the_size_limit(make_gate):
    gate = await make_gate()
    events = [{"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o",
               "choices": [{"index": 0, "delta": {"content": "x" * 40}}]}] * 200
    events.append({"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o", "choices": [],
                   "usage": {"prompt_tokens": 5, "completion_tokens": 200, "total_tokens": 205}})
    stream = "".join(f"data: {json.dumps(e)}\n\n" for e in events).encode() + b"data: [DONE]\n\n"
    assert len(stream) > HEAD_BYTES + TAIL_BYTES
    captured = stream[:HEAD_BYTES] + stream[-TAIL_BYTES:]
    q = (f"rid=s1&id=alice&own=Alice&mk=...abcdef&p=openai&m=POST&u=%2Fopenai%2Fv1%2Fchat%2Fcompletions"
         f"&s=200&ct=text%2Fevent-stream&t=3.0&ts={time.time():.3f}&h={HEAD_BYTES}&n={len(stream)}")
    assert await gate.post_stats(q, captured) == 204
    [r] = await gate.wait_records(1)
    assert r["stream"] is True and r["model"] == "gpt-4o"
    assert (r["input_tokens"], r["output_tokens"]) == (5, 200)
    assert r["response_bytes"] == len(stream)


# ---------------------------------------------------------------- /livez, /readyz

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


async def test_readyz_503_after_stats_write_fails_and_recovers(make_gate, tmp_path):
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the stats folder should be")
    gate = await make_gate(stats_path=blocker / "stats.jsonl")
    assert await gate.post_stats(report_query(rid="kept")) == 204

    async def status():
        resp = await gate.client.get("/readyz")
        return resp.status, await resp.json()

    deadline = time.monotonic() + 5
    code, body = await status()
    while code != 503 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        code, body = await status()
    assert code == 503
    assert body["ready"] is False
    assert any("stats" in p for p in body["problems"])
    assert body["stats_buffered"] == 1

    blocker.unlink()                               # the cause is gone: writing resumes by itself
    records = await gate.wait_records(1)
    assert [r["request_id"] for r in records] == ["kept"]
    code, body = await status()
    assert code == 200 and body["ready"] is True and body["stats_written"] == 1


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


# ---------------------------------------------------------------- hot reload

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

    deadline = time.monotonic() + 5
    ok = await allowed()
    while not ok and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        ok = await allowed()
    assert ok
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


# ---------------------------------------------------------------- shutdown

async def test_graceful_shutdown_writes_every_queued_report(make_gate):
    gate = await make_gate(LMGATE_STATS__FLUSH_INTERVAL_SECONDS="3600")
    n = 300
    statuses = await asyncio.gather(*(gate.post_stats(report_query(rid=f"q{i}")) for i in range(n)))
    assert statuses == [204] * n
    assert gate.records() == []           # nothing flushed yet: the interval is an hour
    await gate.client.close()             # runs the app's cleanup: drain the queue, flush the writer
    records = gate.records()
    assert len(records) == n
    assert sorted(r["request_id"] for r in records) == sorted(f"q{i}" for i in range(n))


async def test_shutdown_drains_reports_the_worker_has_not_reached(make_gate, monkeypatch):
    import lmgate.app

    async def stalled_worker(app):       # the worker is behind: everything is still queued
        await asyncio.Event().wait()

    monkeypatch.setattr(lmgate.app, "_work", stalled_worker)
    gate = await make_gate(LMGATE_STATS__FLUSH_INTERVAL_SECONDS="3600")
    for i in range(50):
        assert await gate.post_stats(report_query(rid=f"d{i}")) == 204
    ready = await (await gate.client.get("/readyz")).json()
    assert ready["stats_buffered"] == 0
    await gate.client.close()
    assert sorted(r["request_id"] for r in gate.records()) == sorted(f"d{i}" for i in range(50))


# ---------------------------------------------------------------- hostile reports

HOSTILE_QUERIES = [
    "", "&&&", "=", "s=abc&n=-5&h=99999999999&t=x&ts=y", "p=../../etc&u=%ZZ%", "u=%00%ff%fe&ct=%",
    "s=99999999999999999999999&n=1e9", "h=-1&n=5", "id=%E2%28%A1&own=%C0%AF",
    "p=google&u=%2Fgoogle%2Fmodels%2F%3A%3A&s=200", "a" * 4000, "rid=" + "%" * 1000,
    "t=nan&ts=nan", "t=inf&s=200", "ts=1e300", "ts=-1e300&t=1e308",
]


async def test_hostile_reports_never_5xx_and_worker_survives(make_gate, caplog):
    gate = await make_gate()
    bodies = [b"", b"\x00" * 100, bytes(range(256)) * 8, b"{" * 3000, b"data: {\n\n" * 200, b"[" * 5000]
    with caplog.at_level(logging.ERROR):
        for q in HOSTILE_QUERIES:
            for body in bodies:
                status = await gate.post_stats(q, body)
                assert status == 204, (q[:50], body[:20])
        assert await gate.post_stats(report_query(rid="after-hostile")) == 204
        records = await wait_for_rid(gate, "after-hostile")
    assert "after-hostile" in [r["request_id"] for r in records]
    assert (await gate.client.get("/livez")).status == 200


async def test_worker_survives_a_report_that_cannot_be_read(make_gate, monkeypatch, caplog):
    import lmgate.records
    real = lmgate.records.from_capture

    def flaky(query, body, received_at):
        if "rid=boom" in query:
            raise RuntimeError("unreadable report")
        return real(query, body, received_at)

    monkeypatch.setattr(lmgate.records, "from_capture", flaky)
    gate = await make_gate()
    with caplog.at_level(logging.ERROR, logger="lmgate.sidecar"):
        for i in range(3):
            assert await gate.post_stats(report_query(rid="boom")) == 204
            assert await gate.post_stats(report_query(rid=f"good{i}")) == 204
        records = await gate.wait_records(3)
    assert sorted(r["request_id"] for r in records) == ["good0", "good1", "good2"]
    assert sum("could not turn" in r.getMessage() for r in caplog.records) == 3


async def wait_for_rid(gate: Gate, rid: str) -> list[dict]:
    await wait_for(lambda: any(r["request_id"] == rid for r in gate.records()))
    return gate.records()


async def test_oversize_report_is_413_and_gate_keeps_working(make_gate):
    gate = await make_gate()
    limit = HEAD_BYTES + TAIL_BYTES + 4096
    status = await gate.post_stats(report_query(rid="too-big"), b"x" * (limit + 1))
    assert status == 413
    assert await gate.post_stats(report_query(rid="just-fits"), OPENAI_BODY + b" " * (limit - len(OPENAI_BODY))) == 204
    assert await gate.post_stats(report_query(rid="normal")) == 204
    records = await wait_for_rid(gate, "normal")
    rids = [r["request_id"] for r in records]
    assert "too-big" not in rids and "just-fits" in rids


async def test_raw_bytes_in_request_line_never_5xx(make_gate):
    gate = await make_gate()
    for target in (b"/stats?\xff\xfe\x00=1", b"/stats?%%%%", b"/stats?u=\xc3\x28&s=\xe2\x82",
                   b"/stats?" + b"k=v&" * 1000):
        reader, writer = await asyncio.open_connection(gate.client.host, gate.client.port)
        writer.write(b"POST " + target + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                     b"Connection: close\r\n\r\nabc")
        await writer.drain()
        line = await reader.readline()
        writer.close()
        parts = line.split()
        assert parts and parts[0].startswith(b"HTTP/1."), line
        assert not parts[1].startswith(b"5"), line
    assert await gate.post_stats(report_query(rid="after-raw")) == 204
    await wait_for_rid(gate, "after-raw")


query_text = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="#"), max_size=200),
    st.lists(st.tuples(st.sampled_from(["rid", "id", "own", "mk", "p", "m", "u", "s", "ct", "t", "ts", "h", "n",
                                        "x", ""]),
                       st.text(max_size=30).map(lambda s: quote(s, safe=""))), max_size=14)
    .map(lambda kv: "&".join(f"{k}={v}" for k, v in kv)),
)


async def test_hypothesis_queries_never_5xx(make_gate):
    gate = await make_gate()
    drawn: list[tuple[str, bytes]] = []

    @hsettings(max_examples=150, deadline=None, database=None)
    @given(query_text, st.binary(max_size=300))
    def draw(q, body):
        drawn.append((q, body))

    draw()
    for q, body in drawn:
        status = await gate.post_stats(q, body)
        assert status == 204, q
    assert await gate.post_stats(report_query(rid="after-fuzz")) == 204
    records = await wait_for_rid(gate, "after-fuzz")
    assert any(r["request_id"] == "after-fuzz" for r in records)
    resp = await gate.client.get("/readyz")
    assert resp.status == 200
