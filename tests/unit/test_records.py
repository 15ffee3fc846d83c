"""lmgate.records: nginx's spool line for a call (every outcome), turned into a usage record."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from lmgate.nginx_conf import render
from lmgate.readiness import SPOOL_WORD
from lmgate.records import NGINX_ERRORS, classify, from_spool, iso_utc
from lmgate.settings import load_settings
from tests.support.spool_lines import FIELDS, body_flags, capture, capture_field, sidecar_encoded, spool_line
from tests.unit.conftest import SHIPPED_CONFIG

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
RECORD_FIELDS = {"timestamp", "request_id", "lmgate_id", "owner", "provider", "api_format", "method",
                 "endpoint", "model", "stream", "status", "input_tokens", "output_tokens",
                 "cache_read_tokens", "cache_write_tokens", "reasoning_tokens", "total_tokens",
                 "duration_ms", "response_bytes", "masked_key", "error_type"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def record(line: bytes, received_at: float = 1.0) -> dict:
    r = from_spool(line, received_at)
    assert set(r) == RECORD_FIELDS
    json.dumps(r, allow_nan=False)
    return r


OPENAI_BODY = json.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini-2024-07-18",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
              "prompt_tokens_details": {"cached_tokens": 4},
              "completion_tokens_details": {"reasoning_tokens": 2}}}).encode()


def openai_stream(chunks: int, done: bool = True) -> bytes:
    events = [{"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o",
               "choices": [{"index": 0, "delta": {"content": "x" * 40}}]}] * chunks
    events.append({"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o", "choices": [],
                   "usage": {"prompt_tokens": 5, "completion_tokens": 200, "total_tokens": 205}})
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events).encode()
    return body + (b"data: [DONE]\n\n" if done else b"")


def anthropic_stream(deltas: int) -> bytes:
    events = [("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-20250514",
        "content": [], "usage": {"input_tokens": 321, "output_tokens": 1,
                                 "cache_read_input_tokens": 100, "cache_creation_input_tokens": 7}}}),
              ("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}})]
    for i in range(deltas):
        events.append(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "text_delta", "text": f"word{i} " * 5}}))
    events += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
               ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                  "usage": {"output_tokens": 654}}),
               ("message_stop", {"type": "message_stop"})]
    return "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events).encode()


GEMINI_STREAM_PATH = "/gemini/v1beta/models/gemini-2.5-pro:streamGenerateContent"


# ---------------------------------------------------------------- the line itself

def _log_format(name: str) -> str:
    """The log format as nginx gets it (the rendered config)."""
    text = render(load_settings(SHIPPED_CONFIG, environ={}), Path("/tmp/lmgate-unit-render"), njs_module=None)
    block = re.search(rf"log_format {name} escape=\w+ (.*?);\n", text, re.S)
    assert block, f"log_format {name} not found"
    return block.group(1)


@pytest.mark.parametrize("name", ["lmgate_spool", "lmgate_spool_escaped"])
def test_the_test_lines_have_the_fields_of_nginx_log_format(name):
    """The helper these tests build lines with writes what nginx's log format writes."""
    assert tuple(re.findall(r'"(\w+)":"', _log_format(name))) == FIELDS
    meta, tab, capture_text = spool_line(OPENAI_BODY).rpartition(b"\t")
    assert list(json.loads(meta)) == list(FIELDS) and capture_text.count(b":") == 3
    assert _log_format(name).endswith("}\\t$lmgate_body'"), _log_format(name)[-40:]


# ---------------------------------------------------------------- answered calls

