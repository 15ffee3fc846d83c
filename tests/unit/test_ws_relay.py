"""lmgate.ws_relay.Tracker: the records a connection's frames give, one per response, hand-written
from each WebSocket API's documentation (the e2e tests run the relay itself)."""

from __future__ import annotations

import asyncio
import json

import pytest

from lmgate.ws_relay import Tracker
from tests.support.ws_upstream import LIVE_USAGE, REALTIME_USAGE, RESPONSES_USAGE
from tests.unit.test_records import RECORD_FIELDS

pytestmark = pytest.mark.unit

META = {"rid": "abc-1-2-1", "id": "alice", "own": "alice@example.com", "mk": "...abcdef", "p": "openai",
        "m": "GET"}


def tracker(api: str = "openai", endpoint: str = "/openai/v1/realtime", model: str | None = None):
    records: list[dict] = []
    t = Tracker(api, META["p"] if api == "openai" else "gemini", endpoint, dict(META), records.append, model)
    return t, records


def frame(doc: dict, binary: bool = False) -> str | bytes:
    data = json.dumps(doc)
    return data.encode() if binary else data


def tokens(r: dict) -> tuple:
    return (r["input_tokens"], r["output_tokens"], r["cache_read_tokens"], r["reasoning_tokens"], r["total_tokens"])


def realtime_response(status: str, usage: dict | None) -> dict:
    return {"object": "realtime.response", "id": "resp_1", "status": status, "output": [], "usage": usage}


@pytest.mark.parametrize("status,error_type", [("completed", None), ("cancelled", None), ("incomplete", None),
                                               ("failed", "stream_error")])
def test_realtime_response_done(status, error_type):
    t, records = tracker(model="gpt-realtime")
    t.from_upstream(frame({"type": "session.created", "session": {"model": "gpt-realtime-2025-08-28"}}))
    t.from_client(frame({"type": "response.create"}))
    t.from_upstream(frame({"type": "response.created", "response": realtime_response("in_progress", None)}))
    t.from_upstream(frame({"type": "response.output_audio.delta", "delta": "AAAA"}))
    t.from_upstream(frame({"type": "response.done", "response": realtime_response(status, REALTIME_USAGE)}))
    t.closed(by_client=True)
    [r] = records
    assert set(r) == RECORD_FIELDS
    assert (r["model"], r["error_type"], r["status"], r["stream"]) == ("gpt-realtime-2025-08-28", error_type, 101, True)
    assert tokens(r) == (132, 121, 64, None, 253)
    assert (r["request_id"], r["lmgate_id"], r["masked_key"], r["method"]) == ("abc-1-2-1-1", "alice", "...abcdef", "GET")
    assert r["response_bytes"] > 0


def test_responses_websocket_two_responses_and_a_cut_one():
    t, records = tracker(endpoint="/openai/v1/responses")
    for _ in range(2):
        t.from_upstream(frame({"type": "response.created", "response": {"model": "gpt-5-2025-08-07", "usage": None}}))
        t.from_upstream(frame({"type": "response.output_text.delta", "delta": "hi"}))
        t.from_upstream(frame({"type": "response.completed",
                               "response": {"model": "gpt-5-2025-08-07", "usage": RESPONSES_USAGE}}))
    t.from_upstream(frame({"type": "response.created", "response": {"model": "gpt-5-2025-08-07", "usage": None}}))
    t.closed(by_client=False)
    assert [tokens(r) for r in records] == [(36, 12, 8, 4, 48)] * 2 + [(None,) * 5]
    assert [r["error_type"] for r in records] == [None, None, "upstream_unreachable"]
    assert [r["request_id"][-2:] for r in records] == ["-1", "-2", "-3"]


def test_an_error_event_without_a_response_is_one_stream_error():
    t, records = tracker(endpoint="/openai/v1/responses")
    t.from_upstream(frame({"type": "error", "code": "invalid_request_error", "message": "bad"}))
    [r] = records
    assert (r["error_type"], r["input_tokens"]) == ("stream_error", None)


