"""Security and hostile requests, end to end (real nginx + njs + sidecar via `lmgate up`).

- The sidecar is not reachable through the public port, and listens on loopback only.
- No full API key ever reaches the stats file, the log (supervisor + sidecar + nginx) or a body.
- Upstream TLS certificates are verified (a local HTTPS provider with its own CA).
- Hostile requests (path tricks, huge or many headers, big bodies, odd Authorization values, keys
  in several places) get the documented answer and never reach the wrong provider.

Tests marked `xfail(strict=True, raises=KnownBug)` pin a known LMGate bug: only the assertion
named in the reason is expected to fail; any other failure in them fails the run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
import yaml

from lmgate.providers import PROVIDERS
from tests.support.fault_upstream import FaultUpstream, closed_port
from tests.support.gate import ALICE_KEY, BOB_KEY, CONFIG, FOLDING, UNLISTED_KEY, Gate
from tests.support.wait import wait_until
from tests.support.http import bearer, raw_request
from tests.support.hardening import (QUERY_KEY, SUITE_KEYS, find_leaks, gate_outputs, known_bug,
                                     readyz)
from tests.support.mock_upstream import MockUpstream
from tests.support.tls_certs import TestCA
from tests.support.tls_upstream import TlsUpstream

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
ALL_KEY_HEADERS = {"Authorization": f"Bearer {ALICE_KEY}", "x-api-key": ALICE_KEY, "x-goog-api-key": ALICE_KEY}


def get(path: str, headers: dict[str, str] = ALL_KEY_HEADERS, method: str = "GET", body: bytes = b"") -> bytes:
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    length = f"Content-Length: {len(body)}\r\n" if body or method == "POST" else ""
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n{lines}{length}Connection: close\r\n\r\n".encode() + body


# ============================================================================ fixtures

@pytest.fixture(scope="module")
def routes_mock():
    """A private mock provider: each provider's upstream is its own base path (/<name>-up/)."""
    mock = MockUpstream().start()
    mock.reply("*", body=b'{"ok":true}')
    yield mock
    mock.stop()


@pytest.fixture(scope="module")
def routed(routes_mock, tmp_path_factory):
    env = {f"LMGATE_PROVIDERS__{name.upper()}__UPSTREAM": f"{routes_mock.url}/{name}-up" for name in PROVIDERS}
    g = Gate(tmp_path_factory.mktemp("routed"), routes_mock.url, LMGATE_PROXY__MAX_BODY_SIZE="1m", **env).start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def fault_upstream():
    f = FaultUpstream().start()
    yield f
    f.stop()




@pytest.fixture(scope="module")
def leaky(routes_mock, fault_upstream, tmp_path_factory):
    """A gate whose upstreams fail in ways that make nginx log the request line (with its query)."""
    g = Gate(tmp_path_factory.mktemp("leaky"), routes_mock.url,
             LMGATE_PROVIDERS__OPENAI__UPSTREAM=f"http://127.0.0.1:{closed_port()}",
             LMGATE_PROVIDERS__ANTHROPIC__UPSTREAM=f"{routes_mock.url}/anthropic-up",
             LMGATE_PROVIDERS__GOOGLE__UPSTREAM=fault_upstream.url,
             LMGATE_PROVIDERS__GEMINI__UPSTREAM=fault_upstream.url,
             LMGATE_PROXY__UPSTREAM_READ_TIMEOUT_SECONDS="1").start()
    yield g
    g.stop()


# ============================================================================ the sidecar stays internal

SIDECAR_PATHS = [
    "/auth", "/stats", "/_auth", "/_stats", "/livez", "/readyz", "/_auth/", "/_stats/", "/_auth?x=1",
    "/_stats?rid=forged&p=openai&m=POST&u=%2Fforged&s=200&n=2", "/%5Fauth", "/%5fstats", "/_AUTH", "/_Stats",
    "//_auth", "/./_stats", "/openai/../_stats", "/x/../_auth", "/%2e/_auth", "/lmgate_sidecar/auth",
    "/@lmgate_not_found", "/@lmgate_denied_openai", "/healthz/../_auth",
]


def test_sidecar_endpoints_are_not_reachable_through_the_public_port(routed):
    mark = routed.mark()
    for path in SIDECAR_PATHS:
        for method in ("GET", "POST"):
            status, headers, body = raw_request(routed.port, get(path, method=method, body=b"{}"))
            assert status == 404, (method, path, status, body[:100])
            assert json.loads(body)["error"]["code"] == "lmgate_not_found", (method, path)
            assert not any(h.startswith("x-lmgate") for h in headers), (method, path, headers)
    time.sleep(0.5)  # several flush intervals
    assert routed.records()[mark:] == [], "a request through the public port reached the sidecar"