def test_whole_body():
    line = spool_line(OPENAI_BODY, rid="0123abcd", id="alice", own="Alice", mk="...abcdef")
    assert body_flags(line) == "" and b'"done":"OK"' in line
    r = record(line, received_at=1_800_000_000.0)
    assert r["request_id"] == "0123abcd"
    assert r["lmgate_id"] == "alice" and r["owner"] == "Alice" and r["masked_key"] == "...abcdef"
    assert r["provider"] == "openai" and r["api_format"] == "openai" and r["method"] == "POST"
    assert r["endpoint"] == "/openai/v1/chat/completions"
    assert r["model"] == "gpt-4o-mini-2024-07-18"
    assert r["status"] == 200 and r["error_type"] is None and r["stream"] is False
    assert (r["input_tokens"], r["output_tokens"], r["total_tokens"]) == (12, 5, 17)
    assert r["cache_read_tokens"] == 4 and r["reasoning_tokens"] == 2
    assert r["duration_ms"] == 1250.0
    assert r["response_bytes"] == len(OPENAI_BODY)
    # the call started t seconds before nginx logged it (ts), not when the line was read
    assert r["timestamp"] == "2023-11-14T22:13:19.250Z"


def test_head_and_tail_usage_at_the_tail():
    """A stream longer than the capture: the input count is in the head, the output count in the tail."""
    body = anthropic_stream(deltas=400)
    head_max, tail_max = 1024, 2048
    assert len(body) > head_max + tail_max
    line = spool_line(body, p="anthropic", u="/anthropic/v1/messages", ct="text/event-stream",
                      head_max=head_max, tail_max=tail_max)
    assert body_flags(line) == "g"
    r = record(line)
    assert r["api_format"] == "anthropic" and r["stream"] is True
    assert r["model"] == "claude-sonnet-4-20250514"
    assert r["input_tokens"] == 321           # from message_start, in the head
    assert r["output_tokens"] == 654          # from message_delta, in the tail
    assert r["cache_read_tokens"] == 100 and r["cache_write_tokens"] == 7
    assert r["response_bytes"] == len(body)
    assert r["error_type"] is None


def test_head_and_tail_openai_usage_only_in_the_tail():
    body = openai_stream(chunks=300)
    line = spool_line(body, ct="text/event-stream", head_max=512, tail_max=1024)
    assert body_flags(line) == "g"
    r = record(line)
    assert r["model"] == "gpt-4o" and r["stream"] is True
    assert (r["input_tokens"], r["output_tokens"], r["total_tokens"]) == (5, 200, 205)
    assert r["error_type"] is None


def test_without_the_gap_flag_the_tail_field_is_ignored():
    """The head is the whole body unless the flags say "g": a stray tail must not add usage."""
    other = json.dumps({"usage": {"prompt_tokens": 999, "completion_tokens": 999}}).encode()
    r = record(spool_line(OPENAI_BODY, fields={"body": capture_field(len(OPENAI_BODY), "", b64(OPENAI_BODY),
                                                                     b64(other))}))
    assert (r["input_tokens"], r["output_tokens"]) == (12, 5)


def test_short_stream_sent_whole():
    body = anthropic_stream(deltas=2)
    r = record(spool_line(body, p="anthropic", u="/anthropic/v1/messages", ct="text/event-stream"))
    assert (r["input_tokens"], r["output_tokens"]) == (321, 654)


def test_percent_encoded_identity_decoded():
    r = record(spool_line(OPENAI_BODY, id="alice smith+co/ml", own="Zoë & Co, R&D = 1", mk="...a+b/c="))
    assert r["lmgate_id"] == "alice smith+co/ml"
    assert r["owner"] == "Zoë & Co, R&D = 1"
    assert r["masked_key"] == "...a+b/c="


@pytest.mark.parametrize("ident,owner", [("a%41b", "Ops 10%Fee"), ("promo%20code", "100%25 team")])
def test_identity_with_percent_sign_is_decoded_once(ident, owner):
    # nginx logs the sidecar's header values as they are: percent-encoded once.
    line = spool_line(OPENAI_BODY, id=ident, own=owner)
    assert sidecar_encoded(ident).encode() in line
    r = record(line)
    assert (r["lmgate_id"], r["owner"]) == (ident, owner)


def test_empty_identity_becomes_null():
    r = record(spool_line(OPENAI_BODY, id="", own="", mk=""))
    assert r["lmgate_id"] is None and r["owner"] is None and r["masked_key"] is None


