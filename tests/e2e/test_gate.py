"""The gate end to end: real nginx + njs + sidecar (`lmgate up`) in front of a mock provider."""

from __future__ import annotations

import json
import os
import re
import signal
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support.gate import ALICE_KEY, BOB_KEY, UNLISTED_KEY, Gate
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e

CHAT = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_request_and_response_pass_through_unchanged(gate, mock_upstream):
    body = json.dumps(CHAT, indent=2).encode() + "\n héllo \x00 bytes".encode()
    mock_upstream.reply("/v1/echo-check", status=201, body=body, content_type="application/json; charset=utf-8",
                        headers={"X-Upstream-Header": "kept", "openai-processing-ms": "42"})
    request_body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi \xc3\xa9"}]}'
    mark = gate.mark()
    resp = httpx.post(gate.base("openai") + "/v1/echo-check?api-version=2024-01-01&x=a%2Fb",
                      content=request_body, headers={**bearer(ALICE_KEY), "X-Client-Header": "yes",
                                                     "Content-Type": "application/json"})
    assert resp.status_code == 201
    assert resp.content == body
    assert resp.headers["x-upstream-header"] == "kept"
    assert resp.headers["openai-processing-ms"] == "42"
    seen = mock_upstream.seen[-1]
    assert seen.method == "POST"
    assert seen.path_qs == "/v1/echo-check?api-version=2024-01-01&x=a%2Fb"  # prefix stripped, query kept as sent
    assert seen.body == request_body
    assert seen.headers["X-Client-Header"] == "yes"
    assert seen.headers["Authorization"] == f"Bearer {ALICE_KEY}"
    assert seen.headers["Host"] == mock_upstream.url.removeprefix("http://")
    [record] = gate.new_records(mark, 1)
    assert record["lmgate_id"] == "alice" and record["owner"] == "alice@example.com"
    assert record["endpoint"] == "/openai/v1/echo-check"
    assert record["status"] == 201 and record["method"] == "POST"
    assert record["masked_key"] == "..." + ALICE_KEY[-6:]


def test_client_cannot_forge_lmgate_headers(gate, mock_upstream):
    mock_upstream.reply("/v1/forge", body=b"{}")
    mark = gate.mark()
    resp = httpx.post(gate.base("openai") + "/v1/forge", content=b"{}",
                      headers={**bearer(ALICE_KEY), "X-LMGate-ID": "mallory", "X-LMGate-Owner": "mallory"})
    assert resp.status_code == 200
    assert not any(h.lower().startswith("x-lmgate") for h in mock_upstream.seen[-1].headers)
    [record] = gate.new_records(mark, 1)
    assert record["lmgate_id"] == "alice"


@pytest.mark.parametrize("provider,headers,params,check", [
    ("openai", {}, {}, lambda b: b["error"]["code"] == "lmgate_forbidden"),
    ("openai", bearer(UNLISTED_KEY), {}, lambda b: "allow-list" in b["error"]["message"]),
    ("anthropic", {"x-api-key": UNLISTED_KEY}, {},
     lambda b: b["type"] == "error" and b["error"]["type"] == "permission_error"),
    ("gemini", {"x-goog-api-key": UNLISTED_KEY}, {}, lambda b: b["error"]["status"] == "PERMISSION_DENIED"),
    ("google", {}, {"key": UNLISTED_KEY}, lambda b: b["error"]["code"] == 403),
    ("openai", {"Authorization": f"Bearer {ALICE_KEY}", "x-api-key": UNLISTED_KEY}, {},
     lambda b: b["error"]["code"] == "lmgate_forbidden"),
])
def test_denied_calls_get_403_in_the_providers_shape_and_are_recorded(gate, mock_upstream, provider, headers,
                                                                      params, check):
    seen_before = len(mock_upstream.seen)
    mark = gate.mark()
    resp = httpx.post(gate.base(provider) + "/v1/anything", headers=headers, params=params, content=b"{}")
    assert resp.status_code == 403
    assert resp.headers["content-type"].startswith("application/json")
    assert check(resp.json())
    assert "LMGate" in resp.text
    assert len(mock_upstream.seen) == seen_before, "a denied call reached the provider"
    [record] = gate.new_records(mark, 1)
    assert record["error_type"] == "forbidden" and record["status"] == 403
    assert record["lmgate_id"] is None and record["provider"] == provider


