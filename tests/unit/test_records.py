"""lmgate.records: the njs capture report and nginx's fallback log line, turned into usage records."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
from hypothesis import given, settings, strategies as st

from lmgate.records import NGINX_ERRORS, classify, from_capture, from_fallback, iso_utc

pytestmark = pytest.mark.unit

RECORD_FIELDS = {"timestamp", "request_id", "lmgate_id", "owner", "provider", "api_format", "method",
                 "endpoint", "model", "stream", "status", "input_tokens", "output_tokens",
                 "cache_read_tokens", "cache_write_tokens", "reasoning_tokens", "total_tokens",
                 "duration_ms", "response_bytes", "masked_key", "error_type"}


def enc_component(s: str) -> str:
    """JavaScript's encodeURIComponent, as lmgate.js uses for u and ct."""
    return quote(s, safe="-_.!~*'()")


def sidecar(s: str) -> str:
    """How the sidecar percent-encodes id/owner/key in its /auth answer headers."""
    return quote(s, safe="")


def capture_query(*, provider="openai", path="/openai/v1/chat/completions", status=200,
                  ct="application/json", id="alice", owner="Alice", mk="...abcdef", rid="0123abcd",
                  method="POST", t="1.250", ts="1700000000.500", h=None, n=None) -> str:
    """The query string lmgate.js's report() builds."""
    q = (f"rid={rid}&id={sidecar(id)}&own={sidecar(owner)}&mk={sidecar(mk)}&p={provider}&m={method}"
         f"&u={enc_component(path)}&s={status}&ct={enc_component(ct)}&t={t}&ts={ts}")
    if h is not None:
        q += f"&h={h}"
    if n is not None:
        q += f"&n={n}"
    return q


def fallback_line(**fields) -> bytes:
    """A syslog datagram as nginx sends it: priority, date, host, tag, then the JSON log line."""
    base = {"rid": "feedbeef", "id": "", "own": "", "mk": "", "p": "openai", "m": "POST",
            "u": "/openai/v1/chat/completions", "s": "200", "done": "OK", "t": "0.500",
            "ts": "1700000000.500", "err": "", "ct": "", "n": "0"}
    base.update(fields)
    return b"<190>Nov 14 22:13:20 gatehost nginx: " + json.dumps(base, separators=(",", ":")).encode()


OPENAI_BODY = json.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini-2024-07-18",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
              "prompt_tokens_details": {"cached_tokens": 4},
              "completion_tokens_details": {"reasoning_tokens": 2}}}).encode()


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


# ---------------------------------------------------------------- from_capture

def test_capture_whole_body():
    q = capture_query(h=len(OPENAI_BODY), n=len(OPENAI_BODY),
                      path="/openai/v1/chat/completions?api-version=2024-01-01")
    r = from_capture(q, OPENAI_BODY, received_at=1_800_000_000.0)
    assert set(r) == RECORD_FIELDS
    assert r["request_id"] == "0123abcd"
    assert r["lmgate_id"] == "alice" and r["owner"] == "Alice" and r["masked_key"] == "...abcdef"
    assert r["provider"] == "openai" and r["api_format"] == "openai" and r["method"] == "POST"
    assert r["endpoint"] == "/openai/v1/chat/completions"     # never the query string
    assert r["model"] == "gpt-4o-mini-2024-07-18"
    assert r["status"] == 200 and r["error_type"] is None and r["stream"] is False
    assert (r["input_tokens"], r["output_tokens"], r["total_tokens"]) == (12, 5, 17)
    assert r["cache_read_tokens"] == 4 and r["reasoning_tokens"] == 2
    assert r["duration_ms"] == 1250.0
    assert r["response_bytes"] == len(OPENAI_BODY)
    # the call started t seconds before nginx logged it (ts), not when the report arrived
    assert r["timestamp"] == "2023-11-14T22:13:19.250Z"
    json.dumps(r, allow_nan=False)


def test_capture_head_and_tail_split():
    body = anthropic_stream(deltas=400)
    head_max, tail_max = 1024, 2048
    assert len(body) > head_max + tail_max
    head, tail = body[:head_max], body[-tail_max:]
    q = capture_query(provider="anthropic", path="/anthropic/v1/messages", ct="text/event-stream",
                      h=len(head), n=len(body))
    r = from_capture(q, head + tail, received_at=1.0)
    assert r["api_format"] == "anthropic" and r["stream"] is True
    assert r["model"] == "claude-sonnet-4-20250514"
    assert r["input_tokens"] == 321           # from message_start, in the head
    assert r["output_tokens"] == 654          # from message_delta, in the tail
    assert r["cache_read_tokens"] == 100 and r["cache_write_tokens"] == 7
    assert r["response_bytes"] == len(body)
    assert r["error_type"] is None


