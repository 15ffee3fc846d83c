"""Live checks against the real providers: scripts/run-live-tests.sh runs this.

With a provider's key in the environment, LMGate is started (`lmgate up`, the shipped config) with
that key on a temporary allow-list, the provider's official SDK makes one small plain and one
streamed call through it, and each call's record must carry the token counts the SDK reports.
A provider without a key is skipped, and says so. Keys are never printed: only their masked form.

  OPENAI_API_KEY      OpenAI (model: $LMGATE_LIVE_OPENAI_MODEL, default gpt-4o-mini)
  ANTHROPIC_API_KEY   Anthropic (model: $LMGATE_LIVE_ANTHROPIC_MODEL, default claude-haiku-4-5)
  GEMINI_API_KEY      Gemini API (model: $LMGATE_LIVE_GEMINI_MODEL, default gemini-2.5-flash)
  VERTEX_API_KEY      Vertex AI, express mode (model: $LMGATE_LIVE_VERTEX_MODEL, default gemini-2.5-flash);
                      or GOOGLE_CLOUD_PROJECT with application default credentials
                      (GOOGLE_CLOUD_LOCATION, default global)

LMGATE_PROVIDERS__<NAME>__UPSTREAM points a provider elsewhere (its tests use a local mock). With
CI set, a provider still pointed at its real host is skipped: CI has no network.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lmgate.keys import mask_key  # noqa: E402
from lmgate.supervisor import http_ok  # noqa: E402

CONFIG = REPO / "config" / "lmgate.yaml"
PROMPT = "Say hello in three words."
MAX_TOKENS = 64
RECORD_WAIT_SECONDS = 20

# The record's token fields each SDK's usage object reports, under the SDK's names.
Usage = dict[str, int | None]


@dataclass
class Call:
    provider: str
    mode: str              # "plain" or "stream"
    usage: Usage           # record field -> the SDK's count
    model: str | None


# ---- the calls, one plain and one streamed per provider, with each SDK's own usage

def _openai(base: str, key: str, model: str) -> list[Call]:
    import openai
    client = openai.OpenAI(base_url=f"{base}/openai/v1", api_key=key, max_retries=0)
    messages = [{"role": "user", "content": PROMPT}]

    def usage(u) -> Usage:
        return {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens,
                "total_tokens": u.total_tokens}

    reply = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=MAX_TOKENS)
    calls = [Call("openai", "plain", usage(reply.usage), reply.model)]
    last = None
    for chunk in client.chat.completions.create(model=model, messages=messages, max_completion_tokens=MAX_TOKENS,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            last = chunk
    if last is None:
        raise RuntimeError("the stream reported no usage")
    calls.append(Call("openai", "stream", usage(last.usage), last.model))
    return calls


def _anthropic(base: str, key: str, model: str) -> list[Call]:
    import anthropic
    client = anthropic.Anthropic(base_url=f"{base}/anthropic", api_key=key, max_retries=0)
    messages = [{"role": "user", "content": PROMPT}]

    def usage(u) -> Usage:
        return {"input_tokens": u.input_tokens, "output_tokens": u.output_tokens,
                "cache_read_tokens": u.cache_read_input_tokens, "cache_write_tokens": u.cache_creation_input_tokens}

    reply = client.messages.create(model=model, max_tokens=MAX_TOKENS, messages=messages)
    calls = [Call("anthropic", "plain", usage(reply.usage), reply.model)]
    with client.messages.stream(model=model, max_tokens=MAX_TOKENS, messages=messages) as stream:
        for _ in stream.text_stream:
            pass
        final = stream.get_final_message()
    calls.append(Call("anthropic", "stream", usage(final.usage), final.model))
    return calls


def _google(provider: str, client, model: str) -> list[Call]:
    from google.genai import types
    config = types.GenerateContentConfig(max_output_tokens=MAX_TOKENS)

    def usage(u) -> Usage:
        return {"input_tokens": u.prompt_token_count, "output_tokens": u.candidates_token_count,
                "total_tokens": u.total_token_count, "reasoning_tokens": u.thoughts_token_count}

    reply = client.models.generate_content(model=model, contents=PROMPT, config=config)
    calls = [Call(provider, "plain", usage(reply.usage_metadata), reply.model_version)]
    last = None
    for chunk in client.models.generate_content_stream(model=model, contents=PROMPT, config=config):
        if chunk.usage_metadata is not None:
            last = chunk
    if last is None:
        raise RuntimeError("the stream reported no usage")
    calls.append(Call(provider, "stream", usage(last.usage_metadata), last.model_version))
    return calls


def _gemini(base: str, key: str, model: str) -> list[Call]:
    from google import genai
    from google.genai import types
    client = genai.Client(api_key=key, http_options=types.HttpOptions(base_url=f"{base}/gemini"))
    return _google("gemini", client, model)


def _vertex(base: str, key: str, model: str) -> list[Call]:
    from google import genai
    from google.genai import types
    options = types.HttpOptions(base_url=f"{base}/google")
    if os.environ.get("VERTEX_API_KEY"):
        client = genai.Client(vertexai=True, api_key=key, http_options=options)
    else:  # application default credentials: `key` is their access token, on the allow-list
        client = genai.Client(vertexai=True, project=os.environ["GOOGLE_CLOUD_PROJECT"],
                              location=os.environ.get("GOOGLE_CLOUD_LOCATION", "global"),
                              credentials=_adc()[0], http_options=options)
    return _google("google", client, model)


_ADC = []


def _adc():
    """Application default credentials, refreshed once: their token is what the SDK sends."""
    if not _ADC:
        import google.auth
        import google.auth.transport.requests
        creds, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
        creds.refresh(google.auth.transport.requests.Request())
        _ADC.append(creds)
    return _ADC[0], _ADC[0].token


def _vertex_key() -> str | None:
    if os.environ.get("VERTEX_API_KEY"):
        return os.environ["VERTEX_API_KEY"]
    if os.environ.get("GOOGLE_CLOUD_PROJECT"):
        try:
            return _adc()[1]
        except Exception as exc:  # no credentials: reported as the reason to skip
            raise LookupError(f"GOOGLE_CLOUD_PROJECT is set but no application default credentials: {exc}") from None
    return None


@dataclass
class Live:
    name: str
    env: str                                   # what to set, as told when skipped
    model_env: str
    default_model: str
    key: Callable[[], str | None]
    run: Callable[[str, str, str], list[Call]]


LIVE = [
    Live("openai", "OPENAI_API_KEY", "LMGATE_LIVE_OPENAI_MODEL", "gpt-4o-mini",
         lambda: os.environ.get("OPENAI_API_KEY"), _openai),
    Live("anthropic", "ANTHROPIC_API_KEY", "LMGATE_LIVE_ANTHROPIC_MODEL", "claude-haiku-4-5",
         lambda: os.environ.get("ANTHROPIC_API_KEY"), _anthropic),
    Live("gemini", "GEMINI_API_KEY", "LMGATE_LIVE_GEMINI_MODEL", "gemini-2.5-flash",
         lambda: os.environ.get("GEMINI_API_KEY"), _gemini),
    Live("google", "VERTEX_API_KEY or GOOGLE_CLOUD_PROJECT", "LMGATE_LIVE_VERTEX_MODEL", "gemini-2.5-flash",
         _vertex_key, _vertex),
]


# ---- comparing a record with the SDK's usage

def compare(record: dict, call: Call) -> list[str]:
    """What differs between the record and the SDK's view of the call (empty: they agree)."""
    problems = []
    if record.get("status") != 200 or record.get("error_type") is not None:
        problems.append(f"record status {record.get('status')}, error_type {record.get('error_type')}")
    if record.get("provider") != call.provider:
        problems.append(f"record provider {record.get('provider')}, expected {call.provider}")
    if record.get("stream") != (call.mode == "stream"):
        problems.append(f"record stream {record.get('stream')}, expected {call.mode == 'stream'}")
    if call.model is not None and record.get("model") != call.model:
        problems.append(f"model: record {record.get('model')}, SDK {call.model}")
    for field, expected in call.usage.items():
        if expected is None and field not in ("input_tokens", "output_tokens"):
            continue  # the SDK does not report it: nothing to compare
        if record.get(field) != expected:
            problems.append(f"{field}: record {record.get(field)}, SDK {expected}")
    return problems