def test_hashed_allowlist_entry_and_key_query_parameter(gate, mock_upstream):
    mock_upstream.reply("/v1beta/models/gemini-2.0-flash:countTokens", body=b'{"totalTokens": 3}')
    mark = gate.mark()
    resp = httpx.post(gate.base("gemini") + "/v1beta/models/gemini-2.0-flash:countTokens",
                      params={"key": BOB_KEY}, content=b"{}")
    assert resp.status_code == 200, resp.text
    [record] = gate.new_records(mark, 1)
    assert record["lmgate_id"] == "bob"
    assert record["endpoint"] == "/gemini/v1beta/models/gemini-2.0-flash:countTokens"
    assert BOB_KEY not in gate.stats.read_text()


def test_sse_events_reach_the_client_while_the_upstream_is_still_sending(gate, mock_upstream):
    release = threading.Event()
    events = [f'data: {{"n": {i}}}\n\n'.encode() for i in range(4)]
    mock_upstream.reply("/v1/slow-stream", chunks=events, content_type="text/event-stream", release_last=release)
    received = []
    with httpx.stream("POST", gate.base("openai") + "/v1/slow-stream", headers=bearer(ALICE_KEY),
                      content=b"{}", timeout=15) as resp:
        for line in resp.iter_lines():
            if line.startswith("data:"):
                received.append(line)
                if len(received) == 3:
                    # The upstream holds its last event until we have seen the first three:
                    # a buffering proxy would deadlock here and fail the test.
                    release.set()
    assert received == [e.decode().strip() for e in events]


def test_unknown_paths_and_internal_endpoints_answer_404_json(gate):
    for path in ("/", "/nope", "/v1/chat/completions", "/auth", "/stats", "/_auth", "/_stats", "/livez",
                 "/readyz", "/openai"):
        resp = httpx.get(gate.url + path, headers=bearer(ALICE_KEY))
        assert resp.status_code == 404, path
        assert resp.json()["error"]["code"] == "lmgate_not_found", path
    assert httpx.get(gate.url + "/healthz").text == "ok\n"


def test_path_tricks_never_reach_another_provider(gate, mock_upstream):
    seen_before = len(mock_upstream.seen)
    for path in ("/openai/../anthropic/v1/messages", "//anthropic/v1/messages", "/openai/%2e%2e/anthropic/v1/x",
                 "/openai/v1/../../anthropic/v1/messages", "/%6fpenai/v1/models"):
        status = raw_status(gate.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n"
                                       f"Authorization: Bearer {ALICE_KEY}\r\nConnection: close\r\n\r\n")
        assert status in (400, 404), (path, status)
    assert len(mock_upstream.seen) == seen_before


def raw_status(port: int, request: str) -> int:
    """Send a request byte for byte (HTTP clients normalise paths) and return the status code."""
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request.encode())
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1])


def test_fail_closed_when_the_sidecar_is_down(mock_upstream, tmp_path):
    # nginx alone, no sidecar: every call is refused quickly with the provider-shaped 403.
    g = Gate(tmp_path, mock_upstream.url)
    g.start(command="nginx")
    try:
        seen_before = len(mock_upstream.seen)
        started = time.monotonic()
        resp = httpx.post(g.base("anthropic") + "/v1/messages", headers={"x-api-key": ALICE_KEY}, content=b"{}")
        assert time.monotonic() - started < 1.5
        assert resp.status_code == 403
        assert resp.json()["error"]["type"] == "permission_error"
        assert "could not check" in resp.json()["error"]["message"]
        assert len(mock_upstream.seen) == seen_before
    finally:
        assert g.stop() == 0


