"""lmgate.usage: hand-written minimal bodies for every response shape."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from lmgate.usage import Usage, extract_usage

pytestmark = pytest.mark.unit

SSE = "text/event-stream; charset=utf-8"
JSON = "application/json"
HEAD, TAIL = 16 * 1024, 64 * 1024


def sse(*events: object, crlf: bool = False, names: bool = False) -> bytes:
    """An SSE body; each event is a dict (JSON data), or a raw str data value."""
    nl = "\r\n" if crlf else "\n"
    out = []
    for event in events:
        data = event if isinstance(event, str) else json.dumps(event, separators=(",", ":"))
        name = f"event: {event['type']}{nl}" if names and isinstance(event, dict) else ""
        out.append(f"{name}data: {data}{nl}{nl}")
    return "".join(out).encode()


def js(obj: object) -> bytes:
    return json.dumps(obj, indent=2).encode()


def capture(body: bytes, head: int = HEAD, tail: int = TAIL) -> tuple[bytes, bytes | None]:
    """What nginx hands over: the whole body, or its first and last bytes."""
    if len(body) <= head + tail:
        return body, None
    return body[:head], body[-tail:]


def tokens(u: Usage) -> tuple:
    return (u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens,
            u.reasoning_tokens, u.total_tokens)


NO_TOKENS = (None,) * 6


# ------------------------------------------------------------------- OpenAI

def chat_chunk(content: str | None = "hi", usage: object = None, choices: bool = True) -> dict:
    chunk = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-2024-08-06",
             "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}] if choices else [],
             "usage": usage}
    return chunk


CHAT_USAGE = {"prompt_tokens": 16, "completion_tokens": 12, "total_tokens": 28,
              "prompt_tokens_details": {"cached_tokens": 4, "audio_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}}


def test_openai_chat_plain():
    body = js({"id": "c1", "object": "chat.completion", "model": "gpt-4o-2024-08-06",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "4242"}}],
               "usage": CHAT_USAGE})
    u = extract_usage("openai", "/v1/chat/completions", 200, JSON, body, None)
    assert u == Usage(model="gpt-4o-2024-08-06", input_tokens=16, output_tokens=12, cache_read_tokens=4,
                      reasoning_tokens=0, total_tokens=28)


def test_openai_chat_legacy_usage_has_no_details():
    body = js({"model": "gpt-3.5-turbo-0125", "choices": [],
               "usage": {"prompt_tokens": 15, "completion_tokens": 19, "total_tokens": 34}})
    u = extract_usage("openai", "/v1/chat/completions", 200, JSON, body, None)
    assert tokens(u) == (15, 19, None, None, None, 34)


@pytest.mark.parametrize("crlf", [False, True])
def test_openai_chat_stream_with_include_usage(crlf):
    body = sse(chat_chunk(""), chat_chunk("42"), chat_chunk(None),
               chat_chunk(usage=CHAT_USAGE, choices=False), "[DONE]", crlf=crlf)
    u = extract_usage("openai", "/v1/chat/completions", 200, SSE, body, None)
    assert u.model == "gpt-4o-2024-08-06" and u.stream and u.problem is None
    assert tokens(u) == (16, 12, 4, None, 0, 28)


def test_openai_chat_stream_without_include_usage():
    body = sse(chat_chunk(""), chat_chunk("42"), "[DONE]")
    body = body.replace(b',"usage":null', b"")          # no usage key at all
    u = extract_usage("openai", "/v1/chat/completions", 200, SSE, body, None)
    assert u == Usage(model="gpt-4o-2024-08-06", stream=True, problem="usage_missing")


def test_openai_legacy_completions():
    body = js({"object": "text_completion", "model": "gpt-3.5-turbo-instruct", "choices": [{"text": "x"}],
               "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}})
    u = extract_usage("openai", "/v1/completions", 200, JSON, body, None)
    assert (u.model, *tokens(u), u.problem) == ("gpt-3.5-turbo-instruct", 5, 7, None, None, None, 12, None)


def test_openai_embeddings_output_is_zero():
    body = js({"object": "list", "data": [{"embedding": [0.1, 0.2]}], "model": "text-embedding-3-small",
               "usage": {"prompt_tokens": 8, "total_tokens": 8}})
    u = extract_usage("openai", "/v1/embeddings", 200, JSON, body, None)
    assert (u.model, *tokens(u)) == ("text-embedding-3-small", 8, 0, None, None, None, 8)


RESP_USAGE = {"input_tokens": 11, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 327,
              "output_tokens_details": {"reasoning_tokens": 320}, "total_tokens": 338}


def response_obj(status: str, usage: object) -> dict:
    return {"id": "resp_1", "object": "response", "status": status, "error": None, "incomplete_details": None,
            "model": "gpt-5-nano-2025-08-07", "output": [], "usage": usage}


def test_openai_responses_plain():
    body = js(response_obj("completed", RESP_USAGE))
    u = extract_usage("openai", "/v1/responses", 200, JSON, body, None)
    assert (u.model, *tokens(u), u.problem) == ("gpt-5-nano-2025-08-07", 11, 327, 0, None, 320, 338, None)


@pytest.mark.parametrize("terminal", ["response.completed", "response.incomplete", "response.failed"])
def test_openai_responses_stream_terminal_event(terminal):
    body = sse({"type": "response.created", "response": response_obj("in_progress", None)},
               {"type": "response.in_progress", "response": response_obj("in_progress", None)},
               {"type": "response.output_text.delta", "delta": "pong", "sequence_number": 4},
               {"type": terminal, "response": response_obj(terminal.split(".")[1], RESP_USAGE)}, names=True)
    u = extract_usage("openai", "/v1/responses", 200, SSE, body, None)
    # response.failed is the provider's error inside an HTTP 200 stream; its usage is kept
    problem = "stream_error" if terminal == "response.failed" else None
    assert (u.model, *tokens(u), u.stream, u.problem) == (
        "gpt-5-nano-2025-08-07", 11, 327, 0, None, 320, 338, True, problem)


def test_openai_responses_stream_failed_without_usage():
    body = sse({"type": "response.created", "response": response_obj("in_progress", None)},
               {"type": "response.failed", "response": response_obj("failed", None)}, names=True)
    u = extract_usage("openai", "/v1/responses", 200, SSE, body, None)
    assert u == Usage(model="gpt-5-nano-2025-08-07", stream=True, problem="stream_error")


@pytest.mark.parametrize("status", [400, 401, 429, 500])
def test_openai_error_bodies(status):
    body = js({"error": {"message": "Incorrect API key", "type": "invalid_request_error", "code": "x"}})
    u = extract_usage("openai", "/v1/chat/completions", status, "application/json; charset=utf-8", body, None)
    assert u == Usage()
    u = extract_usage("openai", "/v1/chat/completions", status, SSE, body, None)
    assert u == Usage(stream=True)


def test_openai_non_generation_endpoint_has_no_problem():
    body = js({"object": "list", "data": [{"id": "gpt-4o"}]})
    assert extract_usage("openai", "/v1/models", 200, JSON, body, None) == Usage()
    body = js({"id": "gpt-4o", "object": "model"})
    assert extract_usage("openai", "/v1/models/gpt-4o", 200, JSON, body, None) == Usage()


@pytest.mark.parametrize("bad", ["x", None, [], 1, True])
def test_openai_usage_of_wrong_type_is_absent(bad):
    body = js({"model": "gpt-4o", "usage": bad})
    u = extract_usage("openai", "/v1/chat/completions", 200, JSON, body, None)
    assert tokens(u) == NO_TOKENS and u.problem == "usage_missing" and u.model == "gpt-4o"


def test_openai_counts_of_wrong_type_are_absent():
    body = js({"model": 5, "usage": {"prompt_tokens": -3, "completion_tokens": True, "total_tokens": 1.5,
                                     "prompt_tokens_details": "x", "completion_tokens_details": {"reasoning_tokens": "9"}}})
    u = extract_usage("openai", "/v1/chat/completions", 200, JSON, body, None)
    assert u.model is None and tokens(u) == NO_TOKENS and u.problem is None


# ---------------------------------------------------------------- Anthropic

def message(usage: dict, model: str = "claude-sonnet-4-20250514", **extra: object) -> dict:
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "usage": usage, **extra}


def test_anthropic_plain():
    body = js(message({"input_tokens": 17, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                       "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
                       "output_tokens": 15}))
    u = extract_usage("anthropic", "/v1/messages", 200, JSON, body, None)
    assert u == Usage(model="claude-sonnet-4-20250514", input_tokens=17, output_tokens=15,
                      cache_read_tokens=0, cache_write_tokens=0)


def test_anthropic_cache_fields_and_no_total():
    body = js(message({"input_tokens": 3, "cache_creation_input_tokens": 598, "cache_read_input_tokens": 4597,
                       "cache_creation": {"ephemeral_5m_input_tokens": 598, "ephemeral_1h_input_tokens": 0},
                       "output_tokens": 350}))
    u = extract_usage("anthropic", "/v1/messages", 200, JSON, body, None)
    assert tokens(u) == (3, 350, 4597, 598, None, None)


def test_anthropic_tool_use_plain_legacy_usage():
    body = js(message({"input_tokens": 514, "output_tokens": 152}, model="claude-3-5-sonnet-20240620",
                      content=[{"type": "tool_use", "id": "t1", "name": "get", "input": {"model": "x", "usage": {}}}]))
    u = extract_usage("anthropic", "/v1/messages", 200, JSON, body, None)
    assert (u.model, *tokens(u)) == ("claude-3-5-sonnet-20240620", 514, 152, None, None, None, None)


def anthropic_stream(start_usage: dict, *deltas: dict, extra: tuple = (), model: str = "claude-sonnet-4-20250514",
                     text: str = "Hello") -> bytes:
    events = [{"type": "message_start", "message": message(start_usage, model=model)},
              {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
              {"type": "ping"},
              {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
              {"type": "content_block_stop", "index": 0}, *extra]
    events += [{"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": d} for d in deltas]
    events.append({"type": "message_stop"})
    return sse(*events, names=True)


def test_anthropic_stream_merges_delta_without_adding_placeholder():
    body = anthropic_stream({"input_tokens": 17, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                             "output_tokens": 1},
                            {"input_tokens": 17, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                             "output_tokens": 15})
    u = extract_usage("anthropic", "/v1/messages", 200, SSE, body, None)
    assert (u.model, *tokens(u), u.stream, u.problem) == (
        "claude-sonnet-4-20250514", 17, 15, 0, 0, None, None, True, None)


def test_anthropic_stream_legacy_delta_has_only_output():
    body = anthropic_stream({"input_tokens": 4, "cache_read_input_tokens": 1165, "cache_creation_input_tokens": 0,
                             "output_tokens": 3}, {"output_tokens": 221})
    u = extract_usage("anthropic", "/v1/messages", 200, SSE, body, None)
    assert tokens(u) == (4, 221, 1165, 0, None, None)


def test_anthropic_stream_later_delta_overrides_input():
    body = anthropic_stream({"input_tokens": 2039, "output_tokens": 3},
                            {"input_tokens": 10423, "output_tokens": 341,
                             "server_tool_use": {"web_search_requests": 1}})
    u = extract_usage("anthropic", "/v1/messages", 200, SSE, body, None)
    assert (u.input_tokens, u.output_tokens) == (10423, 341)


def test_anthropic_stream_tool_use():
    tool = ({"type": "content_block_start", "index": 1,
             "content_block": {"type": "tool_use", "id": "t1", "name": "f", "input": {}}},
            {"type": "content_block_delta", "index": 1,
             "delta": {"type": "input_json_delta", "partial_json": '{"usage": {"model": 1}}'}},
            {"type": "content_block_stop", "index": 1})
    body = anthropic_stream({"input_tokens": 542, "output_tokens": 62}, {"output_tokens": 62}, extra=tool,
                            model="claude-haiku-4-5-20251001")
    u = extract_usage("anthropic", "/v1/messages", 200, SSE, body, None)
    assert (u.model, u.input_tokens, u.output_tokens) == ("claude-haiku-4-5-20251001", 542, 62)


def test_anthropic_count_tokens_is_not_a_generation():
    u = extract_usage("anthropic", "/v1/messages/count_tokens", 200, JSON, b'{"input_tokens": 12}', None)
    assert u == Usage()


def test_anthropic_error_event_in_stream_keeps_usage():
    body = sse({"type": "message_start", "message": message({"input_tokens": 20, "output_tokens": 1})},
               {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, names=True)
    u = extract_usage("anthropic", "/v1/messages", 200, SSE, body, None)
    assert (u.model, u.input_tokens, u.output_tokens, u.problem) == (
        "claude-sonnet-4-20250514", 20, 1, "stream_error")


def test_anthropic_error_status():
    body = js({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}})
    assert extract_usage("anthropic", "/v1/messages", 401, JSON, body, None) == Usage()


def test_anthropic_compaction_sums_iterations():
    iterations = [{"type": "compaction", "input_tokens": 100, "output_tokens": 83, "cache_read_input_tokens": 55096,
                   "cache_creation_input_tokens": 0},
                  {"type": "message", "input_tokens": 181, "output_tokens": 8, "cache_read_input_tokens": 0,
                   "cache_creation_input_tokens": 0}]
    body = anthropic_stream({"input_tokens": 100, "cache_read_input_tokens": 55096, "output_tokens": 7},
                            {"input_tokens": 181, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                             "output_tokens": 8, "iterations": iterations}, model="claude-sonnet-4-6")
    u = extract_usage("anthropic", "/v1/messages", 200, SSE, body, None)
    assert tokens(u) == (281, 91, 55096, 0, None, None)


def test_claude_on_vertex_raw_predict():
    path = "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4@20250514:rawPredict"
    body = js(message({"input_tokens": 9, "output_tokens": 4}))
    u = extract_usage("google", path, 200, JSON, body, None)
    assert (u.model, *tokens(u), u.stream) == ("claude-sonnet-4-20250514", 9, 4, None, None, None, None, False)


def test_claude_on_vertex_stream_raw_predict():
    path = "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4@20250514:streamRawPredict"
    body = anthropic_stream({"input_tokens": 9, "output_tokens": 1}, {"output_tokens": 30})
    u = extract_usage("google", path, 200, SSE, body, None)
    assert (u.input_tokens, u.output_tokens, u.stream, u.problem) == (9, 30, True, None)
    # no usage at all: reported as missing, model from the path (also when the caller says "anthropic")
    for api in ("google", "anthropic"):
        u = extract_usage(api, path.replace("@", "%40"), 200, SSE, sse({"type": "ping"}), None)
        assert u == Usage(model="claude-sonnet-4@20250514", stream=True, problem="usage_missing")


# ------------------------------------------------------------------- Google

def gemini_chunk(text: str, usage: dict | None, model: str | None = "gemini-2.5-flash") -> dict:
    chunk: dict = {"candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}]}
    if usage is not None:
        chunk["usageMetadata"] = usage
    if model is not None:
        chunk["modelVersion"] = model
    return chunk


GEMINI_USAGE = {"promptTokenCount": 13, "candidatesTokenCount": 77, "totalTokenCount": 115,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 13}], "thoughtsTokenCount": 25}


def test_google_generate_content():
    body = js(gemini_chunk("hi", GEMINI_USAGE))
    u = extract_usage("google", "/v1beta/models/gemini-2.5-flash:generateContent", 200,
                      "application/json; charset=UTF-8", body, None)
    assert u == Usage(model="gemini-2.5-flash", input_tokens=13, output_tokens=77, reasoning_tokens=25,
                      total_tokens=115)


def test_google_cached_content_and_missing_candidates_count():
    usage = {"promptTokenCount": 3797, "cachedContentTokenCount": 3055, "thoughtsTokenCount": 1549,
             "totalTokenCount": 5346}
    body = js(gemini_chunk("", usage))
    u = extract_usage("google", "/v1beta/models/gemini-2.5-flash:generateContent", 200, JSON, body, None)
    assert tokens(u) == (3797, 0, 3055, None, 1549, 5346)


def test_google_sse_crlf_takes_last_snapshot():
    body = sse(gemini_chunk("a", {"promptTokenCount": 169, "candidatesTokenCount": 5, "totalTokenCount": 174}),
               gemini_chunk("b", {"promptTokenCount": 79, "candidatesTokenCount": 12, "totalTokenCount": 91},
                            model="gemini-2.0-flash"), crlf=True)
    u = extract_usage("google", "/v1beta/models/gemini-2.0-flash:streamGenerateContent", 200, "text/event-stream",
                      body, None)
    assert (u.model, *tokens(u), u.stream) == ("gemini-2.0-flash", 79, 12, None, None, None, 91, True)


def gemini_array(*chunks: dict) -> bytes:
    return b"[" + b"\n,\r\n".join(js(c) for c in chunks) + b"]"


def test_google_json_array_stream():
    body = gemini_array(gemini_chunk("a", {"promptTokenCount": 11, "totalTokenCount": 11}, model="gemini-3.6-flash"),
                        gemini_chunk("b", {"promptTokenCount": 11, "candidatesTokenCount": 2, "totalTokenCount": 304,
                                           "thoughtsTokenCount": 291}, model="gemini-3.6-flash"))
    u = extract_usage("google", "/v1beta/models/gemini-flash-latest:streamGenerateContent", 200,
                      "application/json; charset=UTF-8", body, None)
    assert (u.model, *tokens(u), u.stream) == ("gemini-3.6-flash", 11, 2, None, None, 291, 304, True)


def test_google_json_array_stream_that_ended_early():
    body = gemini_array(gemini_chunk("a", {"promptTokenCount": 11, "candidatesTokenCount": 1}),
                        gemini_chunk("b", {"promptTokenCount": 11, "candidatesTokenCount": 2}))[:-40]
    u = extract_usage("google", "/v1beta/models/gemini-2.5-flash:streamGenerateContent", 200, JSON, body, None)
    assert (u.input_tokens, u.output_tokens, u.problem) == (11, 2, None)


def test_vertex_model_from_path_when_body_has_no_model_version():
    path = "/v1/projects/p/locations/l/publishers/google/models/gemini-2.0-flash:generateContent"
    body = js(gemini_chunk("hi", {"promptTokenCount": 163, "candidatesTokenCount": 13, "totalTokenCount": 176},
                           model=None))
    u = extract_usage("google", path, 200, JSON, body, None)
    assert (u.model, u.input_tokens, u.output_tokens, u.total_tokens) == ("gemini-2.0-flash", 163, 13, 176)


def test_google_without_usage_metadata():
    body = sse(gemini_chunk("a", None, model=None), crlf=True)
    u = extract_usage("google", "/v1beta/models/gemini-2.5-flash:streamGenerateContent", 200, SSE, body, None)
    assert u == Usage(model="gemini-2.5-flash", stream=True, problem="usage_missing")


def test_google_count_tokens_is_not_a_generation():
    u = extract_usage("google", "/v1beta/models/gemini-2.5-flash:countTokens", 200, JSON, b'{"totalTokens": 3}', None)
    assert u == Usage(model="gemini-2.5-flash")


@pytest.mark.parametrize("ct", ["text/event-stream", "application/json; charset=UTF-8"])
def test_google_error_json_body_with_stream_content_type(ct):
    body = js({"error": {"code": 404, "message": "models/x is not found", "status": "NOT_FOUND"}})
    u = extract_usage("google", "/v1beta/models/x:streamGenerateContent", 404, ct, body, None)
    assert u == Usage(stream=True)
    u = extract_usage("google", "/v1beta/models/x:streamGenerateContent", 404, ct, body[:30], body[-20:])
    assert u == Usage(stream=True)


# ------------------------------------------------- errors inside an HTTP 200 stream

GEMINI_STREAM = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
FLASH_USAGE = {"promptTokenCount": 11, "candidatesTokenCount": 3, "totalTokenCount": 14}
GOOGLE_ERROR = {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}
OPENAI_CHAT_ERROR = {"error": {"message": "The server had an error while processing your request.",
                               "type": "server_error", "param": None, "code": None}}


def test_anthropic_overloaded_error_after_deltas_keeps_the_usage_so_far():
    events = [{"type": "message_start", "message": message({"input_tokens": 20, "output_tokens": 1})},
              {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
              {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
              {"type": "ping"},
              {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}]
    u = extract_usage("anthropic", "/v1/messages", 200, SSE, sse(*events, names=True, crlf=True), None)
    assert (u.model, *tokens(u), u.stream, u.problem) == (
        "claude-sonnet-4-20250514", 20, 1, None, None, None, None, True, "stream_error")


def test_claude_on_vertex_stream_error():
    path = "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4@20250514:streamRawPredict"
    body = sse({"type": "message_start", "message": message({"input_tokens": 9, "output_tokens": 1})},
               {"type": "error", "error": {"type": "api_error", "message": "Internal server error"}}, names=True)
    u = extract_usage("google", path, 200, SSE, body, None)
    assert (u.input_tokens, u.output_tokens, u.problem) == (9, 1, "stream_error")


def test_openai_responses_error_event():
    body = sse({"type": "response.created", "response": response_obj("in_progress", None)},
               {"type": "response.output_text.delta", "delta": "po", "sequence_number": 3},
               {"type": "error", "code": "ERR_SOMETHING", "message": "Something went wrong", "param": None,
                "sequence_number": 4}, names=True)
    u = extract_usage("openai", "/v1/responses", 200, SSE, body, None)
    assert u == Usage(model="gpt-5-nano-2025-08-07", stream=True, problem="stream_error")


@pytest.mark.parametrize("done", [False, True])
def test_openai_chat_chunk_with_an_error_object(done):
    body = sse(chat_chunk(""), chat_chunk("42"), OPENAI_CHAT_ERROR, *(["[DONE]"] if done else []))
    u = extract_usage("openai", "/v1/chat/completions", 200, SSE, body, None)
    assert u == Usage(model="gpt-4o-2024-08-06", stream=True, problem="stream_error")
    # legacy completions streams end the same way
    u = extract_usage("openai", "/v1/completions", 200, SSE, body, None)
    assert u.problem == "stream_error"


@pytest.mark.parametrize("crlf", [False, True])
def test_gemini_sse_stream_ending_with_an_error_keeps_the_last_usage(crlf):
    body = sse(gemini_chunk("a", {"promptTokenCount": 11, "totalTokenCount": 11}),
               gemini_chunk("b", FLASH_USAGE), GOOGLE_ERROR, crlf=crlf)
    u = extract_usage("google", GEMINI_STREAM, 200, SSE, body, None)
    assert (u.model, *tokens(u), u.stream, u.problem) == (
        "gemini-2.5-flash", 11, 3, None, None, None, 14, True, "stream_error")


def test_gemini_json_array_stream_ending_with_an_error():
    body = gemini_array(gemini_chunk("a", FLASH_USAGE), GOOGLE_ERROR)
    u = extract_usage("google", GEMINI_STREAM, 200, JSON, body, None)
    assert (u.input_tokens, u.output_tokens, u.problem) == (11, 3, "stream_error")
    # an error alone (no chunk before it) is still a stream error, not missing usage
    u = extract_usage("google", GEMINI_STREAM, 200, JSON, gemini_array(GOOGLE_ERROR), None)
    assert u == Usage(model="gemini-2.5-flash", stream=True, problem="stream_error")


def test_stream_error_in_the_tail_of_a_long_stream():
    body = b"".join(sse(gemini_chunk("x" * 500, FLASH_USAGE)) for _ in range(400)) + sse(GOOGLE_ERROR)
    u = extract_usage("google", GEMINI_STREAM, 200, SSE, *capture(body))
    assert (u.input_tokens, u.problem) == (11, "stream_error")


def test_error_lookalikes_inside_a_stream_are_not_errors():
    # an `error` object as a function's argument, an `error` type inside a tool's JSON string, a
    # Responses stream whose response says "error": null, an OpenAI usage chunk, an error far back
    call = {"candidates": [{"content": {"parts": [{"functionCall": {
        "name": "report", "args": {"error": {"code": 1}, "type": "error"}}}]}}],
        "usageMetadata": FLASH_USAGE, "modelVersion": "gemini-2.5-flash"}
    assert extract_usage("google", GEMINI_STREAM, 200, SSE, sse(call), None).problem is None
    tool = ({"type": "content_block_start", "index": 1,
             "content_block": {"type": "tool_use", "id": "t1", "name": "f", "input": {}}},
            {"type": "content_block_delta", "index": 1,
             "delta": {"type": "input_json_delta", "partial_json": '{"type": "error", "error": {}}'}},
            {"type": "content_block_stop", "index": 1})
    body = anthropic_stream({"input_tokens": 5, "output_tokens": 1}, {"output_tokens": 9}, extra=tool)
    assert extract_usage("anthropic", "/v1/messages", 200, SSE, body, None).problem is None
    body = sse({"type": "response.completed", "response": response_obj("completed", RESP_USAGE)}, names=True)
    assert extract_usage("openai", "/v1/responses", 200, SSE, body, None).problem is None
    body = sse(chat_chunk(""), OPENAI_CHAT_ERROR, *[chat_chunk("x")] * 3,
               chat_chunk(usage=CHAT_USAGE, choices=False), "[DONE]")
    assert extract_usage("openai", "/v1/chat/completions", 200, SSE, body, None).problem is None


def test_error_object_in_a_json_answer_that_is_not_a_stream_is_not_a_stream_error():
    body = js({"error": {"message": "odd", "type": "server_error"}})
    u = extract_usage("openai", "/v1/chat/completions", 200, JSON, body, None)
    assert u.problem == "usage_missing"


# --------------------------------------------------------- head/tail capture

def big_chat_stream(size: int, usage: bool = True) -> bytes:
    chunk = sse(chat_chunk("x" * 200))
    body = chunk * (size // len(chunk))
    if usage:
        body += sse(chat_chunk(usage=CHAT_USAGE, choices=False))
    return body + sse("[DONE]")


def test_10mb_openai_stream_usage_in_tail():
    head, tail = capture(big_chat_stream(10_000_000))
    assert tail is not None and len(head) == HEAD
    u = extract_usage("openai", "/v1/chat/completions", 200, SSE, head, tail)
    assert (u.model, *tokens(u), u.problem) == ("gpt-4o-2024-08-06", 16, 12, 4, None, 0, 28, None)


def test_10mb_openai_stream_without_usage_is_missing_not_truncated():
    head, tail = capture(big_chat_stream(10_000_000, usage=False))
    u = extract_usage("openai", "/v1/chat/completions", 200, SSE, head, tail)
    assert u == Usage(model="gpt-4o-2024-08-06", stream=True, problem="usage_missing")


@pytest.mark.parametrize("crlf", [False, True])
def test_10mb_anthropic_stream_merges_head_and_tail(crlf):
    delta = sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "y" * 300}},
                crlf=crlf, names=True)
    body = (sse({"type": "message_start", "message": message({"input_tokens": 17, "cache_read_input_tokens": 5,
                                                               "output_tokens": 1})}, crlf=crlf, names=True)
            + delta * (10_000_000 // len(delta))
            + sse({"type": "message_delta", "delta": {}, "usage": {"output_tokens": 9000}},
                  {"type": "message_stop"}, crlf=crlf, names=True))
    u = extract_usage("anthropic", "/v1/messages", 200, SSE, *capture(body))
    assert (u.model, *tokens(u), u.problem) == ("claude-sonnet-4-20250514", 17, 9000, 5, None, None, None, None)


def test_10mb_gemini_sse_stream():
    chunks = b"".join(sse(gemini_chunk("z" * 400, {"promptTokenCount": 7, "candidatesTokenCount": i}), crlf=True)
                      for i in range(1, 20_001))
    assert len(chunks) > 10_000_000
    u = extract_usage("google", "/v1beta/models/gemini-2.5-flash:streamGenerateContent", 200, "text/event-stream",
                      *capture(chunks))
    assert (u.model, u.input_tokens, u.output_tokens, u.problem) == ("gemini-2.5-flash", 7, 20_000, None)


def test_gemini_json_array_stream_cut():
    body = gemini_array(*(gemini_chunk("z" * 2000, {"promptTokenCount": 7, "candidatesTokenCount": i},
                                       model="gemini-3.6-flash") for i in range(1, 201)))
    u = extract_usage("google", "/v1beta/models/gemini-flash-latest:streamGenerateContent", 200, JSON,
                      *capture(body))
    assert (u.model, u.input_tokens, u.output_tokens, u.problem) == ("gemini-3.6-flash", 7, 200, None)


def test_responses_stream_with_terminal_event_bigger_than_tail():
    big = response_obj("completed", RESP_USAGE)
    big["output"] = [{"type": "message", "content": [{"type": "output_text", "text": "w" * 200_000}]}]
    body = sse({"type": "response.created", "response": response_obj("in_progress", None)},
               {"type": "response.completed", "response": big}, names=True)
    u = extract_usage("openai", "/v1/responses", 200, SSE, *capture(body))
    assert (u.model, *tokens(u), u.problem) == ("gpt-5-nano-2025-08-07", 11, 327, 0, None, 320, 338, None)


@pytest.mark.parametrize("api,path,doc,expected", [
    ("openai", "/v1/chat/completions",
     {"id": "c", "model": "gpt-4o-2024-08-06", "choices": [{"message": {"content": "v" * 300_000}}],
      "usage": CHAT_USAGE},
     ("gpt-4o-2024-08-06", 16, 12, 4, None, 0, 28)),
    ("anthropic", "/v1/messages",
     message({"input_tokens": 17, "output_tokens": 15}, content=[{"type": "text", "text": "v" * 300_000}]),
     ("claude-sonnet-4-20250514", 17, 15, None, None, None, None)),
    ("google", "/v1beta/models/gemini-2.5-flash-lite:generateContent",
     gemini_chunk("v" * 300_000, GEMINI_USAGE),
     ("gemini-2.5-flash", 13, 77, None, None, 25, 115)),
], ids=["openai", "anthropic", "google"])
def test_plain_json_bigger_than_capture(api, path, doc, expected):
    head, tail = capture(js(doc))
    assert tail is not None
    u = extract_usage(api, path, 200, JSON, head, tail)
    assert (u.model, *tokens(u), u.problem) == (*expected, None)


def test_usage_in_the_gap_is_capture_truncated():
    # plain JSON with usage in the middle: neither head nor tail holds it
    doc = {"model": "gpt-4o", "pad1": "p" * 100_000, "usage": CHAT_USAGE, "pad2": "q" * 100_000}
    u = extract_usage("openai", "/v1/chat/completions", 200, JSON, *capture(js(doc)))
    assert u == Usage(model="gpt-4o", problem="capture_truncated")
    # a stream whose last event is larger than the tail and lacks usage where the tail can see it
    body = sse(chat_chunk("a"), chat_chunk("b" * 200_000))
    u = extract_usage("openai", "/v1/chat/completions", 200, SSE, *capture(body))
    assert u == Usage(model="gpt-4o-2024-08-06", stream=True, problem="capture_truncated")


def test_anthropic_message_start_in_the_gap_is_capture_truncated():
    body = anthropic_stream({"input_tokens": 17, "output_tokens": 3}, {"output_tokens": 171})
    u = extract_usage("anthropic", "/v1/messages", 200, SSE, body[:60], body[-600:])
    assert (u.input_tokens, u.output_tokens, u.problem) == (None, 171, "capture_truncated")


def test_truncated_error_body_is_not_a_problem():
    body = js({"error": {"message": "e" * 10_000}})
    assert extract_usage("openai", "/v1/chat/completions", 500, JSON, body[:100], body[-100:]) == Usage()


# ------------------------------------------------------------ never raises

APIS = st.sampled_from(["openai", "anthropic", "google", "other"])
PATHS = st.sampled_from(["/v1/chat/completions", "/v1/responses", "/v1/messages", "/v1/embeddings",
                         "/v1beta/models/m:streamGenerateContent",
                         "/v1/projects/p/locations/l/publishers/anthropic/models/c:streamRawPredict", ""])
CTS = st.sampled_from([SSE, JSON, "", "text/plain"])


@settings(max_examples=300, deadline=None)
@given(api=APIS, path=PATHS, status=st.sampled_from([200, 204, 400, 500]), ct=CTS,
       head=st.binary(max_size=600), tail=st.none() | st.binary(max_size=600))
def test_random_bytes_never_raise(api, path, status, ct, head, tail):
    u = extract_usage(api, path, status, ct, head, tail)
    assert isinstance(u, Usage)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["usage", "usageMetadata", "model", "modelVersion", "message", "response", "type",
                         "input_tokens", "output_tokens", "prompt_tokens", "promptTokenCount", "iterations",
                         "candidatesTokenCount", "prompt_tokens_details", "cached_tokens", "x"]),
        inner, max_size=5),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(api=APIS, path=PATHS, ct=CTS, docs=st.lists(_json_values, max_size=4), cut=st.integers(0, 400))
def test_json_of_wrong_shapes_never_raises(api, path, ct, docs, cut):
    body = sse(*docs) if ct == SSE else json.dumps(docs).encode()
    for head, tail in ((body, None), (body[:cut], body[cut // 2:])):
        u = extract_usage(api, path, 200, ct, head, tail)
        assert isinstance(u, Usage)
        for n in tokens(u):
            assert n is None or (type(n) is int and n >= 0)
        assert u.model is None or isinstance(u.model, str)


@pytest.mark.parametrize("head", [b"[" * 100_000, b"{" * 50_000, b"\xff\xfe\x00garbage", b"data: " + b"[" * 100_000,
                                  b'data: {"usage": {"input_tokens": 1e999}}', b'{"usage": {"prompt_tokens": 1e99}}'])
def test_hostile_bodies(head):
    for api in ("openai", "anthropic", "google"):
        for tail in (None, head):
            assert isinstance(extract_usage(api, "/v1/messages", 200, SSE, head, tail), Usage)
            assert isinstance(extract_usage(api, "/v1/messages", 200, JSON, head, tail), Usage)


def test_wrong_argument_types_never_raise():
    assert extract_usage(None, None, None, None, None, None) == Usage()  # type: ignore[arg-type]
    assert isinstance(extract_usage("openai", "/v1/responses", "200", 5, "str", 3), Usage)  # type: ignore[arg-type]
