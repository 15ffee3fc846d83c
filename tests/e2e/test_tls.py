"""TLS and HTTP/2 on the front door, end to end: real nginx + njs + sidecar (`lmgate up`) with a
certificate made at test time by `openssl` (a CA, an intermediate, a server certificate with
its chain), driven by the providers' SDKs over HTTPS and by raw sockets."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.gate import ALICE_KEY, CONFIG, Gate, bearer, wait_until
from tests.support.mock_upstream import Reply
from tests.support.ports import free_port
from tests.support.tls_certs import TestCA, fingerprint, served_fingerprint

pytestmark = pytest.mark.e2e

# The SDKs' own HTTP client (httpx2, a fork of httpx); HTTP/2 needs the h2 package.
httpx = pytest.importorskip("httpx2")
pytest.importorskip("h2", reason="HTTP/2 in httpx2 needs the h2 package (pip install -e '.[dev]')")
from tests.e2e.test_sdks import _dump_all, anthropic, genai, genai_types, load_fixture, openai, serve_fixture  # noqa: E402


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> TestCA:
    if not shutil.which("openssl"):
        pytest.skip("the openssl command is not installed")
    return TestCA(tmp_path_factory.mktemp("pki"), intermediate=True)


def tls_env(crt: Path, key: Path, **more: str) -> dict[str, str]:
    return {"LMGATE_PROXY__TLS_CERT_PATH": str(crt), "LMGATE_PROXY__TLS_KEY_PATH": str(key), **more}


@pytest.fixture(scope="module")
def tls_gate(ca, mock_upstream, tmp_path_factory):
    """LMGate with TLS on its port and plain HTTP on proxy.http_port."""
    crt, key = ca.issue("gate", ["localhost"], ["127.0.0.1"], days=30)
    http_port = free_port()
    g = Gate(tmp_path_factory.mktemp("tls-gate"), mock_upstream.url, tls=ca.client_context(),
             **tls_env(crt, key, LMGATE_PROXY__HTTP_PORT=str(http_port)))
    g.http_url = f"http://127.0.0.1:{http_port}"
    g.start()
    yield g
    g.stop()


class Client:
    """An httpx2 client speaking HTTP/2 when the server offers it, trusting the test CA, noting the
    HTTP version of every response."""

    def __init__(self, context: ssl.SSLContext | None, http2: bool = True) -> None:
        self.versions: list[str] = []
        self.http = httpx.Client(http2=http2, verify=context or True, timeout=30,
                                 event_hooks={"response": [lambda r: self.versions.append(r.http_version)]})


# One streamed call per SDK: fixture, provider prefix, client from (root URL, httpx client), the call.
SDK_STREAMS = {
    "openai/chat_completions_stream_include_usage": (
        "openai",
        lambda root, http: openai.OpenAI(base_url=f"{root}/v1", api_key=ALICE_KEY, max_retries=0, http_client=http),
        lambda c: list(c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                                 stream=True, stream_options={"include_usage": True}))),
    "anthropic/messages_stream": (
        "anthropic",
        lambda root, http: anthropic.Anthropic(base_url=root, api_key=ALICE_KEY, max_retries=0, http_client=http),
        lambda c: list(c.messages.create(model="claude-sonnet-4-0", max_tokens=64, stream=True,
                                         messages=[{"role": "user", "content": "hi"}]))),
    "google/gemini_stream_sse": (
        "gemini",
        lambda root, http: genai.Client(api_key=ALICE_KEY, http_options=genai_types.HttpOptions(
            base_url=root, httpx_client=http)),
        lambda c: list(c.models.generate_content_stream(model="gemini-2.5-flash", contents="hi"))),
}


@pytest.mark.parametrize("case", sorted(SDK_STREAMS))
def test_sdk_streams_over_https_and_http2_and_the_record_is_exact(case, tls_gate, mock_upstream, ca):
    provider, make_client, call = SDK_STREAMS[case]
    meta = serve_fixture(mock_upstream, case)
    direct = _dump_all(call(make_client(f"{mock_upstream.url}", httpx.Client())))
    mark = tls_gate.mark()
    client = Client(ca.client_context())
    through = _dump_all(call(make_client(tls_gate.base(provider), client.http)))

    assert through == direct
    assert tls_gate.base(provider).startswith("https://")
    assert client.versions == ["HTTP/2"], "the SDK's call reached nginx over HTTP/2 (ALPN h2)"
    [record] = tls_gate.new_records(mark, 1)
    expected = meta["expected"]
    assert (record["provider"], record["status"], record["stream"], record["error_type"]) == (provider, 200, True, None)
    assert record["model"] == expected["model"]
    assert record["input_tokens"] == expected["input_tokens"]
    assert record["output_tokens"] == expected["output_tokens"]
    assert record["cache_read_tokens"] == expected["cached_input_tokens"]
    assert record["reasoning_tokens"] == expected["reasoning_tokens"]
    assert record["lmgate_id"] == "alice"


def test_calls_sharing_one_http2_connection_get_their_own_records(tls_gate, mock_upstream, ca):
    """Streams of one HTTP/2 connection are separate calls: one record each, distinct request ids."""
    meta = serve_fixture(mock_upstream, "openai/chat_completions_basic")
    client = Client(ca.client_context())
    mark = tls_gate.mark()
    for _ in range(3):
        r = client.http.post(f"{tls_gate.base('openai')}/v1/chat/completions", headers=bearer(ALICE_KEY),
                             json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
    assert client.versions == ["HTTP/2"] * 3
    records = tls_gate.new_records(mark, 3)
    assert len({r["request_id"] for r in records}) == 3, [r["request_id"] for r in records]
    assert {(r["status"], r["model"], r["input_tokens"]) for r in records} == {
        (200, meta["expected"]["model"], meta["expected"]["input_tokens"])}


def test_http11_clients_are_served_too(tls_gate, mock_upstream, ca):
    meta = serve_fixture(mock_upstream, "openai/chat_completions_basic")
    client = Client(ca.client_context(), http2=False)
    mark = tls_gate.mark()
    r = client.http.post(f"{tls_gate.base('openai')}/v1/chat/completions", headers=bearer(ALICE_KEY),
                         json={"model": "gpt-4o", "messages": []})
    assert (r.status_code, r.http_version) == (200, "HTTP/1.1")
    [record] = tls_gate.new_records(mark, 1)
    assert (record["status"], record["output_tokens"]) == (200, meta["expected"]["output_tokens"])


def test_plain_http_to_the_tls_port_gets_a_clear_json_error(tls_gate):
    plain = tls_gate.url.replace("https://", "http://")
    request = urllib.request.Request(f"{plain}/openai/v1/chat/completions", data=b"{}", headers=bearer(ALICE_KEY))
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    assert info.value.code == 400
    assert info.value.headers["Content-Type"] == "application/json"
    body = json.loads(info.value.read())
    assert body["error"]["type"] == "lmgate_https_required"
    assert "use https://" in body["error"]["message"]
    # What an SDK user sees with an http:// base URL.
    client = openai.OpenAI(base_url=f"{plain}/openai/v1", api_key=ALICE_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="this port speaks HTTPS only"):
        client.chat.completions.create(model="gpt-4o", messages=[])


def test_http_port_serves_the_same_api_in_plain_http(tls_gate, mock_upstream):
    meta = serve_fixture(mock_upstream, "openai/chat_completions_basic")
    mark = tls_gate.mark()
    client = openai.OpenAI(base_url=f"{tls_gate.http_url}/openai/v1", api_key=ALICE_KEY, max_retries=0)
    reply = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert reply.model == meta["expected"]["model"]
    [record] = tls_gate.new_records(mark, 1)
    assert (record["status"], record["input_tokens"], record["lmgate_id"]) == (200, meta["expected"]["input_tokens"],
                                                                                "alice")


def test_doctor_reports_the_certificate_and_its_canary_comes_back_over_https(tls_gate):
    result = subprocess.run([sys.executable, "-m", "lmgate", "doctor", "--config", str(CONFIG),
                             "--only", "tls,canary", "--format", "json"],
                            env=tls_gate.env, cwd=tls_gate.workdir, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["tls"]["ok"] and "days left" in checks["tls"]["detail"]
    assert checks["tls"]["detail"].startswith(tls_gate.env["LMGATE_PROXY__TLS_CERT_PATH"])
    assert checks["canary"]["ok"] and "https://" in checks["canary"]["detail"]


def test_the_compose_health_check_passes_with_tls_on(tls_gate):
    from tests.e2e.test_container_entrypoints import compose_healthcheck, run_healthcheck
    result = run_healthcheck(compose_healthcheck("nginx", tls_gate.port, 8080))
    assert result.returncode == 0, result.stderr


def test_tls_sessions_resume_and_tls12_clients_connect(tls_gate, ca):
    port = tls_gate.port

    def handshake(context: ssl.SSLContext, session=None) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        tls = context.wrap_socket(raw, server_hostname="127.0.0.1", session=session)
        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        while tls.recv(4096):  # reading lets TLS 1.3's session ticket arrive
            pass
        return tls

    context = ca.client_context()
    first = handshake(context)
    assert first.version() == "TLSv1.3"
    second = handshake(context, first.session)
    assert second.session_reused, "resumed from nginx's shared session cache"
    for sock in (first, second):
        sock.close()

    tls12 = ca.client_context()
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    sock = handshake(tls12)
    assert sock.version() == "TLSv1.2"
    assert sock.cipher()[0].startswith("ECDHE-"), sock.cipher()  # forward secrecy
    sock.close()
    # TLS 1.0 and 1.1 are not tested: OpenSSL 3 refuses them at its default security level,
    # whatever ssl_protocols says.


# ---------------------------------------------------------------- renewal

class SecretVolume:
    """tls.crt and tls.key as a Kubernetes Secret volume has them: symlinks through `..data`, which
    the kubelet swaps in one rename to a new folder on each update."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True)
        self.crt, self.key = folder / "tls.crt", folder / "tls.key"
        self.version = 0

    def publish(self, crt_bytes: bytes, key_bytes: bytes) -> None:
        self.version += 1
        data = self.folder / f"..v{self.version}"
        data.mkdir()
        (data / "tls.crt").write_bytes(crt_bytes)
        (data / "tls.key").write_bytes(key_bytes)
        tmp = self.folder / "..data_tmp"
        tmp.symlink_to(data.name)
        os.replace(tmp, self.folder / "..data")
        if not self.crt.is_symlink():
            self.crt.symlink_to("..data/tls.crt")
            self.key.symlink_to("..data/tls.key")


