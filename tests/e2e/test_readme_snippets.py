"""The README's client snippets, run as written (only the host is pointed at the test's LMGate)."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from tests.support.gate import ALICE_KEY
from tests.support.mock_upstream import Reply

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[2] / "README.md"

OPENAI_CHAT = {"id": "chatcmpl-r", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini-2024-07-18",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from OpenAI"},
                            "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}}
ANTHROPIC_EVENTS = [
    ("message_start", {"type": "message_start", "message": {
        "id": "msg_r", "type": "message", "role": "assistant", "model": "claude-sonnet-4-20250514", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 1}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": "Hello from Claude"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                       "usage": {"output_tokens": 5}}),
    ("message_stop", {"type": "message_stop"}),
]
GEMINI = {"candidates": [{"content": {"role": "model", "parts": [{"text": "Hello from Gemini"}]},
                          "finishReason": "STOP"}],
          "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 4, "totalTokenCount": 7},
          "modelVersion": "gemini-2.5-flash"}

# snippet marker → (mock reply, expected output, provider, expected record counts)
EXPECTED = {
    "from openai import": (Reply(body=json.dumps(OPENAI_CHAT).encode()), "Hello from OpenAI", "openai", (9, 4)),
    "from anthropic import": (Reply(content_type="text/event-stream", chunks=[
        f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in ANTHROPIC_EVENTS]),
        "Hello from Claude", "anthropic", (10, 5)),
    'os.environ["GEMINI_API_KEY"]': (Reply(body=json.dumps(GEMINI).encode()), "Hello from Gemini", "gemini", (3, 4)),
    "vertexai=True": (Reply(body=json.dumps(GEMINI).encode()), "Hello from Gemini", "google", (3, 4)),
}


def readme_snippets() -> list[str]:
    text = README.read_text()
    section = text.split("## Using it from your code", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_has_one_snippet_per_client():
    snippets = readme_snippets()
    assert len(snippets) == len(EXPECTED)
    for marker in EXPECTED:
        assert sum(marker in s for s in snippets) == 1, marker


@pytest.mark.parametrize("marker", list(EXPECTED))
def test_readme_snippet_runs_through_lmgate(marker, gate, mock_upstream, monkeypatch):
    pytest.importorskip("openai"), pytest.importorskip("anthropic"), pytest.importorskip("google.genai")
    [snippet] = [s for s in readme_snippets() if marker in s]
    reply, expected_output, provider, (tokens_in, tokens_out) = EXPECTED[marker]
    mock_upstream.reply("*", reply)
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY"):
        monkeypatch.setenv(name, ALICE_KEY)
    assert "http://localhost:8080/" in snippet
    code = snippet.replace("http://localhost:8080", gate.url)
    mark = gate.mark()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"README.md[{marker}]", "exec"), {})
    assert out.getvalue().strip() == expected_output
    [record] = gate.new_records(mark, 1)
    assert record["provider"] == provider and record["lmgate_id"] == "alice"
    assert (record["input_tokens"], record["output_tokens"]) == (tokens_in, tokens_out)