# ---- LMGate, started for the run

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Gate:
    def __init__(self, folder: Path, keys: dict[str, str]) -> None:
        self.folder = folder
        self.stats = folder / "stats.jsonl"
        self.log = folder / "lmgate.log"
        allowlist = folder / "allowlist.csv"
        # Stored hashed: the temporary file holds no key either.
        allowlist.write_text("id,api_key,owner,added\n" + "".join(
            f"live-{name},sha256:{hashlib.sha256(key.encode()).hexdigest()},live-tests,{time.strftime('%Y-%m-%d')}\n"
            for name, key in keys.items()))
        self.port, sidecar = _free_port(), _free_port()
        spool = Path(tempfile.mkdtemp(prefix="lmgate-live-spool-"))  # nginx's workers reach /tmp as root
        self.spool = spool
        self.url = f"http://127.0.0.1:{self.port}"
        self.sidecar = f"http://127.0.0.1:{sidecar}"
        self.env = {**os.environ,
                    "LMGATE_PROXY__HOST": "127.0.0.1", "LMGATE_PROXY__PORT": str(self.port),
                    "LMGATE_PROXY__RUNTIME_DIR": str(folder / "run"), "LMGATE_PROXY__WORKER_PROCESSES": "1",
                    "LMGATE_SERVER__HOST": "127.0.0.1", "LMGATE_SERVER__PORT": str(sidecar),
                    "LMGATE_AUTH__ALLOWLIST_PATH": str(allowlist),
                    "LMGATE_STATS__OUTPUT_PATH": str(self.stats), "LMGATE_STATS__SPOOL_DIR": str(spool),
                    "LMGATE_STATS__FLUSH_INTERVAL_SECONDS": "0.2"}
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "lmgate", "up", "--config", str(CONFIG)],
                                         env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not (http_ok(self.url + "/healthz") and http_ok(self.sidecar + "/livez")):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"LMGate did not start; its log:\n{self.log.read_text(errors='replace')}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.spool, ignore_errors=True)

    def records(self) -> list[dict]:
        if not self.stats.exists():
            return []
        return [json.loads(line) for line in self.stats.read_text().splitlines() if line.strip()]

    def next_record(self, seen: int) -> dict | None:
        deadline = time.monotonic() + RECORD_WAIT_SECONDS
        while time.monotonic() < deadline:
            records = self.records()
            if len(records) > seen:
                return records[seen]
            time.sleep(0.1)
        return None