@pytest.fixture
def renewing_gate(ca, mock_upstream, tmp_path):
    secret = SecretVolume(tmp_path / "secret")
    first_crt, first_key = ca.issue("first", ["localhost"], ["127.0.0.1"])
    secret.publish(first_crt.read_bytes(), first_key.read_bytes())
    g = Gate(tmp_path / "gate", mock_upstream.url, tls=ca.client_context(), **tls_env(secret.crt, secret.key))
    g.secret, g.first = secret, first_crt
    g.start()
    yield g
    g.stop()


class OpenStream:
    """A streamed call held open: `first()` returns its first bytes, `rest()` the remainder, its
    HTTP version and status."""


class HttpxStream(OpenStream):
    """httpx2 over HTTP/1.1: what the SDKs use by default."""

    def __init__(self, url: str, body: dict, ca: TestCA, workdir: Path) -> None:
        self.client = Client(ca.client_context(), http2=False).http
        self.cm = self.client.stream("POST", url, headers=bearer(ALICE_KEY), json=body)
        self.response = self.cm.__enter__()
        self.chunks = self.response.iter_bytes()

    def first(self) -> bytes:
        return next(self.chunks)

    def rest(self) -> tuple[bytes, str, int]:
        data = b"".join(self.chunks)
        self.cm.__exit__(None, None, None)
        return data, self.response.http_version, self.response.status_code