def test_an_upstream_cannot_redirect_a_call_into_the_sidecar(routed, routes_mock):
    routes_mock.reply("/openai-up/v1/accel", body=b'{"accel":true}', headers={"X-Accel-Redirect": "/_auth"})
    resp = httpx.post(routed.base("openai") + "/v1/accel", headers=bearer(ALICE_KEY), content=b"{}")
    assert resp.status_code == 200
    leaked = {k: v for k, v in resp.headers.items() if k.lower().startswith("x-lmgate")}
    known_bug(not leaked and resp.content == b'{"accel":true}',
              f"the upstream's X-Accel-Redirect reached /_auth: body {resp.content!r}, headers {leaked}")


def _listeners(port: int, proto: str) -> set[str]:
    """Local addresses (hex, as /proc/net shows them) of sockets bound to `port`."""
    found = set()
    for table in (f"/proc/net/{proto}", f"/proc/net/{proto}6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, hexport = fields[1].rsplit(":", 1)
            listening = proto == "udp" or fields[3] == "0A"
            if int(hexport, 16) == port and listening:
                found.add(address)
    return found


def test_sidecar_listens_on_loopback_only(routed):
    loopback = {"0100007F"}  # 127.0.0.1
    assert _listeners(routed.sidecar_port, "tcp") == loopback
    from lmgate.settings import load_settings
    shipped = load_settings(CONFIG, environ={})
    assert shipped.server.host == "127.0.0.1"  # the shipped default: loopback


def test_compose_keeps_the_sidecar_on_an_internal_network():
    compose = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
    sidecar = compose["services"]["lmgate"]
    assert "ports" not in sidecar  # nothing published
    assert sidecar["networks"] == ["gate"]
    assert compose["networks"]["gate"]["internal"] is True
    assert [str(p).rsplit(":", 1)[-1] for p in compose["services"]["nginx"]["ports"]] == ["8080"]


# ============================================================================ keys never leak

def _leak_calls(g: Gate) -> list[str]:
    """Every key, in every place, against answers that make nginx log the request line; returns
    the bodies received."""
    bodies: list[str] = []
    with httpx.Client(timeout=10) as client:
        def call(method, provider, path, **kw):
            resp = client.request(method, g.base(provider) + path, **kw)
            bodies.append(resp.text)
            return resp.status_code

        for key in SUITE_KEYS:
            listed = key in (ALICE_KEY, BOB_KEY)
            # openai's upstream refuses connections: nginx logs "connect() failed ... request: ..."
            assert call("POST", "openai", "/v1/chat/completions", headers=bearer(key)) == (502 if listed else 403)
            assert call("POST", "openai", "/v1/chat/completions", params={"key": key}) == (502 if listed else 403)
            assert call("POST", "openai", "/v1/chat/completions", params={"a": "1", "key": key, "b": "2"}) in (403, 502)
            assert call("POST", "anthropic", "/v1/messages", headers={"x-api-key": key}) == (200 if listed else 403)
            # gemini/google: the fault server resets or stays silent (504 after 1 s)
            assert call("POST", "gemini", "/v1beta/models/m:reset-early", params={"key": key},
                        headers={"x-goog-api-key": key}) == (502 if listed else 403)
            if key == ALICE_KEY:
                assert call("POST", "google", "/v1/models/m:silent", params={"key": key}) == 504
            # conflicting and malformed
            assert call("POST", "gemini", "/v1beta/models/m:ok", params=[("key", key), ("key", QUERY_KEY)]) == 403
            assert call("POST", "openai", "/v1/models", headers={"Authorization": f"Basic {key}"}) == 403
            assert call("POST", "openai", "/v1/models", headers={"Authorization": f"Bearer {key} extra"}) == 403
            # a long URI with the key at its end: within the limits, so it is served like any other
            # (nginx logs the request line when the upstream fails)
            assert call("GET", "openai", "/v1/models", params={"pad": "q" * 9000, "key": key}) == (
                502 if listed else 403)
            # an over-long header line: nginx's own 400 (logged at info level only)
            assert call("GET", "openai", "/v1/models",
                        headers={"Authorization": f"Bearer {key}" + "x" * 40_000}) == 400
    return bodies


def test_no_full_key_in_stats_logs_or_bodies(leaky):
    bodies = _leak_calls(leaky)
    wait_until(lambda: "connect() failed" in leaky.log() and "upstream timed out" in leaky.log(),
               5, "nginx's error lines")
    assert "?<query hidden>" in leaky.log()  # the request lines are there, redacted
    # Refusals past a bound per client address are folded into one record per 10 s window.
    wait_until(lambda: sum(r.get("folded_calls", 1) for r in leaky.records()) >= 60, 20, "the records of the calls")
    outputs = gate_outputs(leaky)
    outputs.update({f"body {i}": b for i, b in enumerate(bodies)})
    assert find_leaks(outputs) == []


def test_no_full_key_in_the_sidecar_log_for_over_long_lines(own_gate):
    g = own_gate()
    # Lines longer than aiohttp's defaults but within nginx's limits: the sidecar must read them
    # (not fail, which would be a 403 gate_unavailable) and must not quote them in its log.
    for path, headers, allowed in ((f"/openai/v1/models?key={ALICE_KEY}&pad={'q' * 9000}", {}, True),
                                   ("/openai/v1/models", {"Authorization": f"Bearer {BOB_KEY} {'x' * 9000}"}, False)):
        status, _, body = raw_request(g.port, get(path, headers))
        assert b"could not check" not in body
        assert (status != 403) if allowed else (status == 403 and b"LMGate refused" in body), body[:200]
    leaks = find_leaks(gate_outputs(g))
    known_bug(leaks == [], f"full keys in the log: {leaks}")


def test_no_full_key_in_nginx_info_lines_at_debug_level(own_gate):
    g = own_gate(LMGATE_LOGGING__LEVEL="debug")
    for headers in (f"Authorization: Bearer {ALICE_KEY}\r\nAuthorization: Bearer {BOB_KEY}\r\n",
                    f"Authorization: Bearer {ALICE_KEY}{'x' * 40_000}\r\n",
                    f"x-api-key: {ALICE_KEY}\x00\r\n"):
        status, _, _ = raw_request(g.port, f"GET /openai/v1/models HTTP/1.1\r\nHost: x\r\n{headers}"
                                           f"Connection: close\r\n\r\n".encode())
        assert status == 400
    wait_until(lambda: g.log().count("client sent") >= 3, 5, "nginx's info lines")
    leaks = find_leaks(gate_outputs(g))
    known_bug(leaks == [], f"full keys in the log: {leaks}")


def test_key_parameter_with_an_encoded_name_is_redacted_too(own_gate):
    g = own_gate(LMGATE_PROVIDERS__OPENAI__UPSTREAM=f"http://127.0.0.1:{closed_port()}")
    status, _, body = raw_request(g.port, get(f"/openai/v1/models?ke%79={ALICE_KEY}&key={ALICE_KEY}", headers={}))
    assert status == 502
    wait_until(lambda: "connect() failed" in g.log(), 5, "nginx's error line")
    leaks = find_leaks(gate_outputs(g) | {"body": body.decode()})
    known_bug(leaks == [], f"full keys in the outputs: {leaks}")


# ============================================================================ upstream TLS

@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A CA; an HTTPS provider with a certificate for localhost/127.0.0.1 it signed, and one whose
    certificate (same CA) names another host."""
    ca = TestCA(tmp_path_factory.mktemp("pki"))
    good = TlsUpstream(*ca.issue("localhost", ["localhost"], ["127.0.0.1"])).start()
    wrong = TlsUpstream(*ca.issue("elsewhere", ["elsewhere.example"])).start()
    yield ca, good, wrong
    good.stop()
    wrong.stop()


def test_upstream_certificate_from_an_unknown_ca_is_refused_by_default(own_gate, tls):
    ca, good, _ = tls
    g = own_gate(LMGATE_PROVIDERS__OPENAI__UPSTREAM=good.url("localhost"))
    seen = len(good.seen)
    mark = g.mark()
    resp = httpx.post(g.base("openai") + "/v1/chat/completions", headers=bearer(ALICE_KEY), content=b"{}")
    assert resp.status_code == 502
    assert resp.json()["error"]["code"] == "lmgate_upstream_unreachable"
    assert len(good.seen) == seen, "the request was sent over an unverified connection"
    [record] = g.new_records(mark, 1)
    assert record["status"] == 502 and record["error_type"] == "upstream_unreachable"
    assert "upstream SSL certificate verify error" in g.log()


def test_upstream_certificate_is_accepted_with_its_ca_and_its_name_is_checked(own_gate, tls):
    ca, good, wrong = tls
    g = own_gate(LMGATE_PROXY__CA_BUNDLE=str(ca.ca_file),
                 LMGATE_PROVIDERS__OPENAI__UPSTREAM=good.url("localhost"),
                 LMGATE_PROVIDERS__ANTHROPIC__UPSTREAM=wrong.url("localhost"))
    mark = g.mark()
    resp = httpx.get(g.base("openai") + "/v1/models", headers=bearer(ALICE_KEY))
    assert resp.status_code == 200 and resp.json() == {"tls": "ok"}
    assert good.seen[-1] == "/v1/models"
    assert good.sni[-1] == "localhost"
    # Same trusted CA, but the certificate names another host: refused.
    seen = len(wrong.seen)
    resp = httpx.post(g.base("anthropic") + "/v1/messages", headers={"x-api-key": ALICE_KEY}, content=b"{}")
    assert resp.status_code == 502
    assert resp.json()["error"]["type"] == "api_error"
    assert len(wrong.seen) == seen
    records = g.new_records(mark, 2)
    assert sorted((r["provider"], r["status"], r["error_type"]) for r in records) == [
        ("anthropic", 502, "upstream_unreachable"), ("openai", 200, None)]


# ============================================================================ hostile requests

# (raw path, status, provider the call must reach or None). All headers carry Alice's key, so any
# provider would accept the call: only the routing decides.
PATH_CASES = [
    ("/openai/../anthropic/v1/messages", 400, None),
    ("//anthropic/v1/messages", 400, None),
    ("/openai/%2e%2e/anthropic/v1/messages", 400, None),
    ("/openai%2F..%2Fanthropic/v1/messages", 400, None),
    ("/anthropic/v1/..%2F..%2Fopenai/v1/chat/completions", 400, None),
    ("/openai/v1/../../anthropic/v1/messages", 400, None),
    ("/./anthropic/v1/messages", 400, None),
    ("/x/../openai/v1/models", 400, None),
    ("/%6fpenai/v1/models", 400, None),
    ("/openai%2Fv1/models", 400, None),
    ("/openai/../../anthropic/v1/messages", 400, None),        # above the root: nginx's own 400
    ("/openai/v1/%00", 400, None),                             # NUL: nginx's own 400
    ("/openai/v1/x%2F..%2F..%2F..%2Fanthropic-up/v1/messages", 404, None),
    ("/openai/a/b/..%2F..%2F..%2Fanthropic-up/v1/messages", 404, None),
    ("/anthropic-up/v1/messages", 404, None),
    ("/openai\\..\\anthropic/v1/messages", 404, None),
    ("/azure/v1/chat/completions", 404, None),
    ("/OpenAI/v1/models", 404, None),
    ("/openaix/v1/models", 404, None),
    ("/openai", 404, None),
    ("/v1/chat/completions", 404, None),
    ("*", 400, None),
    # Allowed, and forwarded byte for byte to the provider the raw path names.
    ("/openai/v1/chat%2Fcompletions", 200, "openai"),
    # Dot segments, encoded or not, would leave an upstream's own path: refused.
    ("/openai/v1/./models", 400, None),
    ("/openai/v1/x/../models", 400, None),
    ("/google/a/../../google/v1/models", 400, None),
    ("/google/a/%2e%2E/%2E./google/v1/models", 400, None),
    ("/gemini/a/.%2e/v1/models", 400, None),
    ("/gemini/v1/%2e/models", 400, None),
    ("/gemini/v1/models/..", 400, None),
    ("/gemini/v1/models/.?alt=sse", 400, None),
    ("/openai/v1/a%2F..%2Fmodels", 400, None),
    ("/openai//v1/models", 200, "openai"),
    ("/openai/v1/models?x=/../anthropic/", 200, "openai"),
    ("/openai/v1/.well/..x/models.", 200, "openai"),
    ("http://127.0.0.1/anthropic/v1/messages", 200, "anthropic"),  # absolute form: the path counts
    ("http://api.openai.com/gemini/v1beta/models", 200, "gemini"),
    ("/google/v1/projects/p/locations/l/publishers/anthropic/models/claude:rawPredict", 200, "google"),
]


@pytest.mark.parametrize("path,status,provider", PATH_CASES, ids=[c[0] for c in PATH_CASES])
def test_path_tricks_get_the_documented_answer_and_never_reach_another_provider(routed, routes_mock, path,
                                                                                status, provider):
    seen = len(routes_mock.seen)
    got, headers, body = raw_request(routed.port, get(path))
    assert got == status, body[:200]
    reached = [s.path_qs for s in routes_mock.seen[seen:]]
    if provider is None:
        assert reached == []
        if headers.get("content-type", "").startswith("application/json"):
            error = json.loads(body)
            assert "LMGate" in json.dumps(error)
        else:
            assert status == 400  # only nginx's own "bad request" for URIs it cannot parse
    else:
        assert len(reached) == 1 and reached[0].startswith(f"/{provider}-up/"), reached


def test_oversize_and_too_many_headers_get_nginx_400_and_reach_nobody(routed, routes_mock):
    seen = len(routes_mock.seen)
    for extra in ({"X-Big": "a" * 33_000}, {f"X-H{i}": "v" for i in range(1500)}):
        status, headers, body = raw_request(routed.port, get("/openai/v1/models", {**ALL_KEY_HEADERS, **extra}))
        assert status == 400, body[:200]
        assert json.loads(body)["error"]["code"] == "lmgate_headers_too_large"
    assert len(routes_mock.seen) == seen
    assert httpx.get(routed.base("openai") + "/v1/models", headers=bearer(ALICE_KEY)).status_code == 200


@pytest.mark.parametrize("what", ["16k-header", "200-headers", "9k-query"])
def test_requests_within_the_documented_header_limits_are_served(routed, routes_mock, what):
    headers, path = dict(ALL_KEY_HEADERS), "/openai/v1/models"
    if what == "16k-header":
        headers["X-Trace"] = "t" * 16_000
    elif what == "200-headers":
        headers.update({f"X-H{i}": "v" for i in range(200)})
    else:
        path += "?filter=" + "q" * 9000
    status, _, body = raw_request(routed.port, get(path, headers))
    assert status in (200, 403), body[:200]
    known_bug(status == 200, f"{what}: {status} {body[:120]!r}")


def test_body_limit_is_configurable_and_answered_in_the_providers_shape(routed, routes_mock):
    # routed runs with proxy.max_body_size=1m
    seen = len(routes_mock.seen)
    ok = httpx.post(routed.base("openai") + "/v1/files", headers=bearer(ALICE_KEY), content=b"x" * ((1 << 20) - 1024))
    assert ok.status_code == 200
    assert len(routes_mock.seen[-1].body) == (1 << 20) - 1024
    too_big = httpx.post(routed.base("openai") + "/v1/files", headers=bearer(ALICE_KEY),
                         content=b"x" * ((1 << 20) + 1))
    assert too_big.status_code == 413
    assert too_big.json()["error"]["code"] == "lmgate_request_too_large"
    assert "1m" in too_big.json()["error"]["message"]
    # Chunked, no Content-Length: nginx counts as it reads.
    chunk = b"y" * 65536
    chunked = b"".join(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for _ in range(32)) + b"0\r\n\r\n"
    status, headers, body = raw_request(routed.port, (
        f"POST /anthropic/v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: {ALICE_KEY}\r\n"
        f"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode() + chunked)
    assert status == 413
    assert json.loads(body)["error"]["type"] == "request_too_large"
    assert len(routes_mock.seen) == seen + 1


def test_body_over_the_default_100m_limit_is_refused_before_it_is_read(gate, mock_upstream):
    before = len(mock_upstream.seen)
    status, headers, raw = raw_request(gate.port, (
        f"POST /anthropic/v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: {ALICE_KEY}\r\n"
        f"Content-Length: {(100 << 20) + 1}\r\n\r\n").encode() + b"z" * 1000)
    assert status == 413
    assert json.loads(raw) == {"type": "error", "error": {
        "type": "request_too_large", "message": "LMGate refused the request: the body is larger than 100m."}}
    assert len(mock_upstream.seen) == before


def test_a_100m_body_is_accepted_at_the_default_limit(gate, mock_upstream):
    mock_upstream.reply("/v1/security/upload", body=b'{"ok":true}')
    size = 100 << 20
    before = len(mock_upstream.seen)

    def body():
        block = b"z" * (1 << 20)
        for _ in range(100):
            yield block

    resp = httpx.post(gate.base("openai") + "/v1/security/upload", timeout=60,
                      headers={**bearer(ALICE_KEY), "Content-Length": str(size)}, content=body())
    assert resp.status_code in (200, 403)
    known_bug(resp.status_code == 200, f"a 100 MiB body got {resp.status_code}: {resp.text[:150]}")
    [seen] = mock_upstream.seen[before:]
    assert len(seen.body) == size
    seen.body = b""  # the session-wide mock keeps what it saw: do not hold 100 MB


AUTH_CASES = [
    ("Bearer", 403), ("Bearer ", 403), ("Basic YWxpY2U6c2VjcmV0", 403), (f"Token {ALICE_KEY}", 403),
    (f"Bearer {ALICE_KEY} extra", 403), (f"Bearer {ALICE_KEY[:-1]}", 403), (f"Bearer {ALICE_KEY}x", 403),
    (f"Bearer\t{ALICE_KEY}", 403), ("Bearer " + "k" * 8000, 403), (f"Bearer {ALICE_KEY},{ALICE_KEY}", 403),
    (f'Bearer "{ALICE_KEY}"', 403), ("Bearer %s" % ALICE_KEY.upper(), 403),
    (f"bearer {ALICE_KEY}", 200), (f"BEARER {ALICE_KEY}", 200), (f"Bearer  {ALICE_KEY}  ", 200),
]


@pytest.mark.parametrize("value,status", AUTH_CASES, ids=[f"{i}:{c[0][:20]}" for i, c in enumerate(AUTH_CASES)])
def test_malformed_authorization_values_are_refused_in_the_providers_shape(routed, routes_mock, value, status):
    seen = len(routes_mock.seen)
    mark = routed.mark()
    got, headers, body = raw_request(routed.port, get("/openai/v1/chat/completions", {"Authorization": value},
                                                      method="POST", body=b"{}"))
    assert got == status, body[:200]
    [record] = routed.new_records(mark, 1)
    if status == 403:
        assert json.loads(body)["error"]["code"] == "lmgate_forbidden"
        assert len(routes_mock.seen) == seen
        assert record["error_type"] == "forbidden" and record["lmgate_id"] is None
    else:
        assert routes_mock.seen[-1].path_qs == "/openai-up/v1/chat/completions"
        assert record["lmgate_id"] == "alice"


def test_a_key_that_is_not_utf8_is_refused_as_forbidden(routed, routes_mock):
    seen = len(routes_mock.seen)
    mark = routed.mark()
    key = b"sk-\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8\xf7\xf6\xf5"
    status, _, body = raw_request(routed.port, b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                               b"Authorization: Bearer " + key + b"\r\n"
                                               b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
    assert status == 403
    assert len(routes_mock.seen) == seen
    [record] = routed.new_records(mark, 1)
    known_bug(json.loads(body)["error"]["code"] == "lmgate_forbidden" and record["error_type"] == "forbidden",
              f"answer {json.loads(body)['error']['code']}, record {record['error_type']}")


def post_with_headers(port: int, path_qs: str, headers: list[tuple[str, str]]
                      ) -> tuple[int | None, dict[str, str], bytes]:
    """POST `{}` with these header lines as they are (a name may repeat, a value may be empty)."""
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers)
    return raw_request(port, (f"POST {path_qs} HTTP/1.1\r\nHost: x\r\n{lines}"
                              f"Content-Length: 2\r\nConnection: close\r\n\r\n{{}}").encode())


# (provider, headers as a list so a name can repeat, query, status)
KEY_PLACES = [
    ("openai", [("Authorization", f"Bearer {ALICE_KEY}"), ("x-api-key", ALICE_KEY)], "", 200),
    ("openai", [("Authorization", f"Bearer {ALICE_KEY}")], f"?key={ALICE_KEY}", 200),
    ("gemini", [("x-goog-api-key", BOB_KEY)], f"?key={BOB_KEY}", 200),
    ("google", [("x-goog-api-key", ALICE_KEY), ("x-goog-api-key", ALICE_KEY)], "", 200),
    ("openai", [("Authorization", f"Bearer {ALICE_KEY}"), ("x-api-key", BOB_KEY)], "", 403),
    ("anthropic", [("x-api-key", ALICE_KEY)], f"?key={UNLISTED_KEY}", 403),
    ("gemini", [], f"?key={ALICE_KEY}&key={BOB_KEY}", 403),
    ("gemini", [("x-goog-api-key", ALICE_KEY), ("Authorization", f"Bearer {UNLISTED_KEY}")], "", 403),
    ("anthropic", [("x-api-key", ALICE_KEY), ("x-api-key", UNLISTED_KEY)], "", 403),
    ("gemini", [("x-goog-api-key", UNLISTED_KEY), ("x-goog-api-key", ALICE_KEY)], "", 403),
    ("anthropic", [("x-api-key", ALICE_KEY), ("x-api-key", "")], "", 200),
    ("gemini", [("X-Goog-Api-Key", ALICE_KEY)], f"?KEY={UNLISTED_KEY}", 200),  # only `key` is a key
    ("anthropic", [("x_api_key", UNLISTED_KEY), ("x-api-key", ALICE_KEY)], "", 200),  # '_' headers dropped
    # Every place a provider reads a credential from counts (lmgate/providers.py): a listed key in
    # a header Google ignores never carries an unchecked key or token in the query.
    ("gemini", [("x-api-key", ALICE_KEY)], f"?%6Bey={UNLISTED_KEY}", 403),
    ("gemini", [("x-api-key", ALICE_KEY)], f"?k%65y={UNLISTED_KEY}", 403),
    ("google", [("x-api-key", ALICE_KEY)], f"?%6b%65%79={UNLISTED_KEY}", 403),
    ("google", [("x-api-key", ALICE_KEY)], f"?access_token={UNLISTED_KEY}", 403),
    ("gemini", [("x-api-key", ALICE_KEY)], f"?oauth_token={UNLISTED_KEY}", 403),
    ("gemini", [("x-goog-api-key", ALICE_KEY)], f"?alt=sse;key={UNLISTED_KEY}", 403),
    ("openai", [("Authorization", f"Bearer {ALICE_KEY}"), ("api-key", UNLISTED_KEY)], "", 403),
    ("gemini", [], f"?k%65y={ALICE_KEY}", 200),
    ("google", [], f"?access_token={ALICE_KEY}&alt=sse", 200),
    ("openai", [("api-key", ALICE_KEY)], "", 200),
    ("gemini", [("x-goog-api-key", ALICE_KEY)], f"?$key={UNLISTED_KEY}", 403),
    ("google", [("x-goog-api-key", ALICE_KEY)], f"?%24key={UNLISTED_KEY}", 403),
    ("openai", [("Authorization", f"Bearer {ALICE_KEY}"),
                ("Sec-WebSocket-Protocol", f"realtime, openai-insecure-api-key.{UNLISTED_KEY}")], "", 403),
    ("openai", [("Sec-WebSocket-Protocol", f"realtime, openai-insecure-api-key.{ALICE_KEY}")], "", 200),
    # nginx itself refuses a repeated Authorization header.
    ("openai", [("Authorization", f"Bearer {ALICE_KEY}"), ("Authorization", f"Bearer {BOB_KEY}")], "", 400),
]


@pytest.mark.parametrize("provider,headers,query,status", KEY_PLACES, ids=[str(i) for i in range(len(KEY_PLACES))])
def test_keys_in_several_places_at_once(routed, routes_mock, provider, headers, query, status):
    seen = len(routes_mock.seen)
    got, _, body = post_with_headers(routed.port, f"/{provider}/v1/x{query}", headers)
    assert got == status, body[:200]
    reached = routes_mock.seen[seen:]
    if status == 200:
        assert len(reached) == 1 and reached[0].path_qs.startswith(f"/{provider}-up/v1/x")
        # The provider sees exactly the keys the gate approved (a `_` header never passes).
        assert "x_api_key" not in {h.lower() for h in reached[0].headers}
    else:
        assert reached == []


# Requests made one after the other, all within the /auth cache's time: (headers, status).
CACHE_STEPS = [
    ([("x-api-key", ALICE_KEY), ("x-api-key", ALICE_KEY)], 200),
    ([("x-api-key", f"{ALICE_KEY},{ALICE_KEY}")], 403),   # what njs makes of the two copies above
    ([("x-api-key", ALICE_KEY)], 200),
    ([("x-api-key", ALICE_KEY), ("x-api-key", UNLISTED_KEY)], 403),
    ([("X-Api-Key", ALICE_KEY), ("x-api-key", "")], 200),
    ([("x-api-key", ALICE_KEY), ("x-goog-api-key", UNLISTED_KEY)], 403),
    ([("x-goog-api-key", ALICE_KEY)], 200),
    ([("x-goog-api-key", ALICE_KEY), ("x-goog-api-key", UNLISTED_KEY)], 403),
    ([("x-goog-api-key", f"{ALICE_KEY},{UNLISTED_KEY}")], 403),
    ([("Authorization", f"Bearer {ALICE_KEY}")], 200),
    ([("Authorization", f"Bearer {ALICE_KEY}"), ("x-api-key", UNLISTED_KEY)], 403),
]


def test_a_cached_yes_never_answers_a_request_with_other_key_material(own_gate, mock_upstream):
    """nginx caches the sidecar's yes under a hash of the key headers: every copy of each must
    count, or a request that adds a second key would pass on the first one's cached yes."""
    g = own_gate(LMGATE_AUTH__CACHE_SECONDS="60")
    mock_upstream.reply("/v1/cache-keys", body=b'{"ok":true}')
    got = [post_with_headers(g.port, "/anthropic/v1/cache-keys", headers)[0] for headers, _ in CACHE_STEPS]
    assert got == [status for _, status in CACHE_STEPS]


def test_a_cached_yes_never_answers_a_request_with_other_credentials_in_the_query(own_gate, mock_upstream):
    """The query counts whole in the /auth cache key, whatever encoding hides a parameter's name."""
    g = own_gate(LMGATE_AUTH__CACHE_SECONDS="60")
    mock_upstream.reply("/v1beta/cache-query", body=b'{"ok":true}')
    steps = [("", 200), (f"?%6Bey={UNLISTED_KEY}", 403), ("", 200), (f"?access_token={UNLISTED_KEY}", 403),
             ("?alt=sse", 200), (f"?alt=sse&k%65y={UNLISTED_KEY}", 403)]
    got = [post_with_headers(g.port, f"/gemini/v1beta/cache-query{query}", [("x-api-key", ALICE_KEY)])[0]
           for query, _ in steps]
    assert got == [status for _, status in steps]


def test_refused_calls_record_the_masked_keys_they_carried(own_gate):
    """An auditor can tell whose calls were refused: unlisted, conflicting, none."""
    g = own_gate()
    mark = g.mark()
    assert post_with_headers(g.port, "/openai/v1/x", [("Authorization", f"Bearer {UNLISTED_KEY}")])[0] == 403
    assert post_with_headers(g.port, f"/gemini/v1/x?k%65y={UNLISTED_KEY}", [("x-api-key", ALICE_KEY)])[0] == 403
    assert post_with_headers(g.port, "/anthropic/v1/x", [])[0] == 403
    records = g.new_records(mark, 3)
    assert [r["masked_key"] for r in records] == [
        "..." + UNLISTED_KEY[-6:], f"...{ALICE_KEY[-6:]},...{UNLISTED_KEY[-6:]}", None]
    assert [r["error_type"] for r in records] == ["forbidden"] * 3
    # While the sidecar is down: tests/e2e/test_spool.py (calls refused while the sidecar is down).


def test_a_key_behind_a_quote_in_the_query_never_reaches_the_log(own_gate):
    """nginx logs the request line for bodies past its memory buffer (and for upstream errors);
    the whole query is hidden, whatever characters it holds."""
    g = own_gate(LMGATE_PROVIDERS__GEMINI__UPSTREAM=f"http://127.0.0.1:{closed_port()}")
    for query in (f"?x='&key={ALICE_KEY}", f'?x="&key={ALICE_KEY}', f"?x=\u00a0&key={ALICE_KEY}"):
        raw = get(f"/gemini/v1beta/models/m:generateContent{query}", headers={"x-goog-api-key": ALICE_KEY},
                  method="POST", body=b"x" * 2_000_000)
        raw_request(g.port, raw)
    wait_until(lambda: g.log().count("a client request body is buffered") >= 3, 5, "nginx's request lines")
    assert find_leaks(gate_outputs(g)) == []


def test_a_flood_of_refused_calls_is_recorded_with_a_bound_and_every_call_counted(own_gate, mock_upstream):
    """An unauthenticated client cannot fill the stats disk: per client address, a few refusals a
    window are recorded one by one, the rest in one record with their count (lmgate/refusals.py)."""
    g = own_gate(**FOLDING)
    mock_upstream.reply("/v1/flood-ok", body=b'{"ok":true}')
    with httpx.Client() as client:
        refused = [client.post(g.base("openai") + "/v1/chat/completions", content=b"{}",
                               headers=bearer(f"sk-flood-{i:012d}")).status_code for i in range(600)]
        assert client.post(g.base("openai") + "/v1/flood-ok", headers=bearer(ALICE_KEY)).status_code == 200
    assert refused == [403] * 600
    assert g.stop() == 0  # the folded count still held is written at shutdown
    records = g.records()
    forbidden = [r for r in records if r["error_type"] == "forbidden"]
    assert sum(r.get("folded_calls", 1) for r in forbidden) == 600
    assert len(forbidden) <= 30  # 10 per address and 10 s window, and one folded record each
    assert any(r.get("folded_calls", 0) > 100 for r in forbidden)
    assert [r["lmgate_id"] for r in records if r["error_type"] is None] == ["alice"]


def test_refused_paths_need_no_key_and_are_bounded_like_refused_keys(own_gate):
    g = own_gate(**FOLDING)
    statuses = [raw_request(g.port, get(f"/openai/v1/./x{i}", headers={}))[0] for i in range(120)]
    assert statuses == [400] * 120
    assert g.stop() == 0
    records = g.records()
    assert {r["error_type"] for r in records} == {"bad_path"}
    assert sum(r.get("folded_calls", 1) for r in records) == 120
    assert len(records) <= 12


def test_sidecar_survived_every_hostile_request(routed):
    status, body = readyz(routed)
    assert status == 200, body
    assert httpx.post(routed.base("openai") + "/v1/models", headers=bearer(ALICE_KEY)).status_code == 200
    assert find_leaks(gate_outputs(routed)) == []