# ---- the run

def main() -> int:
    secrets_seen: list[str] = []

    def safe(text: str) -> str:
        for key in secrets_seen:
            text = text.replace(key, mask_key(key))
        return text

    keys, runs, skipped = {}, [], 0
    for live in LIVE:
        try:
            key = live.key()
        except LookupError as exc:
            key, reason = None, str(exc)
        else:
            reason = f"{live.env} is not set"
        override = os.environ.get(f"LMGATE_PROVIDERS__{live.name.upper()}__UPSTREAM")
        if key and os.environ.get("CI") and not override:
            key, reason = None, "CI is set (no network there)"
        if not key:
            print(f"skip  {live.name}: {reason}")
            skipped += 1
            continue
        secrets_seen.append(key)
        keys[live.name] = key
        runs.append((live, key, os.environ.get(live.model_env) or live.default_model))
    if not runs:
        print("nothing checked: no provider's key is set")
        return 0

    failures = 0
    with tempfile.TemporaryDirectory(prefix="lmgate-live-") as folder:
        gate = Gate(Path(folder), keys)
        try:
            gate.start()
            print(f"LMGate up on {gate.url} with {len(keys)} keys on a temporary allow-list")
            for live, key, model in runs:
                seen = len(gate.records())
                try:
                    calls = live.run(gate.url, key, model)
                except Exception as exc:
                    print(f"FAIL  {live.name} ({mask_key(key)}, {model}): the SDK call failed: "
                          f"{safe(f'{type(exc).__name__}: {exc}')}")
                    failures += 1
                    continue
                for call in calls:
                    record = gate.next_record(seen)
                    if record is None:
                        print(f"FAIL  {call.provider} {call.mode}: no record within {RECORD_WAIT_SECONDS} s")
                        failures += 1
                        continue
                    seen += 1
                    problems = compare(record, call)
                    counts = f"in {record.get('input_tokens')} out {record.get('output_tokens')}"
                    if problems:
                        print(f"FAIL  {call.provider} {call.mode} ({record.get('model')}): {'; '.join(problems)}")
                        failures += 1
                    else:
                        print(f"ok    {call.provider} {call.mode} ({record.get('model')}, key {record.get('masked_key')}): "
                              f"{counts}, as the SDK reports")
        except RuntimeError as exc:
            print(f"FAIL  {safe(str(exc))}")
            return 1
        finally:
            gate.stop()
            if failures:
                print("LMGate's log (last 30 lines):")
                print(safe("\n".join(gate.log.read_text(errors="replace").splitlines()[-30:])))
    print(f"{len(runs)} providers checked, {skipped} skipped, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