class CurlStream(OpenStream):
    """curl over HTTP/2 (nghttp2). Not httpx2: httpcore ends every stream of an HTTP/2 connection
    once the server sends GOAWAY, also those the server goes on to finish, as nginx does when it
    reloads (README, TLS)."""

    def __init__(self, url: str, body: dict, ca: TestCA, workdir: Path) -> None:
        headers = workdir / "curl-headers.txt"  # not on the command line: the key stays out of `ps`
        headers.write_text(f"Authorization: Bearer {ALICE_KEY}\nContent-Type: application/json\n")
        self.proc = subprocess.Popen(
            ["curl", "--http2", "-sS", "-N", "--cacert", str(ca.ca_file), "-H", f"@{headers}",
             "--data-binary", json.dumps(body), "-w", "\n%{http_version} %{http_code}", url],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def first(self) -> bytes:
        return os.read(self.proc.stdout.fileno(), 65536)

    def rest(self) -> tuple[bytes, str, int]:
        out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        data, _, trailer = out.rpartition(b"\n")
        version, code = trailer.decode().split()
        return data, {"2": "HTTP/2"}.get(version, version), int(code)


@pytest.mark.parametrize("stream_class", [HttpxStream, CurlStream], ids=["http1.1-httpx2", "http2-curl"])
def test_a_renewed_certificate_is_served_to_new_connections_while_an_open_stream_finishes(
        stream_class, renewing_gate, mock_upstream, ca, tmp_path):
    if stream_class is CurlStream and not shutil.which("curl"):
        pytest.skip("curl is not installed")
    gate = renewing_gate
    meta, body = load_fixture("openai/chat_completions_stream_include_usage")
    parts = [p + b"\n\n" for p in body.split(b"\n\n") if p]
    release = threading.Event()
    mock_upstream.reply("*", Reply(status=200, content_type=meta["content_type"], chunks=parts, release_last=release))
    context = ca.client_context()
    assert served_fingerprint(gate.port, context) == fingerprint(gate.first)
    mark = gate.mark()
    stream = stream_class(f"{gate.base('openai')}/v1/chat/completions",
                          {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True},
                           "messages": []}, ca, tmp_path)
    received = stream.first()  # the stream is open, its last event held back by the mock
    assert received
    renewed_crt, renewed_key = ca.issue("renewed", ["localhost"], ["127.0.0.1"])
    gate.secret.publish(renewed_crt.read_bytes(), renewed_key.read_bytes())
    wait_until(lambda: served_fingerprint(gate.port, context) == fingerprint(renewed_crt), 10,
               "new connections to get the renewed certificate")
    release.set()
    rest, version, status = stream.rest()
    assert (status, version) == (200, "HTTP/1.1" if stream_class is HttpxStream else "HTTP/2")
    assert received + rest == body, "the stream opened before the renewal finished intact"
    [record] = gate.new_records(mark, 1)
    assert (record["status"], record["error_type"], record["model"], record["input_tokens"],
            record["output_tokens"]) == (200, None, meta["expected"]["model"], meta["expected"]["input_tokens"],
                                         meta["expected"]["output_tokens"])
    assert f"TLS certificate {gate.secret.crt} was replaced" in gate.log()
    assert gate.proc.poll() is None