def test_killed_sidecar_is_restarted_and_calls_succeed_again(own_gate, mock_upstream):
    g = own_gate()
    mock_upstream.reply("/v1/after-restart", body=b"{}")
    pid = g.sidecar_pid()
    import os
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: httpx.post(g.base("openai") + "/v1/after-restart", headers=bearer(ALICE_KEY),
                                  content=b"{}").status_code == 200, 10, "calls to succeed after the restart")
    assert "restarting" in g.log()
    assert g.sidecar_pid() != pid


def test_allowlist_edits_take_effect_without_restart(own_gate, mock_upstream):
    g = own_gate()
    mock_upstream.reply("/v1/reload", body=b"{}")

    def status(key):
        return httpx.post(g.base("openai") + "/v1/reload", headers=bearer(key), content=b"{}").status_code

    assert status(UNLISTED_KEY) == 403
    text = g.add_key("carol", UNLISTED_KEY, "carol@example.com")
    wait_until(lambda: status(UNLISTED_KEY) == 200, 5, "the added key to be accepted")
    # A broken edit keeps the previous list in force.
    g.allowlist.write_text(text + "broken-line-without-fields\n")
    time.sleep(1)
    assert status(UNLISTED_KEY) == 200
    assert "allow-list not reloaded" in g.log() and ":4:" in g.log()
    # Revocation: the key disappears from the file.
    g.allowlist.write_text(text)
    wait_until(lambda: status(UNLISTED_KEY) == 403, 5, "the removed key to be refused")
    assert status(ALICE_KEY) == 200


def test_clean_stop_flushes_every_buffered_record(own_gate, mock_upstream):
    g = own_gate(LMGATE_STATS__FLUSH_INTERVAL_SECONDS="3600")
    mock_upstream.reply("/v1/flush", body=json.dumps(CHAT).encode())
    for _ in range(20):
        assert httpx.post(g.base("openai") + "/v1/flush", headers=bearer(ALICE_KEY), content=b"{}").status_code == 200
    time.sleep(0.3)
    assert g.records() == []  # still buffered: the interval is an hour
    assert g.stop() == 0
    records = g.records()
    assert len(records) == 20
    assert {r["input_tokens"] for r in records} == {11}


def test_a_stop_lets_calls_in_flight_finish_for_the_shutdown_timeout(own_gate, mock_upstream):
    g = own_gate(LMGATE_PROXY__SHUTDOWN_TIMEOUT_SECONDS="2")
    start = b'event: message_start\ndata: {"type":"message_start"}\n\n'
    never = threading.Event()  # the stalled answer's last event waits for it (set at the end)
    mock_upstream.reply("/v1/stop/stalled", chunks=[start, b"event: message_stop\ndata: {}\n\n"],
                        release_last=never, content_type="text/event-stream")
    mock_upstream.reply("/v1/stop/slow", chunks=[b"data: 1\n\n", b"data: 2\n\n"], delay=0.4,
                        content_type="text/event-stream")
    headers = {"x-api-key": ALICE_KEY}
    with httpx.Client(timeout=30) as client, \
            client.stream("POST", g.base("anthropic") + "/v1/stop/stalled", headers=headers, content=b"{}") as stalled, \
            client.stream("POST", g.base("anthropic") + "/v1/stop/slow", headers=headers, content=b"{}") as slow:
        chunks = stalled.iter_raw()
        assert next(chunks) == start
        stopped_at = time.monotonic()
        stopping = threading.Thread(target=g.stop)
        stopping.start()
        # A call that ends within the timeout ends as usual.
        assert slow.read() == b"data: 1\n\ndata: 2\n\n"
        # One still running when it is over is cut: the client sees its connection end.
        with pytest.raises(httpx.HTTPError):
            for _ in chunks:
                pass
        cut_after = time.monotonic() - stopped_at
        stopping.join(30)
        never.set()
    assert not stopping.is_alive() and g.proc.returncode == 0
    assert 2 <= cut_after < 8, f"the stalled call was cut {cut_after:.1f}s after the stop, not after 2 s"
    assert "calls still running 2 s after the stop are cut now" in g.log()
    slow_record = next(r for r in g.records() if r["endpoint"] == "/anthropic/v1/stop/slow")
    assert slow_record["status"] == 200 and slow_record["error_type"] is None