def test_capture_short_stream_sent_whole():
    body = anthropic_stream(deltas=2)
    q = capture_query(provider="anthropic", path="/anthropic/v1/messages", ct="text/event-stream",
                      h=len(body), n=len(body))
    r = from_capture(q, body, received_at=1.0)
    assert (r["input_tokens"], r["output_tokens"]) == (321, 654)


def test_capture_without_h_and_n_uses_the_body():
    q = capture_query()
    r = from_capture(q, OPENAI_BODY, received_at=1.0)
    assert (r["input_tokens"], r["output_tokens"]) == (12, 5)


def test_capture_percent_encoded_identity_decoded():
    q = capture_query(id="alice smith+co/ml", owner="Zoë & Co, R&D = 1", mk="...a+b/c=")
    r = from_capture(q, OPENAI_BODY, received_at=1.0)
    assert r["lmgate_id"] == "alice smith+co/ml"
    assert r["owner"] == "Zoë & Co, R&D = 1"
    assert r["masked_key"] == "...a+b/c="


@pytest.mark.parametrize("ident,owner", [("a%41b", "Ops 10%Fee"), ("promo%20code", "100%25 team")])
def test_capture_identity_with_percent_sign_round_trips(ident, owner):
    r = from_capture(capture_query(id=ident, owner=owner), OPENAI_BODY, received_at=1.0)
    assert (r["lmgate_id"], r["owner"]) == (ident, owner)


def test_capture_empty_identity_becomes_null():
    r = from_capture(capture_query(id="", owner="", mk=""), OPENAI_BODY, received_at=1.0)
    assert r["lmgate_id"] is None and r["owner"] is None and r["masked_key"] is None


def test_capture_endpoint_is_percent_decoded_once_and_keeps_raw_escapes():
    path = "/gemini/v1beta/models/gemini-2.0-flash%3AgenerateContent"
    r = from_capture(capture_query(provider="gemini", path=path + "?key=SECRET"), b"{}", received_at=1.0)
    assert r["endpoint"] == path
    assert "SECRET" not in json.dumps(r)


def test_capture_key_in_query_never_recorded():
    r = from_capture(capture_query(provider="gemini",
                                   path="/gemini/v1beta/models/gemini-2.0-flash:generateContent?key=AIzaSECRET"),
                     b"{}", received_at=1.0)
    assert "AIzaSECRET" not in json.dumps(r)


def test_capture_received_at_used_without_ts():
    q = capture_query(ts="", t="0")
    r = from_capture(q, OPENAI_BODY, received_at=1_700_000_000.0)
    assert r["timestamp"] == "2023-11-14T22:13:20.000Z"


def test_capture_gemini_stream():
    chunk = {"candidates": [{"content": {"parts": [{"text": "hi"}]}}], "modelVersion": "gemini-2.0-flash-001",
             "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 3, "totalTokenCount": 12,
                               "thoughtsTokenCount": 1}}
    body = f"data: {json.dumps(chunk)}\r\n\r\n".encode()
    q = capture_query(provider="gemini", path="/gemini/v1beta/models/gemini-2.0-flash:streamGenerateContent",
                      ct="text/event-stream", h=len(body), n=len(body))
    r = from_capture(q, body, received_at=1.0)
    assert r["api_format"] == "google" and r["stream"] is True
    assert r["model"] == "gemini-2.0-flash-001"
    assert (r["input_tokens"], r["output_tokens"], r["total_tokens"], r["reasoning_tokens"]) == (9, 3, 12, 1)


def test_capture_claude_on_vertex_is_anthropic_format():
    body = json.dumps({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-20250514",
                       "content": [{"type": "text", "text": "Hi"}], "stop_reason": "end_turn",
                       "usage": {"input_tokens": 20, "output_tokens": 8}}).encode()
    path = "/google/v1/projects/p1/locations/us-east5/publishers/anthropic/models/claude-sonnet-4@20250514:rawPredict"
    r = from_capture(capture_query(provider="google", path=path, h=len(body), n=len(body)), body, received_at=1.0)
    assert r["provider"] == "google"
    assert r["api_format"] == "anthropic"
    assert (r["input_tokens"], r["output_tokens"]) == (20, 8)
    assert r["error_type"] is None