def test_endpoint_is_the_path_as_sent_never_decoded():
    path = "/gemini/v1beta/models/gemini-2.0-flash%3AgenerateContent"
    r = record(spool_line(b"{}", p="gemini", u=path))
    assert r["endpoint"] == path


def test_key_in_a_query_string_is_never_recorded():
    # nginx logs the path without its query; a line that had one still never records it.
    r = record(spool_line(b"{}", p="gemini",
                          u="/gemini/v1beta/models/gemini-2.0-flash:generateContent?key=AIzaSECRET"))
    assert r["endpoint"] == "/gemini/v1beta/models/gemini-2.0-flash:generateContent"
    assert "AIzaSECRET" not in json.dumps(r)


def test_gemini_stream():
    chunk = {"candidates": [{"content": {"parts": [{"text": "hi"}]}}], "modelVersion": "gemini-2.0-flash-001",
             "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 3, "totalTokenCount": 12,
                               "thoughtsTokenCount": 1}}
    body = f"data: {json.dumps(chunk)}\r\n\r\n".encode()
    r = record(spool_line(body, p="gemini", u="/gemini/v1beta/models/gemini-2.0-flash:streamGenerateContent",
                          ct="text/event-stream"))
    assert r["api_format"] == "google" and r["stream"] is True
    assert r["model"] == "gemini-2.0-flash-001"
    assert (r["input_tokens"], r["output_tokens"], r["total_tokens"], r["reasoning_tokens"]) == (9, 3, 12, 1)


def test_claude_on_vertex_is_anthropic_format():
    body = json.dumps({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-20250514",
                       "content": [{"type": "text", "text": "Hi"}], "stop_reason": "end_turn",
                       "usage": {"input_tokens": 20, "output_tokens": 8}}).encode()
    path = "/google/v1/projects/p1/locations/us-east5/publishers/anthropic/models/claude-sonnet-4@20250514:rawPredict"
    r = record(spool_line(body, p="google", u=path))
    assert r["provider"] == "google"
    assert r["api_format"] == "anthropic"
    assert (r["input_tokens"], r["output_tokens"]) == (20, 8)
    assert r["error_type"] is None


def test_vertex_gemini_is_google_format():
    path = "/google/v1/projects/p1/locations/us-central1/publishers/google/models/gemini-2.0-flash:generateContent"
    assert record(spool_line(b"{}", p="google", u=path))["api_format"] == "google"


@pytest.mark.parametrize("status,body,expected", [
    (200, OPENAI_BODY, None),
    (201, OPENAI_BODY, None),
    (200, b'{"id":"x","object":"chat.completion","model":"gpt-4o","choices":[]}', "usage_missing"),
    (429, b'{"error":{"message":"Rate limit reached","type":"requests"}}', "rate_limited"),
    (400, b'{"error":{"message":"bad"}}', "upstream_error"),
    (401, b'{"error":{"message":"Incorrect API key"}}', "upstream_error"),
    (404, b'{"error":{"message":"model not found"}}', "upstream_error"),
    (500, b"Internal Server Error", "upstream_error"),
    (503, b"", "upstream_error"),
    (529, b'{"type":"error","error":{"type":"overloaded_error"}}', "upstream_error"),
])
def test_classifies_status(status, body, expected):
    r = record(spool_line(body, s=status))
    assert r["status"] == status
    assert r["error_type"] == expected
    if status >= 400:
        assert r["input_tokens"] is None


def test_models_list_is_not_usage_missing():
    r = record(spool_line(b'{"object":"list","data":[{"id":"gpt-4o"}]}', m="GET", u="/openai/v1/models"))
    assert r["status"] == 200 and r["error_type"] is None


def test_header_only_ok_response():
    r = record(spool_line(b"", s=200, m="HEAD", u="/openai/v1/models"))
    assert r["status"] == 200 and r["error_type"] is None
    assert r["method"] == "HEAD" and r["response_bytes"] == 0