def test_request_ids_are_unique_across_connections_and_restarts(own_gate, mock_upstream):
    """A record's request_id: this nginx start's random id, the worker's pid, the connection's
    serial number and the request's number on that connection. nginx numbers connections from 1
    again at each start: the ids of two runs must still never meet."""
    g = own_gate()
    mock_upstream.reply("/v1/ids", body=b"{}")

    def calls():
        with httpx.Client() as one_connection:
            for _ in range(3):
                resp = one_connection.post(g.base("openai") + "/v1/ids", headers=bearer(ALICE_KEY), content=b"{}")
                assert resp.status_code == 200
        for _ in range(2):  # a connection each
            assert httpx.post(g.base("openai") + "/v1/ids", headers=bearer(ALICE_KEY), content=b"{}").status_code == 200

    calls()
    assert g.stop() == 0
    g.start()
    calls()
    assert g.stop() == 0
    ids = [r["request_id"] for r in g.records()]
    assert len(ids) == 10 and len(set(ids)) == 10, ids
    parts = [re.fullmatch(r"([0-9a-f]{16})-(\d+)-(\d+)-(\d+)", i) for i in ids]
    assert all(parts), ids
    instance, _pid, connection, number = zip(*(m.groups() for m in parts), strict=True)
    assert len(set(instance[:5])) == 1 and len(set(instance[5:])) == 1 and instance[0] != instance[5]
    for run in (0, 5):
        # Three calls on one connection, numbered 1 to 3 on it; then two connections of their own.
        assert len(set(connection[run:run + 3])) == 1 and number[run:run + 3] == ("1", "2", "3")
        assert len(set(connection[run:run + 5])) == 3 and number[run + 3:run + 5] == ("1", "1")


