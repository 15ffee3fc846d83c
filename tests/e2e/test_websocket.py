"""WebSocket APIs through LMGate: the upgrade is checked like any call, relayed by the sidecar to the
provider (tests/support/ws_upstream.py, written from each API's documentation), every frame passes
unchanged both ways, and each response leaves one record."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess

import aiohttp
import httpx
import pytest

from tests.support.gate import ALICE_KEY, UNLISTED_KEY, Gate
from tests.support.ws_upstream import LIVE_USAGE, REALTIME_USAGE, WSUpstream

pytestmark = pytest.mark.e2e

LIVE_PATH = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"


@pytest.fixture(scope="module")
def ws_mock():
    mock = WSUpstream().start()
    yield mock
    mock.stop()


@pytest.fixture(scope="module")
def ws_gate(ws_mock, tmp_path_factory):
    gate = Gate(tmp_path_factory.mktemp("wsgate"), ws_mock.url).start()
    yield gate
    gate.stop()


def ws_url(gate: Gate, provider: str, path: str) -> str:
    return f"ws://127.0.0.1:{gate.port}/{provider}{path}"


async def _session(url: str, key: str = ALICE_KEY, headers: dict | None = None, script=None):
    """Connects, runs `script(ws)` and returns what it returns."""
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url, headers={"Authorization": f"Bearer {key}", **(headers or {})}) as ws:
            return await script(ws)


def run(url: str, script, **kwargs):
    return asyncio.run(_session(url, script=script, **kwargs))


async def _until(ws, done) -> list:
    """Messages until one satisfies done(doc) (included)."""
    got = []
    async for msg in ws:
        got.append(msg.data)
        if done(json.loads(msg.data)):
            return got
    return got


def responses_turn(model: str, until=("response.completed", "response.failed", "error")):
    async def script(ws):
        await ws.send_str(json.dumps({"type": "response.create", "model": model, "input": "hi"}))
        return await _until(ws, lambda d: d.get("type") in until)
    return script


def test_responses_websocket_one_record_per_response_with_the_frames_unchanged(ws_gate, ws_mock):
    async def two(ws):
        got = []
        for _ in range(2):
            await ws.send_str(json.dumps({"type": "response.create", "model": "gpt-5", "input": "hi"}))
            got += await _until(ws, lambda d: d.get("type") == "response.completed")
        return got

    mark = ws_gate.mark()
    sent_before = len(ws_mock.sent)
    got = run(ws_url(ws_gate, "openai", "/v1/responses"), two,
              headers={"OpenAI-Beta": "responses_websockets=2026-02-06"})
    assert got == ws_mock.sent[sent_before:]          # every frame, byte for byte, in order
    assert ws_mock.handshakes[-1]["headers"]["OpenAI-Beta"] == "responses_websockets=2026-02-06"
    assert ws_mock.handshakes[-1]["headers"]["Authorization"] == f"Bearer {ALICE_KEY}"
    records = ws_gate.new_records(mark, 2)
    for n, r in enumerate(records, 1):
        assert (r["provider"], r["endpoint"], r["method"], r["model"], r["stream"]) == (
            "openai", "/openai/v1/responses", "GET", "gpt-5-2025-08-07", True)
        assert (r["input_tokens"], r["output_tokens"], r["cache_read_tokens"], r["reasoning_tokens"],
                r["total_tokens"]) == (36, 12, 8, 4, 48)
        assert (r["lmgate_id"], r["owner"], r["masked_key"]) == ("alice", "alice@example.com", "..." + ALICE_KEY[-6:])
        assert r["error_type"] is None and r["request_id"].endswith(f"-{n}")
    assert records[0]["request_id"][:-2] == records[1]["request_id"][:-2]   # one connection


@pytest.mark.parametrize("model,error_type,status,tokens", [
    ("gpt-5-fail", "stream_error", 101, 36),
    ("gpt-5-error", "stream_error", 101, None),
    ("gpt-5-cut", "upstream_unreachable", 101, None),
])
def test_responses_websocket_errors_and_cuts(ws_gate, model, error_type, status, tokens):
    mark = ws_gate.mark()
    run(ws_url(ws_gate, "openai", "/v1/responses"), responses_turn(model))
    [r] = ws_gate.new_records(mark, 1)
    assert (r["error_type"], r["status"], r["input_tokens"]) == (error_type, status, tokens)


def test_client_gone_mid_response_is_client_closed(ws_gate):
    async def leave(ws):
        await ws.send_str(json.dumps({"type": "response.create", "model": "gpt-5-hang", "input": "hi"}))
        return await _until(ws, lambda d: d.get("type") == "response.output_text.delta")

    mark = ws_gate.mark()
    run(ws_url(ws_gate, "openai", "/v1/responses"), leave)
    [r] = ws_gate.new_records(mark, 1)
    assert (r["status"], r["error_type"], r["model"]) == (499, "client_closed", "gpt-5-hang")


def test_a_connection_without_a_response_leaves_no_record(ws_gate, ws_mock):
    async def nothing(ws):
        await ws.send_bytes(b"\x00\x01binary \xff")
        await asyncio.sleep(0.2)
    mark = ws_gate.mark()
    run(ws_url(ws_gate, "openai", "/v1/responses"), nothing)
    assert ws_mock.received[-1] == b"\x00\x01binary \xff"   # a binary frame reached the provider as sent
    assert ws_gate.new_records(mark, 0) == []


def test_refused_key_gets_the_providers_403_and_one_record(ws_gate, ws_mock):
    handshakes = len(ws_mock.handshakes)
    mark = ws_gate.mark()
    with pytest.raises(aiohttp.WSServerHandshakeError) as excinfo:
        run(ws_url(ws_gate, "openai", "/v1/responses"), responses_turn("gpt-5"), key=UNLISTED_KEY)
    assert excinfo.value.status == 403
    [r] = ws_gate.new_records(mark, 1)
    assert (r["error_type"], r["status"], r["endpoint"]) == ("forbidden", 403, "/openai/v1/responses")
    assert len(ws_mock.handshakes) == handshakes            # the provider never saw it


def test_key_in_the_query_and_gemini_live(ws_gate, ws_mock):
    async def turns(ws):
        await ws.send_bytes(json.dumps({"setup": {"model": "models/gemini-live-2.5-flash"}}).encode())
        got = await _until(ws, lambda d: "setupComplete" in d)
        for _ in range(2):
            await ws.send_bytes(json.dumps({"clientContent": {
                "turns": [{"role": "user", "parts": [{"text": "hi"}]}], "turnComplete": True}}).encode())
            got += await _until(ws, lambda d: d.get("serverContent", {}).get("turnComplete"))
        return got

    mark = ws_gate.mark()
    sent_before = len(ws_mock.sent)
    async def session():
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(ws_url(ws_gate, "gemini", LIVE_PATH) + f"?key={ALICE_KEY}") as ws:
                return await turns(ws)
    got = asyncio.run(session())
    assert got == ws_mock.sent[sent_before:]
    assert ws_mock.handshakes[-1]["path_qs"] == f"{LIVE_PATH}?key={ALICE_KEY}"
    records = ws_gate.new_records(mark, 2)
    for r in records:
        assert (r["provider"], r["api_format"], r["model"], r["lmgate_id"]) == (
            "gemini", "google", "gemini-live-2.5-flash", "alice")
        assert (r["input_tokens"], r["output_tokens"], r["total_tokens"], r["error_type"]) == (
            LIVE_USAGE["promptTokenCount"], LIVE_USAGE["responseTokenCount"], LIVE_USAGE["totalTokenCount"], None)
        assert r["endpoint"] == "/gemini" + LIVE_PATH and ALICE_KEY not in json.dumps(r)


def test_provider_refusing_the_handshake_is_one_upstream_error(ws_gate):
    mark = ws_gate.mark()
    with pytest.raises(aiohttp.WSServerHandshakeError) as excinfo:
        run(ws_url(ws_gate, "openai", "/v1/no-such-socket"), responses_turn("gpt-5"))
    assert excinfo.value.status == 404
    [r] = ws_gate.new_records(mark, 1)
    assert (r["status"], r["error_type"]) == (404, "upstream_error")


def test_plain_http_on_the_same_gate_is_not_relayed(ws_gate, ws_mock):
    mark = ws_gate.mark()
    resp = httpx.get(ws_gate.base("openai") + "/v1/responses", headers={"Authorization": f"Bearer {ALICE_KEY}"})
    assert resp.status_code == 400 and "WebSocket only" in resp.text   # the mock's HTTP answer
    # Recorded as an HTTP call (waited for: a record coming late would land in the next test's).
    [r] = ws_gate.new_records(mark, 1)
    assert (r["status"], r["error_type"], r["endpoint"]) == (400, "upstream_error", "/openai/v1/responses")


openai = pytest.importorskip("openai")


def test_openai_sdk_responses_websocket(ws_gate, ws_mock):
    def events(base: str) -> list:
        client = openai.OpenAI(base_url=base + "/v1", api_key=ALICE_KEY, max_retries=0)
        with client.responses.connect() as connection:
            connection.response.create(model="gpt-5", input="hi")
            got = []
            for event in connection:
                got.append(event.model_dump())
                if event.type == "response.completed":
                    return got
        return got

    direct = events(ws_mock.url)
    mark = ws_gate.mark()
    through = events(ws_gate.base("openai"))
    assert through == direct and through[-1]["response"]["usage"]["input_tokens"] == 36
    [r] = ws_gate.new_records(mark, 1)
    assert (r["model"], r["input_tokens"], r["output_tokens"]) == ("gpt-5-2025-08-07", 36, 12)


def test_openai_sdk_realtime(ws_gate):
    client = openai.OpenAI(base_url=ws_gate.base("openai") + "/v1", api_key=ALICE_KEY, max_retries=0)
    mark = ws_gate.mark()
    with client.realtime.connect(model="gpt-realtime") as connection:
        connection.response.create()
        for event in connection:
            if event.type == "response.done":
                assert event.response.usage.total_tokens == REALTIME_USAGE["total_tokens"]
                break
    [r] = ws_gate.new_records(mark, 1)
    assert (r["endpoint"], r["model"], r["input_tokens"], r["output_tokens"], r["cache_read_tokens"],
            r["total_tokens"], r["error_type"]) == ("/openai/v1/realtime", "gpt-realtime", 132, 121, 64, 253, None)


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {UNLISTED_KEY}"}, {}],
                         ids=["unlisted-key", "no-key"])
def test_the_relay_checks_the_key_itself(ws_gate, ws_mock, headers):
    """Whoever reaches the sidecar directly gets no way to a provider without a listed key."""
    handshakes = len(ws_mock.handshakes)
    mark = ws_gate.mark()

    async def direct():
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(f"ws://127.0.0.1:{ws_gate.sidecar_port}/ws/openai/v1/responses",
                                    headers=headers):
                pass
    with pytest.raises(aiohttp.WSServerHandshakeError) as excinfo:
        asyncio.run(direct())
    assert excinfo.value.status == 403 and len(ws_mock.handshakes) == handshakes
    [r] = ws_gate.new_records(mark, 1)
    assert (r["error_type"], r["status"], r["endpoint"]) == ("forbidden", 403, "/openai/v1/responses")


def test_codex_cli_uses_the_websocket_through_the_gate(ws_gate, ws_mock, tmp_path):
    """`codex exec` with its built-in OpenAI provider pointed at LMGate opens the Responses API's
    WebSocket (not the HTTP fallback) and its responses are recorded."""
    if not shutil.which("codex"):
        pytest.skip("the Codex CLI is not installed (npm i -g @openai/codex)")
    home = tmp_path / "codex"
    home.mkdir()
    (home / "config.toml").write_text(f'openai_base_url = "{ws_gate.base("openai")}/v1"\n')
    env = {**os.environ, "CODEX_HOME": str(home), "HOME": str(home)}
    login = subprocess.run(["codex", "login", "--with-api-key"], input=ALICE_KEY, env=env, cwd=home,
                           capture_output=True, text=True, timeout=60)
    assert login.returncode == 0, login.stderr[-500:]
    handshakes, http = len(ws_mock.handshakes), len(ws_mock.http_requests)
    mark = ws_gate.mark()
    done = subprocess.run(["codex", "exec", "--skip-git-repo-check", "-m", "gpt-5", "say hi"], env=env, cwd=home,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0 and "Hello there" in done.stdout, done.stderr[-2000:]
    assert ALICE_KEY not in done.stdout + done.stderr
    assert len(ws_mock.handshakes) == handshakes + 1 and len(ws_mock.http_requests) == http   # no fallback
    assert ws_mock.handshakes[-1]["headers"]["openai-beta"].startswith("responses_websockets=")
    records = ws_gate.new_records(mark, 1)   # then any more that come
    assert records and all(r["endpoint"] == "/openai/v1/responses" and r["status"] == 101 for r in records)
    assert all((r["lmgate_id"], r["input_tokens"], r["error_type"]) == ("alice", 36, None) for r in records)


def test_provider_unreachable_is_a_502_and_one_record(tmp_path):
    from tests.support.ports import free_port
    gate = Gate(tmp_path / "gate", f"http://127.0.0.1:{free_port()}").start()   # nothing listens there
    try:
        mark = gate.mark()
        with pytest.raises(aiohttp.WSServerHandshakeError) as excinfo:
            run(ws_url(gate, "openai", "/v1/realtime?model=gpt-realtime"), responses_turn("gpt-5"))
        assert excinfo.value.status == 502
        [r] = gate.new_records(mark, 1)
        assert (r["status"], r["error_type"], r["model"], r["lmgate_id"]) == (
            502, "upstream_unreachable", "gpt-realtime", "alice")
    finally:
        gate.stop()