def test_a_realtime_error_event_neither_ends_a_response_nor_makes_one():
    """Realtime's error events are about one client event (docs: "most errors are recoverable");
    only response.done ends a response there."""
    t, records = tracker(model="gpt-realtime")
    t.from_upstream(frame({"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}))
    t.from_upstream(frame({"type": "response.created", "response": realtime_response("in_progress", None)}))
    t.from_upstream(frame({"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}))
    t.from_upstream(frame({"type": "response.done", "response": realtime_response("completed", REALTIME_USAGE)}))
    t.closed(by_client=True)
    [r] = records
    assert (r["error_type"], tokens(r)) == (None, (132, 121, 64, None, 253))


def test_frames_that_are_not_events_are_relayed_without_a_record():
    t, records = tracker(endpoint="/openai/v1/responses")
    for data in (b"\x00\xff not json", "[1, 2]", frame({"type": "rate_limits.updated"}), ""):
        t.from_upstream(data)
    t.closed(by_client=True)
    assert records == []


def live_turn(t: Tracker, binary: bool = True, usage: dict | None = LIVE_USAGE, usage_apart: bool = False) -> None:
    t.from_upstream(frame({"serverContent": {"modelTurn": {"parts": [{"text": "Hel"}]}}}, binary))
    t.from_upstream(frame({"serverContent": {"generationComplete": True}}, binary))
    last = {"serverContent": {"turnComplete": True}}
    if usage is not None and not usage_apart:
        last["usageMetadata"] = usage
    t.from_upstream(frame(last, binary))
    if usage is not None and usage_apart:
        t.from_upstream(frame({"usageMetadata": usage}, binary))


@pytest.mark.parametrize("binary", [True, False])
def test_gemini_live_turns(binary):
    t, records = tracker("google", "/gemini/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent")
    t.from_client(frame({"setup": {"model": "models/gemini-live-2.5-flash"}}, binary))
    t.from_upstream(frame({"setupComplete": {}}, binary))
    live_turn(t, binary)
    live_turn(t, binary, usage_apart=True)       # the usage in a message of its own, after turnComplete
    live_turn(t, binary, usage=None)              # no usage for this turn: known once the next begins
    live_turn(t, binary)
    t.closed(by_client=True)
    assert [r["model"] for r in records] == ["gemini-live-2.5-flash"] * 4
    assert [tokens(r)[:2] for r in records] == [(21, 9), (21, 9), (None, None), (21, 9)]
    assert [r["error_type"] for r in records] == [None, None, "usage_missing", None]
    assert records[0]["api_format"] == "google" and records[0]["total_tokens"] == 30


def test_gemini_live_cut_mid_turn_and_a_vertex_model_path():
    t, records = tracker("google", "/google/ws/google.cloud.aiplatform.v1.LlmBidiService/BidiGenerateContent")
    t.from_client(frame({"setup": {"model": "projects/p/locations/us-central1/publishers/google/models/gemini-live"}}))
    t.from_upstream(frame({"serverContent": {"modelTurn": {"parts": [{"text": "Hel"}]}},
                           "usageMetadata": {"promptTokenCount": 5, "responseTokenCount": 1}}))
    t.closed(by_client=True)
    [r] = records
    assert (r["model"], r["status"], r["error_type"], r["input_tokens"], r["output_tokens"]) == (
        "gemini-live", 499, "client_closed", 5, 1)


def test_gemini_live_turn_complete_without_usage_at_close_is_usage_missing_not_cut():
    t, records = tracker("google", "/gemini/ws/x.BidiGenerateContent")
    live_turn(t, usage=None)
    t.closed(by_client=True)
    [r] = records
    assert (r["status"], r["error_type"]) == (101, "usage_missing")


def test_the_side_that_ended_the_relay():
    """A client that left may also fail the upstream pump's write to it in the same wake-up: the
    response it cut is client_closed, not upstream_unreachable."""
    from lmgate.ws_relay import _first_to_end

    async def check():
        loop = asyncio.get_running_loop()

        def future(result=None, error=None, cancel=False):
            f = loop.create_future()
            if cancel:
                f.cancel()
            elif error is not None:
                f.set_exception(error)
            elif result != "pending":
                f.set_result(result)
            return f

        pending = "pending"
        assert _first_to_end({future(): "upstream", future(pending): "client"}) == "upstream"
        assert _first_to_end({future(pending): "upstream", future(): "client"}) == "client"
        assert _first_to_end({future(): "upstream", future(): "client"}) == "client"
        assert _first_to_end({future(error=ConnectionResetError()): "upstream",
                              future(pending): "client"}) == "client"
        assert _first_to_end({future(error=ValueError()): "upstream", future(pending): "client"}) == "upstream"
        assert _first_to_end({future(cancel=True): "upstream", future(cancel=True): "client"}) == "upstream"
    asyncio.run(check())