def test_up_refuses_to_start_on_a_taken_port(mock_upstream, tmp_path):
    import socket
    import subprocess
    import sys
    from tests.support.gate import CONFIG
    g = Gate(tmp_path, mock_upstream.url)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", g.port))
        sock.listen()
        result = subprocess.run([sys.executable, "-m", "lmgate", "up", "--config", str(CONFIG)], env=g.env,
                                capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert f"port {g.port}" in result.stderr and "already in use" in result.stderr


def test_up_names_nginx_reason_when_nginx_rejects_the_config(mock_upstream, tmp_path):
    # (A provider host that does not resolve no longer stops LMGate: tests/e2e/test_provider_down.py.)
    import subprocess
    import sys
    from tests.support.gate import CONFIG
    g = Gate(tmp_path, mock_upstream.url, LMGATE_PROXY__CA_BUNDLE=str(tmp_path / "no-such-ca.pem"))
    result = subprocess.run([sys.executable, "-m", "lmgate", "up", "--config", str(CONFIG)], env=g.env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0, result.stderr
    # nginx's own reason, not its closing "test failed".
    assert "nginx rejected the rendered config" in result.stderr, result.stderr
    assert f'"{tmp_path / "no-such-ca.pem"}"' in result.stderr, result.stderr


def test_up_refuses_to_start_with_a_broken_allowlist(mock_upstream, tmp_path):
    import subprocess
    import sys
    from tests.support.gate import CONFIG
    g = Gate(tmp_path, mock_upstream.url)
    g.allowlist.write_text("id,api_key,owner,added\na,k1-aaaaaaaaaaaa,o,d\na,k2-bbbbbbbbbbbbb,o,d\n")
    result = subprocess.run([sys.executable, "-m", "lmgate", "up", "--config", str(CONFIG)], env=g.env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"lmgate: {g.allowlist}:3: duplicate id 'a' (first on line 2)")


def test_auth_cache_reuses_a_yes_for_cache_seconds_and_never_a_no(own_gate, mock_upstream):
    g = own_gate(LMGATE_AUTH__CACHE_SECONDS="3")
    mock_upstream.reply("/v1/cached", body=json.dumps(CHAT).encode())

    def status(key):
        return httpx.post(g.base("openai") + "/v1/cached", headers=bearer(key), content=b"{}").status_code

    # A refusal is not cached: the key works as soon as the allow-list has it.
    assert status(UNLISTED_KEY) == 403
    text = g.add_key("carol", UNLISTED_KEY, "carol@example.com")
    wait_until(lambda: status(UNLISTED_KEY) == 200, 5, "the added key to be accepted")
    # Cached answers still name the caller in the records.
    mark = g.mark()
    assert status(UNLISTED_KEY) == 200 and status(UNLISTED_KEY) == 200
    assert [r["lmgate_id"] for r in g.new_records(mark, 2)[-2:]] == ["carol", "carol"]
    # The cache holds the answer under a hash: never the key.
    for path in Path(tempfile.gettempdir()).glob("lmgate-nginx-*/auth_cache/**/*"):
        if path.is_file():
            assert UNLISTED_KEY.encode() not in path.read_bytes(), "a key was written to the /auth cache"
    # Revoked: the sidecar reloads within 0.2 s, but nginx reuses its yes until it is 3 s old.
    g.allowlist.write_text(text)
    revoked = time.monotonic()
    time.sleep(0.6)
    assert status(UNLISTED_KEY) == 200
    wait_until(lambda: status(UNLISTED_KEY) == 403, 8, "the removed key to be refused", interval=0.02)
    # The bound the config states: cache_seconds (3) + 2 s (a second of background refresh, and
    # nginx's clock counts whole seconds) after the sidecar's reload (0.2 s poll), whatever nginx
    # keeps open (the cached answer's file descriptor is reused for 1 s).
    assert time.monotonic() - revoked < 3 + 2 + 0.2 + 0.3, "a revoked key worked past its stated bound"


def test_an_expired_yes_is_refreshed_in_the_background_and_never_outlives_its_bound(own_gate, mock_upstream):
    g = own_gate(LMGATE_AUTH__CACHE_SECONDS="1")
    mock_upstream.reply("/v1/refresh", body=json.dumps(CHAT).encode())

    def call() -> tuple[int, float, str]:
        started = time.monotonic()
        resp = httpx.post(g.base("openai") + "/v1/refresh", headers=bearer(ALICE_KEY), content=b"{}",
                          timeout=10)
        return resp.status_code, time.monotonic() - started, resp.text

    # nginx keeps expiry times in whole seconds: fill the entry just after a second begins, so
    # that "fresh" ends 1.9 s later and the refresh window (1 s more) 2.9 s later.
    time.sleep(1.1 - time.time() % 1)
    filled = time.monotonic()
    assert call()[0] == 200
    os.kill(g.sidecar_pid(), signal.SIGSTOP)  # the sidecar cannot answer (its port still accepts)
    try:
        time.sleep(max(0.0, filled + 2.3 - time.monotonic()))
        # Expired, and the sidecar does not answer: the yes is used while nginx asks again in
        # the background; the call does not wait for that question (which times out after 1 s).
        status, took, _ = call()
        assert status == 200 and took < 0.9, (status, took)
        time.sleep(max(0.0, filled + 3.3 - time.monotonic()))
        # Past the refresh window: nothing left to use, the sidecar still silent: fail closed.
        status, _, text = call()
        assert status == 403 and "lmgate_gate_unavailable" in text
    finally:
        os.kill(g.sidecar_pid(), signal.SIGCONT)
    wait_until(lambda: call()[0] == 200, 5, "the key to work again once the sidecar answers")


def _sse(data: dict) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


@pytest.fixture
def sdk_paths_freed(mock_upstream):
    """Replies this test sets on the SDKs' own paths must not outlive it (the mock is shared)."""
    yield
    for path in ("/v1/chat/completions", "/v1/messages"):
        mock_upstream.replies.pop(path, None)


def test_client_closing_after_done_is_a_complete_call_and_mid_stream_keeps_what_it_saw(gate, mock_upstream,
                                                                                       sdk_paths_freed):
    chunk = {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o-mini-2024-07-18",
             "choices": [{"index": 0, "delta": {"content": "hi"}}], "usage": None}
    usage = {**chunk, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}
    # The upstream holds the end of its response until the client has gone: as an SDK does, the
    # client stops at [DONE] and closes before the transport's last chunk.
    release = threading.Event()
    mock_upstream.reply("/v1/chat/completions", chunks=[_sse(chunk), _sse(usage), b"data: [DONE]\n\n", b"\n"],
                        content_type="text/event-stream", release_last=release)
    mark = gate.mark()
    with httpx.stream("POST", gate.base("openai") + "/v1/chat/completions", headers=bearer(ALICE_KEY),
                      content=b"{}", timeout=10) as resp:
        for line in resp.iter_lines():
            if line == "data: [DONE]":
                break
    release.set()
    [record] = gate.new_records(mark, 1)
    assert (record["status"], record["error_type"]) == (200, None)
    assert (record["input_tokens"], record["output_tokens"], record["model"]) == (5, 3, "gpt-4o-mini-2024-07-18")

    # Gone before the end: a client_closed call that still shows the tokens the stream had reported.
    start = {"type": "message_start", "message": {"id": "m", "type": "message", "role": "assistant",
                                                  "model": "claude-sonnet-4-20250514", "content": [],
                                                  "usage": {"input_tokens": 21, "output_tokens": 1}}}
    release = threading.Event()
    mock_upstream.reply("/v1/messages", chunks=[f"event: message_start\ndata: {json.dumps(start)}\n\n".encode(),
                                                b"event: ping\ndata: {}\n\n"],
                        content_type="text/event-stream", release_last=release)
    mark = gate.mark()
    with httpx.stream("POST", gate.base("anthropic") + "/v1/messages", headers={"x-api-key": ALICE_KEY},
                      content=b"{}", timeout=10) as resp:
        for _line in resp.iter_lines():
            break
    release.set()
    [record] = gate.new_records(mark, 1)
    assert (record["status"], record["error_type"]) == (499, "client_closed")
    assert record["input_tokens"] == 21 and record["model"] == "claude-sonnet-4-20250514"


def test_usage_at_the_tail_of_a_10_mb_stream_is_recorded(gate, mock_upstream):
    # Far bigger than the capture (head + tail): njs keeps only its two ends, and that is enough.
    chunk = {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o-mini-2024-07-18",
             "choices": [{"index": 0, "delta": {"content": "x" * 900}}], "usage": None}
    event = _sse(chunk)
    count = 10_000_000 // len(event) + 1
    final = _sse({**chunk, "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 34567,
                                                    "total_tokens": 34579}}) + b"data: [DONE]\n\n"
    body_chunks = [event * 100] * (count // 100 + 1) + [final]
    mock_upstream.reply("/v1/big-stream", chunks=body_chunks, content_type="text/event-stream")
    mark = gate.mark()
    resp = httpx.post(gate.base("openai") + "/v1/big-stream", headers=bearer(ALICE_KEY), content=b"{}", timeout=60)
    assert resp.status_code == 200 and resp.content == b"".join(body_chunks)
    assert len(resp.content) > 10_000_000
    [record] = gate.new_records(mark, 1)
    assert (record["input_tokens"], record["output_tokens"], record["total_tokens"]) == (12, 34567, 34579)
    assert record["response_bytes"] == len(resp.content) and record["stream"] is True