# ---------------------------------------------------------------- nginx's own answers

def test_denied():
    r = record(spool_line(b"", s=403, err="forbidden", id="", own="", mk="...abcdef", n=151, rid="feedbeef"))
    assert r["status"] == 403 and r["error_type"] == "forbidden"
    assert r["lmgate_id"] is None and r["owner"] is None
    assert r["masked_key"] == "...abcdef"
    assert r["model"] is None and r["input_tokens"] is None
    assert r["response_bytes"] == 151
    assert r["request_id"] == "feedbeef"


def test_gate_unavailable():
    r = record(spool_line(b"", s=403, err="gate_unavailable", id="", own="", mk=""))
    assert (r["status"], r["error_type"]) == (403, "gate_unavailable")
    assert r["lmgate_id"] is None and r["masked_key"] is None


@pytest.mark.parametrize("status", [502, 504])
def test_upstream_unreachable_answered_by_nginx(status):
    r = record(spool_line(b"", s=status, err="upstream_unreachable", id="alice", own="Alice"))
    assert (r["status"], r["error_type"]) == (status, "upstream_unreachable")
    assert r["lmgate_id"] == "alice"


def test_denied_even_if_client_left():
    r = record(spool_line(b"", s=403, err="forbidden", done=False))
    assert (r["status"], r["error_type"]) == (403, "forbidden")


def test_unknown_error_word_is_not_trusted():
    r = record(spool_line(OPENAI_BODY, err="teapot"))
    assert r["status"] == 200 and r["error_type"] is None
    assert r["input_tokens"] == 12


# ---------------------------------------------------------------- calls that did not end normally

def test_client_abort_before_any_body_is_499_with_model_from_path():
    r = record(spool_line(b"", s=200, done=False, id="alice", own="Alice Smith", p="gemini", u=GEMINI_STREAM_PATH,
                          ct="text/event-stream", n=2048))
    assert r["status"] == 499 and r["error_type"] == "client_closed"
    assert r["owner"] == "Alice Smith"
    assert r["model"] == "gemini-2.5-pro"        # from the path: no body came
    assert r["stream"] is True
    assert r["api_format"] == "google"
    assert r["response_bytes"] == 2048
    assert r["input_tokens"] is None