def test_capture_vertex_gemini_is_google_format():
    path = "/google/v1/projects/p1/locations/us-central1/publishers/google/models/gemini-2.0-flash:generateContent"
    r = from_capture(capture_query(provider="google", path=path), b"{}", received_at=1.0)
    assert r["api_format"] == "google"


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
def test_capture_classifies_status(status, body, expected):
    r = from_capture(capture_query(status=status, h=len(body), n=len(body)), body, received_at=1.0)
    assert r["status"] == status
    assert r["error_type"] == expected
    if status >= 400:
        assert r["input_tokens"] is None


def test_capture_models_list_is_not_usage_missing():
    body = b'{"object":"list","data":[{"id":"gpt-4o"}]}'
    r = from_capture(capture_query(method="GET", path="/openai/v1/models"), body, received_at=1.0)
    assert r["error_type"] is None


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
    (403, "forbidden", None, "forbidden"),
    (403, "gate_unavailable", None, "gate_unavailable"),
    (502, "upstream_unreachable", None, "upstream_unreachable"),
    (504, "upstream_unreachable", None, "upstream_unreachable"),
    (200, "something_else", None, None),
])
def test_classify(status, nginx_error, problem, expected):
    assert classify(status, nginx_error, problem) == expected


def test_nginx_error_words_match_the_nginx_template():
    from pathlib import Path
    template = (Path(__file__).resolve().parents[2] / "nginx" / "provider.conf.template").read_text()
    import re
    words = set(re.findall(r"set \$lmgate_error (\w+);", template))
    assert words == set(NGINX_ERRORS)


# ---------------------------------------------------------------- from_fallback

def test_fallback_denied():
    r = from_fallback(fallback_line(s="403", err="forbidden", mk="...abcdef", n="151"), received_at=1.0)
    assert set(r) == RECORD_FIELDS
    assert r["status"] == 403 and r["error_type"] == "forbidden"
    assert r["lmgate_id"] is None and r["owner"] is None
    assert r["masked_key"] == "...abcdef"
    assert r["model"] is None and r["input_tokens"] is None
    assert r["response_bytes"] == 151
    assert r["request_id"] == "feedbeef"


def test_fallback_gate_unavailable():
    r = from_fallback(fallback_line(s="403", err="gate_unavailable"), received_at=1.0)
    assert (r["status"], r["error_type"]) == (403, "gate_unavailable")


@pytest.mark.parametrize("status", ["502", "504"])
def test_fallback_upstream_unreachable(status):
    r = from_fallback(fallback_line(s=status, err="upstream_unreachable", id="alice", own="Alice"),
                      received_at=1.0)
    assert (r["status"], r["error_type"]) == (int(status), "upstream_unreachable")
    assert r["lmgate_id"] == "alice"


def test_fallback_denied_even_if_client_left():
    r = from_fallback(fallback_line(s="403", err="forbidden", done=""), received_at=1.0)
    assert (r["status"], r["error_type"]) == (403, "forbidden")


def test_fallback_client_abort_is_499():
    r = from_fallback(fallback_line(s="200", done="", id="alice", own="Alice%20Smith", mk="...abcdef",
                                    p="gemini", u="/gemini/v1beta/models/gemini-2.5-pro:streamGenerateContent",
                                    ct="text/event-stream", n="2048"), received_at=1.0)
    assert r["status"] == 499 and r["error_type"] == "client_closed"
    assert r["owner"] == "Alice Smith"
    assert r["model"] == "gemini-2.5-pro"        # from the path: the body never arrived
    assert r["stream"] is True
    assert r["api_format"] == "google"
    assert r["response_bytes"] == 2048


def test_fallback_identity_is_decoded_once():
    # nginx logs the sidecar's header values as they are: percent-encoded once.
    r = from_fallback(fallback_line(id=sidecar("a%41b"), own=sidecar("Zoë & Co")), received_at=1.0)
    assert (r["lmgate_id"], r["owner"]) == ("a%41b", "Zoë & Co")


def test_fallback_header_only_ok_response():
    r = from_fallback(fallback_line(s="200", done="OK", n="0", m="HEAD", u="/openai/v1/models"),
                      received_at=1.0)
    assert r["status"] == 200 and r["error_type"] is None
    assert r["method"] == "HEAD" and r["response_bytes"] == 0