def test_a_bad_renewal_is_logged_naming_the_file_and_the_previous_certificate_stays(
        renewing_gate, mock_upstream, ca):
    gate = renewing_gate
    context = ca.client_context()
    other_crt, other_key = ca.issue("other", ["localhost"], ["127.0.0.1"])
    # A new certificate with a key that is not its own (a botched copy).
    gate.secret.publish(other_crt.read_bytes(), gate.secret.key.read_bytes())
    refusal = f"proxy.tls_key_path: {gate.secret.key} is not the key of the certificate in {gate.secret.crt}"
    wait_until(lambda: refusal in gate.log(), 10, "the refusal in the log")
    line = next(ln for ln in gate.log().splitlines() if refusal in ln)
    assert "nginx keeps serving the previous certificate" in line
    assert served_fingerprint(gate.port, context) == fingerprint(gate.first)
    serve_fixture(mock_upstream, "openai/chat_completions_basic")
    r = Client(context).http.post(f"{gate.base('openai')}/v1/chat/completions", headers=bearer(ALICE_KEY),
                                  json={"model": "gpt-4o", "messages": []})
    assert r.status_code == 200, "calls go on with the previous certificate"
    # Then a good pair: picked up.
    fixed_crt, fixed_key = ca.issue("fixed", ["localhost"], ["127.0.0.1"])
    gate.secret.publish(fixed_crt.read_bytes(), fixed_key.read_bytes())
    wait_until(lambda: served_fingerprint(gate.port, context) == fingerprint(fixed_crt), 10,
               "the fixed certificate to be served")
    assert gate.log().count(refusal) == 1, "the refusal is logged once, not at every poll"
    assert "Traceback" not in gate.log()


# ---------------------------------------------------------------- at start

@pytest.mark.parametrize("case,setting,words", [
    ("garbage certificate", "proxy.tls_cert_path", "holds no PEM certificate"),
    ("missing key", "proxy.tls_key_path", "cannot read"),
    ("key of another certificate", "proxy.tls_key_path", "is not the key of the certificate"),
    ("expired certificate", "proxy.tls_cert_path", "expired on"),
])
def test_a_bad_certificate_at_start_is_one_line_naming_the_file(case, setting, words, ca, mock_upstream, tmp_path):
    crt, key = ca.issue("start", ["localhost"], days=-1 if case == "expired certificate" else 1)
    if case == "garbage certificate":
        crt.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    elif case == "missing key":
        key = tmp_path / "absent.key"
    elif case == "key of another certificate":
        key = ca.issue("another", ["localhost"])[1]
    gate = Gate(tmp_path / "gate", mock_upstream.url, tls=ca.client_context(), **tls_env(crt, key))
    done = subprocess.run([sys.executable, "-m", "lmgate", "up", "--config", str(CONFIG)], env=gate.env,
                          cwd=gate.workdir, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    named = crt if setting == "proxy.tls_cert_path" else key
    assert last.startswith(f"lmgate: {setting}: "), done.stderr
    assert str(named) in last and words in last, last
    assert "Traceback" not in done.stderr
