"""stats.ensure_stream_usage: OpenAI chat/completions and completions streams that do not ask for
usage are forwarded asking for it; the client gets the stream it asked for, the record the usage.

The mock answers as OpenAI does: with `stream_options.include_usage` it adds `"usage":null` to every
chunk and a final usage chunk; without it, neither. Its streams come from a recorded one.
"""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from tests.conftest import FIXTURES_DIR
from tests.support.gate import ALICE_KEY, UNLISTED_KEY
from tests.support.mock_upstream import Reply

pytestmark = pytest.mark.e2e

openai = pytest.importorskip("openai")

SSE = "text/event-stream; charset=utf-8"
USAGE = {"prompt_tokens": 19, "completion_tokens": 3, "total_tokens": 22,
         "prompt_tokens_details": {"cached_tokens": 2, "audio_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}}


def _chunk(delta: dict, finish: str | None = None, **extra) -> dict:
    return {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 1766084435,
            "model": "gpt-4o-2024-08-06", "system_fingerprint": "fp_1",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}


def _event(doc: dict | str, nl: str = "\n") -> bytes:
    data = doc if isinstance(doc, str) else json.dumps(doc, separators=(",", ":"))
    return f"data: {data}{nl}{nl}".encode()


def hand_written(include_usage: bool, nl: str = "\n") -> list[bytes]:
    """A chat stream, one event per write, as OpenAI sends it with or without include_usage."""
    deltas = [({"role": "assistant", "content": ""}, None), ({"content": "Hé"}, None),
              ({"content": " \"usage\":null, ok"}, None), ({}, "stop")]
    events = []
    for delta, finish in deltas:
        chunk = _chunk(delta, finish)
        if include_usage:
            chunk["usage"] = None
        chunk["obfuscation"] = "abc"
        events.append(_event(chunk, nl))
    if include_usage:
        last = _chunk({}, **{"usage": USAGE, "obfuscation": "xyz"})
        last["choices"] = []
        events.append(_event(last, nl))
    return events + [_event("[DONE]", nl)]


def hand_written_crlf(include_usage: bool) -> list[bytes]:
    return hand_written(include_usage, "\r\n")


def recorded(include_usage: bool) -> list[bytes] | None:
    """The recorded include_usage stream; without include_usage, the same without what it adds."""
    path = FIXTURES_DIR / "openai" / "chat_completions_stream_include_usage.response"
    if not path.exists():
        return None
    events = [e + b"\n\n" for e in path.read_bytes().split(b"\n\n") if e]
    if include_usage:
        return events
    return [e.replace(b',"usage":null', b"") for e in events if b'"usage":{' not in e]


class OpenAILike:
    """A reply computed from the request, as OpenAI answers a streamed chat request."""

    def __init__(self, make=hand_written, pieces: int = 1) -> None:
        self.make, self.pieces, self.asked = make, pieces, []

    def __call__(self, body: bytes) -> Reply:
        if not body:   # GET /v1/chat/completions: the stored completions
            return Reply(body=b'{"object":"list","data":[]}')
        doc = json.loads(body)
        if not doc.get("stream"):
            return Reply(body=json.dumps({"object": "chat.completion", "model": "gpt-4o-2024-08-06",
                                          "choices": [], "usage": USAGE}).encode())
        include = bool((doc.get("stream_options") or {}).get("include_usage"))
        self.asked.append(include)
        data = b"".join(self.make(include))
        # Writes cut anywhere (pieces > 1), e.g. in the middle of `,"usage":null`.
        size = -(-len(data) // self.pieces)
        chunks = [data[i:i + size] for i in range(0, len(data), size)]
        return Reply(content_type=SSE, chunks=chunks, delay=0.01 if self.pieces > 1 else 0.0)


@pytest.fixture
def openai_like(mock_upstream):
    """Installs an OpenAILike reply on the two stream paths of the shared mock; removed after."""
    def install(**kwargs) -> OpenAILike:
        like = OpenAILike(**kwargs)
        for path in ("/v1/chat/completions", "/v1/completions"):
            mock_upstream.reply(path, Reply(dynamic=like))
        return like
    yield install
    for path in ("/v1/chat/completions", "/v1/completions"):
        mock_upstream.replies.pop(path, None)


def post(gate, path: str, body: bytes, key: str = ALICE_KEY, **headers) -> httpx.Response:
    return httpx.post(gate.base("openai") + path, content=body,
                      headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json", **headers})


STREAM_REQUEST = b'{"model": "gpt-4o",  "stream": true, "messages": [{"role": "user", "content": "hi \\u00e9"}]}'
# Bodies under 2 KB are looked at by a map in their location; larger ones are read first and looked
# at in a named location (nginx/openai_stream_usage*.conf.template): both must behave the same.
SIZES = ["small", "large"]


def sized(body: bytes, size: str) -> bytes:
    """The body, or the same with a 3 KB field in front (after its first byte, when it is JSON)."""
    if size == "small":
        return body
    return body[:1] + b'"metadata":{"pad":"' + b"x" * 3000 + b'"},' + body[1:]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("pieces,make", [(1, hand_written), (3, hand_written), (17, hand_written),
                                         (17, hand_written_crlf)],
                         ids=["event-per-write", "events-per-write", "cut-anywhere", "crlf-cut-anywhere"])
def test_stream_without_include_usage_gets_usage_recorded_and_the_stream_unchanged(
        gate, mock_upstream, openai_like, path, pieces, make, size):
    like = openai_like(pieces=pieces, make=make)
    mark = gate.mark()
    body = sized(STREAM_REQUEST, size)
    resp = post(gate, path, body)
    assert resp.status_code == 200
    # The client gets exactly what the provider sends to a request without include_usage.
    assert resp.content == b"".join(make(include_usage=False))
    # The provider was asked for usage; every other byte of the body is as sent.
    seen = mock_upstream.seen[-1]
    assert like.asked == [True]
    assert seen.body == body.replace(b"{", b'{"stream_options":{"include_usage":true},', 1)
    assert int(seen.headers["Content-Length"]) == len(seen.body)
    [record] = gate.new_records(mark, 1)
    assert (record["input_tokens"], record["output_tokens"], record["cache_read_tokens"],
            record["total_tokens"]) == (19, 3, 2, 22)
    assert record["error_type"] is None and record["stream"] is True and record["status"] == 200
    assert record["response_bytes"] == len(resp.content)
    assert (record["lmgate_id"], record["owner"]) == ("alice", "alice@example.com")


def test_recorded_stream_without_include_usage(gate, openai_like):
    if recorded(True) is None:
        pytest.skip(f"recorded fixture not found under {FIXTURES_DIR}")
    openai_like(make=recorded)
    mark = gate.mark()
    resp = post(gate, "/v1/chat/completions", STREAM_REQUEST)
    assert resp.content == b"".join(recorded(include_usage=False))
    [record] = gate.new_records(mark, 1)
    assert (record["model"], record["input_tokens"], record["output_tokens"], record["total_tokens"]) == (
        "gpt-4o-2024-08-06", 16, 10, 26)


@pytest.mark.parametrize("body", [
    b'{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[]}',
    b'{"model":"gpt-4o","stream":false,"messages":[]}',
    b'{"model":"gpt-4o","messages":[{"role":"user","content":"\\"stream\\": true"}]}',
    b'{"model":"gpt-4o","stream":true,"messages":[] \xff',                      # not JSON
    b'{"model":"gpt-4o","stream":true,"stream_options":"odd","messages":[]}',
    b'{"model":"gpt-4o","stream":true,"seed":12345678901234567890,"stream_options":{},"messages":[]}',
], ids=["asks-already", "not-a-stream", "stream-in-a-string", "not-json", "odd-options", "big-integer"])
@pytest.mark.parametrize("size", SIZES)
def test_other_requests_pass_byte_for_byte(gate, mock_upstream, body, size):
    body = sized(body, size)
    mock_upstream.reply("/v1/chat/completions", Reply(content_type=SSE, chunks=hand_written(True)))
    try:
        resp = post(gate, "/v1/chat/completions", body)
    finally:
        mock_upstream.replies.pop("/v1/chat/completions")
    assert mock_upstream.seen[-1].body == body
    assert resp.content == b"".join(hand_written(True))   # the provider's answer, untouched


def test_stream_options_without_include_usage_are_kept_and_usage_asked_for(gate, mock_upstream, openai_like):
    openai_like()
    body = b'{"model":"gpt-4o","stream":true,"stream_options":{"include_obfuscation":false},"messages":[]}'
    mark = gate.mark()
    resp = post(gate, "/v1/chat/completions", body)
    assert json.loads(mock_upstream.seen[-1].body) == {
        "model": "gpt-4o", "stream": True, "messages": [],
        "stream_options": {"include_obfuscation": False, "include_usage": True}}
    assert resp.content == b"".join(hand_written(False))
    assert gate.new_records(mark, 1)[0]["input_tokens"] == 19


def test_body_too_large_for_memory_goes_through_untouched(gate, mock_upstream, openai_like):
    """nginx holds a body in memory up to client_body_buffer_size (1m), a quarter more when its
    length is known; a larger one is in a file, which is sent on as it is."""
    like = openai_like()
    filler = "x" * 1_400_000
    body = ('{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"%s"}]}' % filler).encode()
    mark = gate.mark()
    resp = post(gate, "/v1/chat/completions", body)
    assert mock_upstream.seen[-1].body == body
    assert resp.content == b"".join(hand_written(False))

    def chunked():
        yield body[:1000]
        yield body[1000:]
    resp = httpx.post(gate.base("openai") + "/v1/chat/completions", content=chunked(),
                      headers={"Authorization": f"Bearer {ALICE_KEY}"})
    assert resp.status_code == 200 and mock_upstream.seen[-1].body == body
    assert like.asked == [False, False]
    records = gate.new_records(mark, 2)
    assert [r["error_type"] for r in records] == ["usage_missing"] * 2   # recorded as before


def test_chunked_stream_request_gets_usage(gate, mock_upstream, openai_like):
    like = openai_like()

    def chunked():
        yield STREAM_REQUEST[:10]
        yield STREAM_REQUEST[10:]
    mark = gate.mark()
    resp = httpx.post(gate.base("openai") + "/v1/chat/completions", content=chunked(),
                      headers={"Authorization": f"Bearer {ALICE_KEY}"})
    assert resp.status_code == 200 and resp.content == b"".join(hand_written(False))
    assert like.asked == [True]
    assert json.loads(mock_upstream.seen[-1].body)["stream_options"] == {"include_usage": True}
    assert gate.new_records(mark, 1)[0]["total_tokens"] == 22


def test_other_methods_and_errors_on_the_stream_paths(gate, mock_upstream, openai_like):
    openai_like()
    mark = gate.mark()
    # GET /v1/chat/completions lists stored completions: no body is added.
    resp = httpx.get(gate.base("openai") + "/v1/chat/completions?limit=2",
                     headers={"Authorization": f"Bearer {ALICE_KEY}"})
    seen = mock_upstream.seen[-1]
    assert resp.status_code == 200 and seen.method == "GET" and seen.path_qs == "/v1/chat/completions?limit=2"
    assert seen.body == b"" and "Content-Length" not in seen.headers
    # A refused key gets OpenAI's shape and is recorded, as everywhere.
    resp = post(gate, "/v1/chat/completions", STREAM_REQUEST, key=UNLISTED_KEY)
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "lmgate_forbidden"
    assert [r["error_type"] for r in gate.new_records(mark, 2)][1] == "forbidden"
    # The raw path is checked in the nested location too.
    with socket.create_connection(("127.0.0.1", gate.port)) as s:
        s.sendall(b"POST /x/../openai/v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n"
                  b"Authorization: Bearer " + ALICE_KEY.encode() + b"\r\nConnection: close\r\n\r\n{}")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    assert gate.new_records(mark, 3)[2]["error_type"] == "bad_path"


@pytest.mark.parametrize("size", SIZES)
def test_provider_error_to_a_rewritten_request_passes_unchanged(gate, mock_upstream, size):
    error = b'{"error":{"message":"Unrecognized request argument supplied: stream_options","type":"invalid_request_error"}}'
    mock_upstream.reply("/v1/chat/completions", Reply(status=400, body=error))
    try:
        mark = gate.mark()
        resp = post(gate, "/v1/chat/completions", sized(STREAM_REQUEST, size))
    finally:
        mock_upstream.replies.pop("/v1/chat/completions")
    assert (resp.status_code, resp.content) == (400, error)
    assert gate.new_records(mark, 1)[0]["error_type"] == "upstream_error"


@pytest.mark.parametrize("content", ["hi", "a long conversation " * 200], ids=SIZES)
def test_openai_sdk_stream_is_the_same_as_without_lmgate_and_recorded(gate, mock_upstream, openai_like,
                                                                       content):
    like = openai_like()

    def call(base: str):
        client = openai.OpenAI(base_url=base + "/v1", api_key=ALICE_KEY, max_retries=0)
        return [c.model_dump() for c in client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": content}], stream=True)]

    direct = call(mock_upstream.url)
    mark = gate.mark()
    through = call(gate.base("openai"))
    assert like.asked == [False, True]
    assert through == direct and all(c["usage"] is None for c in through)
    [record] = gate.new_records(mark, 1)
    assert (record["input_tokens"], record["output_tokens"], record["error_type"]) == (19, 3, None)


def test_openai_sdk_legacy_completions_stream(gate, openai_like):
    openai_like()
    client = openai.OpenAI(base_url=gate.base("openai") + "/v1", api_key=ALICE_KEY, max_retries=0)
    mark = gate.mark()
    chunks = list(client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi", stream=True))
    assert chunks and all(getattr(c, "usage", None) is None for c in chunks)
    assert gate.new_records(mark, 1)[0]["total_tokens"] == 22


def test_turned_off_forwards_byte_for_byte(own_gate, mock_upstream, openai_like):
    like = openai_like()
    gate = own_gate(LMGATE_STATS__ENSURE_STREAM_USAGE="false")
    mark = gate.mark()
    resp = post(gate, "/v1/chat/completions", STREAM_REQUEST)
    assert mock_upstream.seen[-1].body == STREAM_REQUEST and like.asked == [False]
    assert resp.content == b"".join(hand_written(False))
    assert gate.new_records(mark, 1)[0]["error_type"] == "usage_missing"
