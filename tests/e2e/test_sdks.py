"""The providers' real Python SDKs pointed at LMGate, against a mock replaying recorded responses.

Each SDK must return the same parsed result through LMGate as it does against the mock directly,
and the call must leave exactly one stats record with the recorded model and counts. The README's
client snippets are the ones used here (tests/e2e/test_readme_snippets.py checks they match).
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import FIXTURES_DIR
from tests.support.gate import ALICE_KEY
from tests.support.mock_upstream import Reply

pytestmark = pytest.mark.e2e

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")
genai = pytest.importorskip("google.genai")
from google.genai import types as genai_types  # noqa: E402


def load_fixture(name: str) -> tuple[dict, bytes]:
    meta_path = FIXTURES_DIR / f"{name}.json"
    if not meta_path.exists():
        pytest.skip(f"recorded fixture {name} not found under {FIXTURES_DIR} (set LMGATE_FIXTURES_DIR)")
    return json.loads(meta_path.read_text()), (FIXTURES_DIR / f"{name}.response").read_bytes()


def serve_fixture(mock, name: str) -> dict:
    meta, body = load_fixture(name)
    stream = meta["content_type"].startswith("text/event-stream")
    if stream:
        # Send event by event, as providers do.
        sep = b"\r\n\r\n" if b"\r\n\r\n" in body else b"\n\n"
        parts = [p + sep for p in body.split(sep)]
        parts[-1] = parts[-1][:-len(sep)]
        parts = [p for p in parts if p]
        assert b"".join(parts) == body
        mock.reply("*", Reply(status=meta["status"], content_type=meta["content_type"], chunks=parts))
    else:
        mock.reply("*", Reply(status=meta["status"], content_type=meta["content_type"], body=body))
    return meta


# ---- the clients, exactly as the README shows them -------------------------------------------

# `root` stands where the provider's own host would: http://localhost:8080/<provider> through LMGate.
def openai_client(root: str) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{root}/v1", api_key=ALICE_KEY, max_retries=0)


def anthropic_client(root: str) -> "anthropic.Anthropic":
    return anthropic.Anthropic(base_url=root, api_key=ALICE_KEY, max_retries=0)


def gemini_client(root: str) -> "genai.Client":
    return genai.Client(api_key=ALICE_KEY, http_options=genai_types.HttpOptions(base_url=root))


def vertex_client(root: str) -> "genai.Client":
    return genai.Client(vertexai=True, api_key=ALICE_KEY, http_options=genai_types.HttpOptions(base_url=root))


def _dump(obj):
    if hasattr(obj, "model_dump"):
        data = obj.model_dump(mode="json")
        data.pop("sdk_http_response", None)  # google-genai keeps the raw headers (Date differs)
        return data
    return obj


# Each case: fixture, provider prefix, how to build the client from a base URL, the call.
CASES = {
    "openai/chat_completions_basic": ("openai", openai_client, lambda c: c.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}])),
    "openai/chat_completions_stream_include_usage": ("openai", openai_client, lambda c: list(
        c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True,
                                  stream_options={"include_usage": True}))),
    "openai/responses_basic": ("openai", openai_client, lambda c: c.responses.create(model="gpt-5.5", input="hi")),
    "openai/responses_stream": ("openai", openai_client, lambda c: list(
        c.responses.create(model="gpt-5.5", input="hi", stream=True))),
    "openai/embeddings_base64": ("openai", openai_client, lambda c: c.embeddings.create(
        model="text-embedding-ada-002", input="hi")),
    "anthropic/messages_basic": ("anthropic", anthropic_client, lambda c: c.messages.create(
        model="claude-sonnet-4-0", max_tokens=64, messages=[{"role": "user", "content": "hi"}])),
    "anthropic/messages_stream": ("anthropic", anthropic_client, lambda c: list(c.messages.create(
        model="claude-sonnet-4-0", max_tokens=64, messages=[{"role": "user", "content": "hi"}], stream=True))),
    "anthropic/messages_stream_tool_use": ("anthropic", anthropic_client, lambda c: list(c.messages.create(
        model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": "hi"}], stream=True))),
    "google/gemini_generate_content_basic": ("gemini", gemini_client, lambda c: c.models.generate_content(
        model="gemini-2.0-flash", contents="hi")),
    "google/gemini_stream_sse": ("gemini", gemini_client, lambda c: list(c.models.generate_content_stream(
        model="gemini-2.5-flash", contents="hi"))),
    "google/vertex_generate_content": ("google", vertex_client, lambda c: c.models.generate_content(
        model="gemini-2.0-flash-exp", contents="hi")),
    "google/vertex_stream_sse": ("google", vertex_client, lambda c: list(c.models.generate_content_stream(
        model="gemini-3-flash-preview", contents="hi"))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sdk_through_lmgate_matches_direct_call_and_is_recorded(case, gate, mock_upstream):
    provider, make_client, call = CASES[case]
    meta = serve_fixture(mock_upstream, case)

    direct = _dump_all(call(make_client(mock_upstream.url)))
    direct_request = mock_upstream.seen[-1]
    mark = gate.mark()
    through = _dump_all(call(make_client(gate.base(provider))))
    gated_request = mock_upstream.seen[-1]

    assert through == direct
    # The provider saw the same request either way (same path, query and body).
    assert gated_request.path_qs == direct_request.path_qs
    assert gated_request.body == direct_request.body
    [record] = gate.new_records(mark, 1)
    expected = meta["expected"]
    assert record["provider"] == provider
    assert record["endpoint"] == f"/{provider}{gated_request.path_qs.split('?')[0]}"
    assert record["status"] == meta["status"]
    assert record["stream"] == meta["stream"]
    assert record["model"] == expected["model"]
    assert record["input_tokens"] == expected["input_tokens"]
    assert record["output_tokens"] == expected["output_tokens"]
    assert record["cache_read_tokens"] == expected["cached_input_tokens"]
    assert record["reasoning_tokens"] == expected["reasoning_tokens"]
    assert record["error_type"] is None
    assert record["lmgate_id"] == "alice"


def _dump_all(result):
    return [_dump(x) for x in result] if isinstance(result, list) else _dump(result)


@pytest.mark.parametrize("provider,make_client,call,error", [
    ("openai", openai_client, lambda c: c.chat.completions.create(model="gpt-4o", messages=[]),
     "PermissionDeniedError"),
    ("anthropic", anthropic_client, lambda c: c.messages.create(model="claude-sonnet-4-0", max_tokens=1,
                                                                messages=[]), "PermissionDeniedError"),
    ("gemini", gemini_client, lambda c: c.models.generate_content(model="gemini-2.0-flash", contents="hi"),
     "ClientError"),
])
def test_sdk_raises_its_permission_error_for_an_unlisted_key(provider, make_client, call, error, gate, monkeypatch):
    import tests.e2e.test_sdks as this
    monkeypatch.setattr(this, "ALICE_KEY", "sk-lmgate-test-not-on-the-list-123456")
    mark = gate.mark()
    with pytest.raises(Exception) as excinfo:
        call(make_client(gate.base(provider)))
    assert type(excinfo.value).__name__ == error
    assert "LMGate refused this API key" in str(excinfo.value)
    if provider == "gemini":
        assert excinfo.value.code == 403
    else:
        assert excinfo.value.status_code == 403
    [record] = gate.new_records(mark, 1)
    assert record["error_type"] == "forbidden" and record["masked_key"] == "...123456"


# ---- every recorded fixture through the gate (raw HTTP), not only the SDK-covered ones --------

def _fixture_names() -> list[str]:
    if not FIXTURES_DIR.is_dir():
        return []
    return sorted(f"{p.parent.name}/{p.stem}" for p in FIXTURES_DIR.glob("*/*.json"))


@pytest.mark.parametrize("name", _fixture_names() or [pytest.param("none", marks=pytest.mark.skip(
    reason=f"no recorded fixtures under {FIXTURES_DIR} (set LMGATE_FIXTURES_DIR)"))])
def test_every_recorded_response_through_the_gate_gives_the_expected_record(name, gate, mock_upstream):
    import httpx
    meta = serve_fixture(mock_upstream, name)
    _, body = load_fixture(name)
    provider = {"api.anthropic.com": "anthropic", "aiplatform.googleapis.com": "google",
                "generativelanguage.googleapis.com": "gemini"}.get(meta["request_host"], meta["provider"])
    url = f"{gate.url}/{provider}{meta['request_path']}" + (f"?{meta['request_query']}" if meta["request_query"] else "")
    mark = gate.mark()
    resp = httpx.request(meta["request_method"], url, headers={"x-api-key": ALICE_KEY}, content=b"{}")
    assert resp.status_code == meta["status"]
    assert resp.content == body
    [record] = gate.new_records(mark, 1)
    expected = meta["expected"]
    for field, ours in (("model", "model"), ("input_tokens", "input_tokens"), ("output_tokens", "output_tokens"),
                        ("cached_input_tokens", "cache_read_tokens"), ("reasoning_tokens", "reasoning_tokens")):
        assert record[ours] == expected[field], field
    extra = meta.get("expected_extra") or {}
    if "cache_creation_input_tokens" in extra:
        assert record["cache_write_tokens"] == extra["cache_creation_input_tokens"]
    if meta["status"] < 400:  # the fixture's flag is the request's; ours says how the answer came
        assert record["stream"] == meta["stream"]
    if meta["status"] >= 400:
        assert record["error_type"] == ("rate_limited" if meta["status"] == 429 else "upstream_error")


# ---- an error inside an HTTP 200 stream -------------------------------------------------------

def _sse(*events: tuple[str | None, dict]) -> list[bytes]:
    return [(f"event: {name}\n" if name else "").encode() + b"data: " + json.dumps(data).encode() + b"\n\n"
            for name, data in events]


ANTHROPIC_BROKEN_OFF = _sse(
    ("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-20250514", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 25, "output_tokens": 1}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": "Hel"}}),
    ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}))
OPENAI_BROKEN_OFF = _sse(
    (None, {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-2024-08-06",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}, "finish_reason": None}]}),
    (None, {"error": {"message": "The server had an error while processing your request.", "type": "server_error",
                      "param": None, "code": None}}))


@pytest.mark.parametrize("provider,make_client,call,chunks,model,input_tokens", [
    ("anthropic", anthropic_client, lambda c: list(c.messages.create(
        model="claude-sonnet-4-0", max_tokens=64, messages=[{"role": "user", "content": "hi"}], stream=True)),
     ANTHROPIC_BROKEN_OFF, "claude-sonnet-4-20250514", 25),
    ("openai", openai_client, lambda c: list(c.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True})),
     OPENAI_BROKEN_OFF, "gpt-4o-2024-08-06", None),
], ids=["anthropic-overloaded", "openai-chat-error-chunk"])
def test_sdk_stream_broken_off_by_an_error_is_a_stream_error(provider, make_client, call, chunks, model,
                                                             input_tokens, gate, mock_upstream):
    """The SDK raises at the error event of an HTTP 200 stream; the record says so and keeps the
    usage reported before it."""
    mock_upstream.reply("*", Reply(content_type="text/event-stream", chunks=chunks))
    mark = gate.mark()
    with pytest.raises(Exception) as excinfo:
        call(make_client(gate.base(provider)))
    assert "Overloaded" in str(excinfo.value) or "server had an error" in str(excinfo.value)
    [record] = gate.new_records(mark, 1)
    assert (record["status"], record["error_type"], record["stream"]) == (200, "stream_error", True)
    assert (record["model"], record["input_tokens"]) == (model, input_tokens)