def test_fallback_times():
    r = from_fallback(fallback_line(t="2.000", ts="1700000002.000"), received_at=5.0)
    assert r["timestamp"] == "2023-11-14T22:13:20.000Z" and r["duration_ms"] == 2000.0
    r = from_fallback(fallback_line(t="", ts=""), received_at=1_700_000_000.0)
    assert r["timestamp"] == "2023-11-14T22:13:20.000Z"


def test_fallback_endpoint_without_query():
    r = from_fallback(fallback_line(u="/gemini/v1beta/models/x:generateContent?key=AIzaSECRET",
                                    p="gemini"), received_at=1.0)
    assert r["endpoint"] == "/gemini/v1beta/models/x:generateContent"
    assert "AIzaSECRET" not in json.dumps(r)


def test_fallback_claude_on_vertex_is_anthropic_format():
    path = "/google/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-opus-4@20250514:streamRawPredict"
    r = from_fallback(fallback_line(p="google", u=path, done=""), received_at=1.0)
    assert r["api_format"] == "anthropic"
    assert r["model"] == "claude-opus-4@20250514"
    assert r["status"] == 499


def test_fallback_without_syslog_prefix():
    line = json.dumps({"s": "403", "err": "forbidden", "done": "OK", "p": "anthropic",
                       "u": "/anthropic/v1/messages"}).encode()
    r = from_fallback(line, received_at=1.0)
    assert r["api_format"] == "anthropic" and r["error_type"] == "forbidden"


@pytest.mark.parametrize("line", [
    b"", b"garbage", b"<190>Nov 14 host nginx: no json here", b"{", b"{not json}", b"{\"a\":", b"[1,2,3]",
    b"\"just a string\"", b"\xff\xfe\x00{", b"<190>x nginx: {\"s\":\"200\"} trailing", b"{}}",
    b"\x00" * 100, bytes(range(256)),
])
def test_fallback_garbage_is_none(line):
    assert from_fallback(line, received_at=1.0) is None


@pytest.mark.parametrize("fields", [{"ts": "nan"}, {"ts": "inf"}, {"ts": "1e300"}, {"t": "inf"},
                                    {"t": "-1e300"}])
def test_fallback_odd_times_never_raise(fields):
    r = from_fallback(fallback_line(**fields), received_at=1.0)
    if r is not None:
        json.dumps(r, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fallback_random_bytes_never_raise(data):
    r = from_fallback(data, received_at=1.0)
    assert r is None or isinstance(r, dict)


def _not_a_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return True
    return False


sane_time = st.one_of(st.floats(min_value=0, max_value=4e9).map(repr), st.text(max_size=8).filter(_not_a_float))
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                        st.text(max_size=40))
fallback_fields = st.fixed_dictionaries(
    {"t": sane_time, "ts": sane_time},
    optional={k: st.one_of(json_scalar, st.sampled_from(["OK", "", "forbidden", "403", "200", "499",
                                                          "/google/x/models/m:stream", "gemini", "google"]))
              for k in ("rid", "id", "own", "mk", "p", "m", "u", "s", "done", "err", "ct", "n")})


@settings(max_examples=300, deadline=None)
@given(fallback_fields, st.dictionaries(st.text(max_size=5), json_scalar, max_size=3))
def test_fallback_random_fields_never_raise(fields, extra):
    line = b"<190>x nginx: " + json.dumps({**extra, **fields}).encode()
    r = from_fallback(line, received_at=1_700_000_000.0)
    assert isinstance(r, dict)
    assert set(r) == RECORD_FIELDS
    json.dumps(r, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["rid", "id", "own", "mk", "p", "m", "u", "s", "ct", "h", "n", "x"]),
                       st.text(max_size=30), max_size=10),
       st.binary(max_size=500), sane_time, sane_time)
def test_capture_random_metadata_gives_a_record(meta, body, t, ts):
    from urllib.parse import urlencode
    r = from_capture(urlencode({**meta, "t": t, "ts": ts}), body, received_at=1_700_000_000.0)
    assert set(r) == RECORD_FIELDS
    json.dumps(r, allow_nan=False)


def test_iso_utc():
    assert iso_utc(0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(1_700_000_000.5) == "2023-11-14T22:13:20.500Z"
    assert iso_utc(1_700_000_000.0999) == "2023-11-14T22:13:20.099Z"
