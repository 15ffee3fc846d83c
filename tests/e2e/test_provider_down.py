"""One provider's host does not resolve: LMGate starts anyway, serves the others, and answers that
provider's calls with a 502 in its own error shape, recorded as upstream_unreachable."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest

from tests.support.gate import ALICE_KEY, UNLISTED_KEY, bearer

pytestmark = pytest.mark.e2e

DOWN_HOST = "nonexistent.invalid"  # RFC 6761: never resolves
MESSAGE = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-0",
           "content": [{"type": "text", "text": "Hi"}], "stop_reason": "end_turn",
           "usage": {"input_tokens": 9, "output_tokens": 2}}


@pytest.fixture
def messages(mock_upstream):
    mock_upstream.reply("/v1/messages", body=json.dumps(MESSAGE).encode())
    yield
    del mock_upstream.replies["/v1/messages"]  # the mock is shared by the session


def test_unresolvable_provider_answers_502_and_the_others_work(own_gate, messages):
    gate = own_gate(LMGATE_PROVIDERS__OPENAI__UPSTREAM=f"https://{DOWN_HOST}")
    assert f"provider openai: its upstream host {DOWN_HOST} does not resolve" in gate.log()
    mark = gate.mark()

    client = openai.OpenAI(base_url=gate.base("openai") + "/v1", api_key=ALICE_KEY, max_retries=0)
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == 502
    assert raised.value.body["code"] == "lmgate_upstream_unreachable"
    assert "could not reach the openai upstream" in raised.value.body["message"]

    # The key is still checked first: a key not on the list gets the usual 403.
    denied = httpx.post(gate.base("openai") + "/v1/chat/completions", headers=bearer(UNLISTED_KEY), json={})
    assert denied.status_code == 403

    reply = anthropic.Anthropic(base_url=gate.base("anthropic"), api_key=ALICE_KEY, max_retries=0).messages.create(
        model="claude-sonnet-4-0", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    assert reply.usage.output_tokens == 2

    records = sorted(gate.new_records(mark, 3), key=lambda r: r["timestamp"])
    down, refused, served = records
    assert (down["provider"], down["status"], down["error_type"], down["lmgate_id"]) == \
        ("openai", 502, "upstream_unreachable", "alice")
    assert (refused["status"], refused["error_type"]) == (403, "forbidden")
    assert (served["provider"], served["status"], served["error_type"], served["output_tokens"]) == \
        ("anthropic", 200, None, 2)