def test_client_abort_mid_stream_is_499_and_keeps_what_the_body_said():
    body = anthropic_stream(deltas=50)
    cut = body[: len(body) // 2]
    line = spool_line(cut, p="anthropic", u="/anthropic/v1/messages", ct="text/event-stream", done=False,
                      last=False)
    assert body_flags(line) == "x"
    r = record(line)
    assert r["status"] == 499 and r["error_type"] == "client_closed"
    assert r["model"] == "claude-sonnet-4-20250514" and r["stream"] is True
    assert r["input_tokens"] == 321              # message_start had arrived
    assert r["response_bytes"] == len(cut)


def test_client_abort_of_a_google_stream_without_usage_takes_the_model_from_the_path():
    r = record(spool_line(b"data: {\"candidates\":[", p="gemini", u=GEMINI_STREAM_PATH, ct="text/event-stream",
                          done=False, last=False))
    assert r["status"] == 499 and r["error_type"] == "client_closed"
    assert r["model"] == "gemini-2.5-pro"


@pytest.mark.parametrize("provider,path,body", [
    ("openai", "/openai/v1/chat/completions", openai_stream(chunks=3)),
    ("anthropic", "/anthropic/v1/messages", anthropic_stream(deltas=3)),
], ids=["openai-done", "anthropic-message-stop"])
def test_complete_stream_despite_a_client_close_is_not_client_closed(provider, path, body):
    """SDKs stop reading at [DONE] / message_stop and close: nginx says not done, the answer was whole."""
    r = record(spool_line(body, p=provider, u=path, ct="text/event-stream", done=False))
    assert r["status"] == 200 and r["error_type"] is None
    assert r["input_tokens"] is not None and r["output_tokens"] is not None


def test_complete_long_stream_despite_a_client_close_reads_the_end_in_the_tail():
    body = openai_stream(chunks=300)
    line = spool_line(body, ct="text/event-stream", done=False, head_max=512, tail_max=1024)
    assert body_flags(line) == "g"
    r = record(line)
    assert r["status"] == 200 and r["error_type"] is None
    assert (r["input_tokens"], r["output_tokens"]) == (5, 200)


def test_complete_json_answer_despite_a_client_close():
    r = record(spool_line(OPENAI_BODY, done=False))
    assert r["status"] == 200 and r["error_type"] is None
    assert (r["input_tokens"], r["output_tokens"]) == (12, 5)


def test_stream_without_its_end_and_a_client_close_is_499():
    r = record(spool_line(openai_stream(chunks=3, done=False), ct="text/event-stream", done=False))
    assert r["status"] == 499 and r["error_type"] == "client_closed"


def test_answer_cut_short_by_the_provider_is_upstream_unreachable():
    """nginx finished the call (done OK), but the last buffer never came: the provider broke off."""
    body = openai_stream(chunks=20, done=False)
    cut = body[: len(body) // 2]
    line = spool_line(cut, ct="text/event-stream", done=True, last=False)
    assert body_flags(line) == "x" and b'"done":"OK"' in line
    r = record(line)
    assert r["status"] == 200 and r["error_type"] == "upstream_unreachable"
    assert r["model"] == "gpt-4o" and r["stream"] is True
    assert r["response_bytes"] == len(cut)


def test_cut_short_and_client_gone_is_client_closed():
    body = openai_stream(chunks=20, done=False)
    r = record(spool_line(body[:300], ct="text/event-stream", done=False, last=False))
    assert r["status"] == 499 and r["error_type"] == "client_closed"


def anthropic_stream_error(deltas: int) -> bytes:
    """An Anthropic stream broken off by an overloaded_error after some text."""
    body = anthropic_stream(deltas)
    body = body[: body.index(b"event: content_block_stop")]
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    return body + f"event: error\ndata: {json.dumps(error)}\n\n".encode()


@pytest.mark.parametrize("done", [True, False], ids=["ended", "client-closed-after-the-error"])
def test_error_inside_a_200_stream_is_stream_error_with_the_usage_so_far(done):
    """The SDK raises at the error event and may close before nginx sees the stream's end: the
    client got the whole answer either way."""
    body = anthropic_stream_error(deltas=5)
    r = record(spool_line(body, p="anthropic", u="/anthropic/v1/messages", ct="text/event-stream", done=done))
    assert (r["status"], r["error_type"]) == (200, "stream_error")
    assert (r["input_tokens"], r["output_tokens"], r["cache_read_tokens"]) == (321, 1, 100)


def test_stream_error_cut_by_the_provider_is_still_upstream_unreachable():
    body = anthropic_stream_error(deltas=5)
    r = record(spool_line(body, p="anthropic", u="/anthropic/v1/messages", ct="text/event-stream", last=False))
    assert (r["status"], r["error_type"]) == (200, "upstream_unreachable")


def test_claude_on_vertex_cut_is_anthropic_format_with_model_from_path():
    path = "/google/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-opus-4@20250514:streamRawPredict"
    r = record(spool_line(b"", p="google", u=path, done=False))
    assert r["api_format"] == "anthropic"
    assert r["model"] == "claude-opus-4@20250514"
    assert r["status"] == 499


# ---------------------------------------------------------------- times

def test_times():
    r = record(spool_line(OPENAI_BODY, t="2.000", ts="1700000002.000"), received_at=5.0)
    assert r["timestamp"] == "2023-11-14T22:13:20.000Z" and r["duration_ms"] == 2000.0


def test_received_at_used_without_ts():
    r = record(spool_line(OPENAI_BODY, t="", ts=""), received_at=1_700_000_000.0)
    assert r["timestamp"] == "2023-11-14T22:13:20.000Z" and r["duration_ms"] == 0


@pytest.mark.parametrize("ts", ["nan", "inf", "-inf", "1e300", "-5", "1e11.5", "soon", "0x10"])
def test_bogus_end_time_is_replaced_by_received_at(ts):
    r = record(spool_line(OPENAI_BODY, t="1.000", ts=ts), received_at=1_700_000_001.0)
    assert r["timestamp"] == "2023-11-14T22:13:20.000Z"
    assert r["duration_ms"] == 1000.0


@pytest.mark.parametrize("t", ["nan", "inf", "-1", "-1e300", "1e308", "1e8", "fast"])
def test_bogus_duration_is_zero(t):
    r = record(spool_line(OPENAI_BODY, t=t, ts="1700000000.500"))
    assert r["duration_ms"] == 0
    assert r["timestamp"] == "2023-11-14T22:13:20.500Z"


def test_duration_never_starts_the_call_before_the_epoch():
    r = record(spool_line(OPENAI_BODY, t="5000", ts="1000"))
    assert r["timestamp"] == "1970-01-01T00:00:00.000Z"
    assert r["duration_ms"] == 1_000_000.0


# ---------------------------------------------------------------- odd lines

def test_invalid_utf8_in_the_path_still_gives_a_record():
    """A client can send any byte in its path; nginx logs it as it is (no JSON escaping)."""
    line = spool_line(OPENAI_BODY, u=b"/openai/v1/chat/completions/\xff\xfe\xc3")
    assert b"\xff\xfe" in line
    r = record(line)
    assert r["endpoint"].startswith("/openai/v1/chat/completions/") and "\ufffd" in r["endpoint"]
    assert (r["input_tokens"], r["output_tokens"]) == (12, 5)
    assert r["lmgate_id"] == "alice"


def test_path_that_nginx_had_to_escape():
    path = b'/openai/v1/chat/completions/"quoted"\\slash\x01\ttab'
    line = spool_line(OPENAI_BODY, u=path)
    assert b'\\"quoted\\"' in line and b"\\u0001" in line
    r = record(line)
    assert r["endpoint"] == path.decode()
    assert r["input_tokens"] == 12


def test_path_with_escapes_and_invalid_utf8():
    r = record(spool_line(OPENAI_BODY, u=b'/openai/v1/\xff"x'))
    assert r["endpoint"] == '/openai/v1/\ufffd"x'


@pytest.mark.parametrize("line", [
    b"", b"garbage", b"{", b"{not json}", b"{\"a\":", b"[1,2,3]", b"\"just a string\"", b"null", b"42",
    b"\xff\xfe\x00{", b"{}}", b"\x00" * 100, bytes(range(256)),
    spool_line(OPENAI_BODY).partition(b"\t")[0][:-5],  # torn: nginx never finished the line
    b'<190>Nov 14 22:13:20 host nginx: {"s":"200"}',  # syslog framing
], ids=lambda b: repr(b[:20]))
def test_line_that_is_not_a_json_object_raises_value_error(line):
    with pytest.raises(ValueError):
        from_spool(line, 1.0)


def test_lone_surrogate_escape_raises_value_error():
    # nginx never writes \u escapes past \u001F; a line that has one is not nginx's.
    with pytest.raises(ValueError):
        from_spool(spool_line(OPENAI_BODY, rid="\\ud800"), 1.0)


@pytest.mark.parametrize("head", ["!!!not base64!!!", "YWJj=", "Zm9v====", "Zm9v YQ==", "é", "abc"])
def test_invalid_base64_gives_a_record_without_usage(head):
    r = record(spool_line(OPENAI_BODY, fields={"body": capture_field(len(OPENAI_BODY), "", head)}))
    assert r["status"] == 200
    assert r["input_tokens"] is None and r["output_tokens"] is None and r["model"] is None
    assert r["response_bytes"] == len(OPENAI_BODY)


@pytest.mark.parametrize("text", ["garbage", "12", "12:g", "12::e30=", "12:g:e30=:e30=:extra", ":::",
                                  "12:\t:e30=:", "\t"])
def test_capture_that_is_not_lmgate_js_gives_a_record_without_usage(text):
    r = record(spool_line(OPENAI_BODY, fields={"body": text}))
    assert r["status"] == 200 and r["input_tokens"] is None


def test_invalid_base64_tail_gives_a_record_without_usage():
    body = anthropic_stream(deltas=400)
    size, flags, head, _ = capture(body, head_max=1024, tail_max=2048).split(":")
    r = record(spool_line(body, p="anthropic", u="/anthropic/v1/messages", ct="text/event-stream",
                          fields={"body": capture_field(int(size), flags, head, "%%%")}))
    assert flags == "g"
    assert r["status"] == 200 and r["output_tokens"] is None and r["input_tokens"] is None
    assert r["response_bytes"] == len(body)


def test_empty_object_is_a_record():
    r = record(b"{}")
    assert r["request_id"] is None and r["provider"] is None and r["api_format"] == "openai"


NON_STRING_LINES = [
    {"rid": "r", "id": None}, {"rid": "r", "own": 5}, {"rid": "r", "mk": ["...abcdef"]},
    {"rid": "r", "u": 5, "p": "openai"}, {"rid": "r", "ct": None, "done": "OK", "body": "2::e30=:"},
    {"rid": "r", "body": None, "done": "OK"}, {"rid": "r", "body": ["2", "", "e30=", ""]}, {"rid": "r", "done": True},
    {"rid": "r", "err": False}, {"rid": "r", "p": {"a": 1}}, {"rid": {"a": 1}}, {"rid": "r", "m": ["GET"]},
]


def test_a_line_with_non_string_values_is_a_record_or_value_error():
    """nginx writes every value as a string; any other line is refused with ValueError (the
    documented contract), or read, never met with another exception."""
    offenders = []
    for fields in NON_STRING_LINES:
        try:
            r = record(json.dumps(fields).encode())
        except ValueError:
            continue
        except Exception as exc:  # noqa: BLE001 - what the contract excludes
            offenders.append(f"{sorted(fields)}: {type(exc).__name__}")
            continue
        wrong = [k for k in ("request_id", "lmgate_id", "owner", "provider", "method", "endpoint", "masked_key")
                 if r[k] is not None and not isinstance(r[k], str)]
        if wrong:
            offenders.append(f"{sorted(fields)}: a record with {wrong} not text")
    assert not offenders, "; ".join(offenders)


def test_response_bytes_are_the_body_filter_count():
    """$body_bytes_sent counts chunked framing; the body filter's count is what the client read."""
    body = openai_stream(chunks=3)
    r = record(spool_line(body, ct="text/event-stream", n=len(body) + 57))
    assert r["response_bytes"] == len(body)


def test_response_bytes_of_nginx_own_answer_are_nginx_count():
    line = spool_line(b"", s=403, err="forbidden", n=151)
    assert line.endswith(b"}\t")  # no capture after the tab
    assert record(line)["response_bytes"] == 151


def test_bogus_numbers_are_not_trusted():
    r = record(spool_line(OPENAI_BODY, s="abc", p="../../etc",
                          fields={"body": capture_field("many", "", b64(OPENAI_BODY))}))
    assert r["status"] == 0 and r["response_bytes"] == 0
    assert r["provider"] == "../../etc" and r["api_format"] == "openai"


# ---------------------------------------------------------------- classify

@pytest.mark.parametrize("status,nginx_error,problem,expected", [
    (200, None, None, None),
    (204, None, None, None),
    (200, None, "usage_missing", "usage_missing"),
    (200, None, "capture_truncated", "capture_truncated"),
    (429, None, None, "rate_limited"),
    (400, None, None, "upstream_error"),
    (403, None, None, "upstream_error"),
    (500, None, None, "upstream_error"),
    (502, None, None, "upstream_error"),
    (499, None, None, "client_closed"),
    (499, None, "usage_missing", "client_closed"),
    (200, None, "stream_error", "stream_error"),
    (403, "forbidden", None, "forbidden"),
    (403, "gate_unavailable", None, "gate_unavailable"),
    (502, "upstream_unreachable", None, "upstream_unreachable"),
    (504, "upstream_unreachable", None, "upstream_unreachable"),
    (200, "something_else", None, None),
])
def test_classify(status, nginx_error, problem, expected):
    assert classify(status, nginx_error, problem) == expected


def test_nginx_error_words_match_the_nginx_template():
    # Rendered: the policy refusals' words come from records.POLICY_ERRORS (nginx_conf.py).
    from lmgate.nginx_conf import render
    from lmgate.settings import load_settings
    template = render(load_settings(REPO / "config" / "lmgate.yaml", environ={}), None, njs_module=None)
    words = set(re.findall(r"set \$lmgate_error (\w+);", template))
    assert words == set(NGINX_ERRORS) | {SPOOL_WORD}  # the readiness probe's lines are no records


# ---------------------------------------------------------------- fuzzing

@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_give_a_record_or_value_error(data):
    try:
        r = from_spool(data, received_at=1.0)
    except ValueError:
        return
    assert set(r) == RECORD_FIELDS
    json.dumps(r, allow_nan=False)


def _not_a_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return True
    return False


sane_time = st.one_of(st.floats(min_value=0, max_value=4e9).map(repr), st.text(max_size=8).filter(_not_a_float))
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                        st.text(max_size=40))
# nginx writes every value as a string.
field_values = st.one_of(st.text(max_size=40), st.integers().map(str), st.floats().map(repr), st.sampled_from([
    "OK", "", "forbidden", "gate_unavailable", "upstream_unreachable", "403", "200", "499", "g", "x", "gx",
    "/google/x/models/m:stream", "/gemini/v1beta/models/g:streamGenerateContent", "gemini", "google",
    "anthropic", "text/event-stream", "%ZZ", "%ff%fe", capture(OPENAI_BODY), capture(OPENAI_BODY, 20, 30),
    capture(OPENAI_BODY, last=False), "2::e30=:", "9:gx:e30=:e30=", "1:g::", "!!"]))
line_fields = st.fixed_dictionaries(
    {"t": sane_time, "ts": sane_time},
    optional={k: field_values for k in FIELDS if k not in ("t", "ts")})


@settings(max_examples=300, deadline=None)
@given(line_fields, st.dictionaries(st.text(max_size=5).filter(lambda k: k not in FIELDS), json_scalar, max_size=3))
def test_random_string_fields_always_give_a_record(fields, extra):
    """Any text in any of nginx's fields (and fields nginx does not write) still gives a record."""
    line = json.dumps({**extra, **fields}).encode()
    r = record(line, received_at=1_700_000_000.0)
    assert r["duration_ms"] >= 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=10_000), st.binary(max_size=3)), min_size=1,
                max_size=4),
       st.sampled_from([spool_line(OPENAI_BODY), spool_line(anthropic_stream(40), head_max=256, tail_max=512,
                                                            p="anthropic", u="/anthropic/v1/messages")]))
def test_mutated_lines_give_a_record_or_value_error(edits, line):
    """A line damaged anywhere (bytes replaced, dropped or added) never raises anything else."""
    data = bytearray(line)
    for where, new in edits:
        where %= len(data) + 1
        data[where:where + len(new) % 2 + 1] = new
    try:
        r = from_spool(bytes(data), received_at=1.0)
    except ValueError:
        return
    assert set(r) == RECORD_FIELDS
    json.dumps(r, allow_nan=False)


def test_iso_utc():
    assert iso_utc(0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(1_700_000_000.5) == "2023-11-14T22:13:20.500Z"
    assert iso_utc(1_700_000_000.0999) == "2023-11-14T22:13:20.099Z"
