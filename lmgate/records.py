"""Turning what nginx sends into usage records.

Two sources feed the same record shape:
- a capture report: the njs body filter's POST /stats when a response body completed; query
  string = metadata, body = the head and tail of the response body;
- a fallback line: nginx's access log (over UDP syslog) for calls whose body filter never finished
  (client disconnects, denied calls, upstream failures, header-only answers).
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import replace
import time
from typing import Any
from urllib.parse import parse_qsl, unquote

from lmgate.providers import PROVIDERS
from lmgate.usage import Usage, extract_usage, model_from_path

TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
                "reasoning_tokens", "total_tokens")

# Words nginx sets in $lmgate_error for answers it generated itself.
NGINX_ERRORS = frozenset({"forbidden", "gate_unavailable", "upstream_unreachable"})


# Plausible bounds for times nginx reports; anything else is replaced, never trusted.
_MAX_EPOCH = 1e11
_MAX_DURATION = 1e7


def iso_utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"


def _int(value: str | None, default: int = 0) -> int:
    try:
        return int(value) if value else default
    except ValueError:
        return default


def _float(value: str | None, upper: float) -> float:
    try:
        number = float(value) if value else 0.0
    except ValueError:
        return 0.0
    return number if math.isfinite(number) and 0 <= number <= upper else 0.0


def classify(status: int, nginx_error: str | None, usage_problem: str | None) -> str | None:
    if nginx_error in NGINX_ERRORS:
        return nginx_error
    if status == 499:
        return "client_closed"
    if status == 429:
        return "rate_limited"
    if status >= 400:
        return "upstream_error"
    return usage_problem


def _record(meta: dict[str, str], status: int, usage: Usage, error_type: str | None,
            received_at: float, api: str, response_bytes: int) -> dict[str, Any]:
    """The record; `meta` values are already decoded."""
    path = meta.get("u", "").split("?", 1)[0]
    ended_at = _float(meta.get("ts"), _MAX_EPOCH) or received_at
    duration = min(_float(meta.get("t"), _MAX_DURATION), ended_at)
    return {
        "timestamp": iso_utc(ended_at - duration),
        "request_id": meta.get("rid") or None,
        "lmgate_id": meta.get("id") or None,
        "owner": meta.get("own") or None,
        "provider": meta.get("p") or None,
        "api_format": api,
        "method": meta.get("m") or None,
        "endpoint": path,
        "model": usage.model,
        "stream": usage.stream,
        "status": status,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_read_tokens": usage.cache_read_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "total_tokens": usage.total_tokens,
        "duration_ms": round(duration * 1000, 3),
        "response_bytes": response_bytes,
        "masked_key": meta.get("mk") or None,
        "error_type": error_type,
    }


def _provider_path(endpoint: str, provider: str) -> str:
    prefix = "/" + provider
    return endpoint[len(prefix):] if endpoint.startswith(prefix + "/") else endpoint


def _api_for(provider: str, provider_path: str) -> str:
    p = PROVIDERS.get(provider)
    if p is None:
        return "openai"
    # Claude on Vertex AI answers in Anthropic's format through the google prefix.
    if p.api == "google" and "/publishers/anthropic/" in provider_path:
        return "anthropic"
    return p.api


# How each format's answer ends; seen in the last bytes of a body, the provider had finished.
_ENDINGS = {
    "openai": (b"[DONE]", b'"response.completed"', b'"response.incomplete"', b'"response.failed"'),
    "anthropic": (b"message_stop",),
    "google": (b'"finishReason"',),
}


def _fallback_usage(meta: dict[str, str], provider: str, provider_path: str,
                    status: int) -> tuple[Usage, bool]:
    """What the cut-short body the fallback line carries says (or what the path says), and
    whether that body is in fact the provider's complete answer."""
    head_len, _, rest = meta.get("cap", "").partition(":")
    total, _, encoded = rest.partition(":")
    stream = ":stream" in provider_path or "event-stream" in meta.get("ct", "")
    try:
        body = base64.b64decode(encoded, validate=True) if encoded else b""
    except ValueError:
        body = b""
    if body and (status < 400 or status == 499):
        cut = _int(head_len, len(body))
        whole = _int(total, len(body)) <= len(body)
        api = _api_for(provider, provider_path)
        usage = extract_usage(api, provider_path, 200, meta.get("ct", ""),
                              body if whole else body[:cut], None if whole else body[cut:])
        if usage.stream or stream:
            complete = any(end in body[-1024:] for end in _ENDINGS.get(api, ()))
        else:  # a JSON answer names its usage at its end
            complete = usage.output_tokens is not None
        return replace(usage, stream=usage.stream or stream), complete and usage.problem is None
    model = model_from_path(provider_path) if status < 400 or status == 499 else None
    return Usage(model=model, stream=stream), False


def _report_query(query: str) -> dict[str, str]:
    """The body filter's query string: name=value pairs whose values njs percent-encoded (so a
    '+' is never a space); the same result as parse_qsl on such strings, at a fraction of its cost."""
    meta = {}
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if "%" in name or "+" in name or "+" in value:
            return dict(parse_qsl(query, keep_blank_values=True))
        meta[name] = unquote(value) if "%" in value else value
    return meta


def from_capture(query: str, body: bytes, received_at: float) -> dict[str, Any]:
    """Record for a completed response, from the njs body filter's report."""
    meta = _report_query(query)
    provider = meta.get("p", "")
    endpoint = meta.get("u", "").split("?", 1)[0]
    provider_path = _provider_path(endpoint, provider)
    status = _int(meta.get("s"))
    total = _int(meta.get("n"), len(body))
    head_len = min(_int(meta.get("h"), len(body)), len(body))
    if total <= len(body):
        head, tail = body, None
    else:
        head, tail = body[:head_len], body[head_len:]
    api = _api_for(provider, provider_path)
    usage = extract_usage(api, provider_path, status, meta.get("ct", ""), head, tail)
    return _record(meta, status, usage, classify(status, None, usage.problem), received_at, api, total)


def from_fallback(line: bytes, received_at: float) -> dict[str, Any] | None:
    """Record for a call whose body never completed, from nginx's access log line (syslog)."""
    start = line.find(b"{")
    if start < 0:
        return None
    try:
        meta = json.loads(line[start:].decode("utf-8", "replace"))
    except ValueError:
        return None
    if not isinstance(meta, dict):
        return None
    # nginx logs the sidecar's percent-encoded header values as they were.
    meta = {str(k): str(v) for k, v in meta.items()}
    for name in ("id", "own", "mk"):
        meta[name] = unquote(meta.get(name, ""))
    provider = meta.get("p", "")
    endpoint = meta.get("u", "").split("?", 1)[0]
    provider_path = _provider_path(endpoint, provider)
    status = _int(meta.get("s"))
    nginx_error = meta.get("err") or None
    if nginx_error not in NGINX_ERRORS:
        if meta.get("done") != "OK":
            # The client went away before the response was complete; nginx may still say 200.
            status = 499
        elif meta.get("cut") == "1":
            # nginx finished the call, but the provider's answer broke off (reset or timeout).
            nginx_error = "upstream_unreachable"
    usage, complete = _fallback_usage(meta, provider, provider_path, status)
    if status == 499 and complete:
        # The whole answer reached the client, which closed the connection before the transport's
        # end (SDKs stop reading at [DONE] / message_stop): a complete call, not a cut one.
        status, nginx_error = _int(meta.get("s")), None
    return _record(meta, status, usage, classify(status, nginx_error, None), received_at,
                   _api_for(provider, provider_path), _int(meta.get("n")))

