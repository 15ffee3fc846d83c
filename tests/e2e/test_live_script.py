"""scripts/live_tests.py (run by scripts/run-live-tests.sh against the real providers), its logic
run here against a local mock of the four providers: LMGate, the SDKs and the records are real."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import web

from tests.support.threaded_server import ThreadedServer

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "live_tests.py"
KEYS = {"OPENAI_API_KEY": "sk-live-test-openai-0123456789abcdef",
        "ANTHROPIC_API_KEY": "sk-ant-live-test-0123456789abcdef",
        "GEMINI_API_KEY": "AIza-live-test-gemini-0123456789abcdef",
        "VERTEX_API_KEY": "AQ.live-test-vertex-0123456789abcdef"}


def _sse(events: list[dict], crlf: bool = False) -> bytes:
    sep = "\r\n\r\n" if crlf else "\n\n"
    return "".join(f"data: {json.dumps(e)}{sep}" for e in events).encode()


class FourProviders(ThreadedServer):
    """Answers each provider's plain and streamed call, each with its own token counts."""

    def __init__(self) -> None:
        super().__init__()
        self.url = f"http://127.0.0.1:{self.port}"
        self.n = 10

    def _tokens(self) -> tuple[int, int]:
        self.n += 1
        return self.n, self.n % 7 + 2

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read() or b"{}")
        path = request.path
        inp, out = self._tokens()
        if path == "/v1/chat/completions":
            model = "gpt-4o-mini-2024-07-18"
            usage = {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out}
            if not body.get("stream"):
                return web.json_response({"id": "c", "object": "chat.completion", "created": 1, "model": model,
                                          "choices": [{"index": 0, "finish_reason": "stop",
                                                       "message": {"role": "assistant", "content": "Hi"}}],
                                          "usage": usage})
            base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": model}
            data = _sse([{**base, "choices": [{"index": 0, "delta": {"content": "Hi"}}]},
                         {**base, "choices": [], "usage": usage}]) + b"data: [DONE]\n\n"
            return web.Response(body=data, content_type="text/event-stream")
        if path == "/v1/messages":
            model = "claude-haiku-4-5-20251001"
            message = {"id": "m", "type": "message", "role": "assistant", "model": model,
                       "content": [{"type": "text", "text": "Hi"}], "stop_reason": "end_turn",
                       "usage": {"input_tokens": inp, "output_tokens": out}}
            if not body.get("stream"):
                return web.json_response(message)
            start = {**message, "content": [], "stop_reason": None, "usage": {"input_tokens": inp, "output_tokens": 1}}
            events = [("message_start", {"type": "message_start", "message": start}),
                      ("content_block_start", {"type": "content_block_start", "index": 0,
                                               "content_block": {"type": "text", "text": ""}}),
                      ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "text_delta", "text": "Hi"}}),
                      ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                      ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                         "usage": {"output_tokens": out}}),
                      ("message_stop", {"type": "message_stop"})]
            data = "".join(f"event: {name}\ndata: {json.dumps(e)}\n\n" for name, e in events).encode()
            return web.Response(body=data, content_type="text/event-stream")
        if ":generateContent" in path or ":streamGenerateContent" in path:
            model = "gemini-2.5-flash"
            usage = {"promptTokenCount": inp, "candidatesTokenCount": out, "totalTokenCount": inp + out + 4,
                     "thoughtsTokenCount": 4}
            answer = {"candidates": [{"content": {"role": "model", "parts": [{"text": "Hi"}]},
                                      "finishReason": "STOP"}], "usageMetadata": usage, "modelVersion": model}
            if ":generateContent" in path:
                return web.json_response(answer)
            first = {"candidates": [{"content": {"role": "model", "parts": [{"text": "H"}]}}],
                     "usageMetadata": {"promptTokenCount": inp, "totalTokenCount": inp}, "modelVersion": model}
            return web.Response(body=_sse([first, answer], crlf=True), content_type="text/event-stream")
        return web.json_response({"error": {"message": f"mock: no answer for {path}"}}, status=404)


@pytest.fixture(scope="module")
def providers():
    mock = FourProviders().start()
    yield mock
    mock.stop()


def run_script(env: dict[str, str]) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if k not in KEYS and k not in ("GOOGLE_CLOUD_PROJECT", "CI") and not k.startswith("LMGATE_")}
    return subprocess.run([sys.executable, str(SCRIPT)], env={**base, **env}, cwd="/", capture_output=True,
                          text=True, timeout=180)


def overrides(url: str) -> dict[str, str]:
    return {f"LMGATE_PROVIDERS__{p.upper()}__UPSTREAM": url for p in ("openai", "anthropic", "gemini", "google")}


def test_every_provider_plain_and_streamed_matches_the_sdk(providers):
    result = run_script({**KEYS, **overrides(providers.url)})
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    ok = [line for line in out.splitlines() if line.startswith("ok ")]
    assert sorted(line.split()[1:3] for line in ok) == sorted(
        [p, m] for p in ("openai", "anthropic", "gemini", "google") for m in ("plain", "stream")), out
    assert "4 providers checked, 0 skipped, 0 failures" in out
    for key in KEYS.values():
        assert key not in out
    assert "...abcdef" in out  # keys show masked


def test_providers_without_a_key_are_skipped_and_ci_stays_offline(providers):
    env = {"OPENAI_API_KEY": KEYS["OPENAI_API_KEY"], "ANTHROPIC_API_KEY": KEYS["ANTHROPIC_API_KEY"], "CI": "true",
           "LMGATE_PROVIDERS__OPENAI__UPSTREAM": providers.url}
    result = run_script(env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "skip  anthropic: CI is set (no network there)" in out
    assert "skip  gemini: GEMINI_API_KEY is not set" in out
    assert "skip  google: VERTEX_API_KEY or GOOGLE_CLOUD_PROJECT is not set" in out
    assert "1 providers checked, 3 skipped, 0 failures" in out

    result = run_script({})
    assert result.returncode == 0 and "nothing checked: no provider's key is set" in result.stdout


def test_a_record_that_disagrees_with_the_sdk_fails(monkeypatch):
    spec = importlib.util.spec_from_file_location("live_tests", SCRIPT)
    live = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "live_tests", live)  # dataclasses look their module up
    spec.loader.exec_module(live)
    call = live.Call("openai", "stream", {"input_tokens": 11, "output_tokens": 7, "total_tokens": 18}, "gpt-x")
    record = {"provider": "openai", "stream": True, "status": 200, "error_type": None, "model": "gpt-x",
              "input_tokens": 11, "output_tokens": 7, "total_tokens": 18}
    assert live.compare(record, call) == []
    assert live.compare({**record, "output_tokens": 6}, call) == ["output_tokens: record 6, SDK 7"]
    assert live.compare({**record, "stream": False, "error_type": "usage_missing"}, call) == [
        "record status 200, error_type usage_missing", "record stream False, expected True"]
