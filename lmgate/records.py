"""Turning nginx's spool lines into usage records.

nginx writes one JSON line per call (the `lmgate_spool` log format): metadata, and the head and
tail of the response body that the njs body filter kept. Every outcome arrives the same way:
answered, cut short, the client gone, denied, or answered by nginx itself.
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace
import time
from typing import Any
from urllib.parse import unquote

import orjson
import pybase64

from lmgate.providers import is_stream, provider_answer_format
from lmgate.usage import STREAM_ERROR, Usage, extract_usage, model_from_path

TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
                "reasoning_tokens", "total_tokens")

# Per-key policy refusals (lmgate/policy.py): status, and the message the client gets.
POLICY_ERRORS = {
    "policy_expired": (403, "LMGate refused this API key: it has expired (allow-list column expires)."),
    "policy_disabled": (403, "LMGate refused this API key: it is disabled (allow-list column disabled)."),
    "policy_provider": (403, "LMGate refused this call: this API key may not be used with this provider "
                             "(allow-list column providers)."),
    "policy_model": (403, "LMGate refused this call: this API key may not use this model, or the request "
                          "names none that LMGate could read (allow-list column models)."),
    "rate_limited_gate": (429, "LMGate refused this call: the rate limit (rpm or tpm) of this API key or "
                               "its owner is reached; retry after the Retry-After seconds."),
    "budget_exceeded": (429, "LMGate refused this call: the spending budget of this API key or its owner "
                             "is spent until the Retry-After seconds have passed (the next UTC day or month)."),
}
# Words nginx sets in $lmgate_error for answers it generated itself.
NGINX_ERRORS = frozenset({"forbidden", "gate_unavailable", "upstream_unreachable", "bad_path", *POLICY_ERRORS})
# The canary location's calls (nginx.conf.template; `lmgate doctor`): recorded, left out of reports.
CANARY = "canary"
NGINX_ERRORS |= {CANARY}


# Plausible bounds for times nginx reports; anything else is replaced, never trusted.
_MAX_EPOCH = 1e11
_MAX_DURATION = 1e7


def iso_utc(epoch: float) -> str:
    """`epoch` >= 0 as ISO 8601 UTC, to the millisecond (truncated)."""
    second = int(epoch)
    return f"{_iso_second(second)}.{int((epoch - second) * 1000):03d}Z"


@functools.lru_cache(maxsize=64)
def _iso_second(second: int) -> str:
    """Most records of a second share it: formatted once."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def _int(value: str | bytes | None, default: int = 0) -> int:
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


def ended_at(meta: dict[str, str], received_at: float) -> float:
    """When the call ended, as nginx says (else when its line was read)."""
    return _float(meta.get("ts"), _MAX_EPOCH) or received_at


def _record(meta: dict[str, str], path: str, status: int, usage: Usage, error_type: str | None,
            received_at: float, api: str, response_bytes: int) -> dict[str, Any]:
    """The record; `meta` values are already decoded, `path` is the endpoint."""
    end = ended_at(meta, received_at)
    duration = min(_float(meta.get("t"), _MAX_DURATION), end)
    return {
        "timestamp": iso_utc(end - duration),
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


# How each format's answer ends; seen in the last bytes of a body, the provider had finished.
_ENDINGS = {
    "openai": (b"[DONE]", b'"response.completed"', b'"response.incomplete"', b'"response.failed"'),
    "anthropic": (b"message_stop",),
    "google": (b'"finishReason"',),
}


def _cut_usage(meta: dict[str, str], api: str, provider_path: str, status: int, head: bytes,
               tail: bytes | None) -> tuple[Usage, bool]:
    """What the body of a call that did not end normally says (or what the path says), and
    whether that body is in fact the provider's complete answer."""
    stream = is_stream(provider_path, meta.get("ct", ""))
    if head and (status < 400 or status == 499):
        usage = extract_usage(api, provider_path, 200, meta.get("ct", ""), head, tail)
        body_end = (tail if tail is not None else head)[-1024:]
        if usage.stream or stream:
            complete = any(end in body_end for end in _ENDINGS.get(api, ()))
        else:  # a JSON answer names its usage at its end
            complete = usage.output_tokens is not None
        # A stream that ended with the provider's error was whole too: nothing follows one.
        complete = (complete and usage.problem is None) or usage.problem == STREAM_ERROR
        return replace(usage, stream=usage.stream or stream), complete
    model = model_from_path(provider_path) if status < 400 or status == 499 else None
    return Usage(model=model, stream=stream), False


# The metadata fields of the spool line that are read (nginx writes each as a string).
_FIELDS = ("rid", "id", "own", "mk", "p", "m", "u", "s", "done", "t", "ts", "err", "ra", "ct", "n")


def load_line(line: bytes) -> tuple[dict[str, str], bytes]:
    """The metadata (JSON, its id/own/mk decoded) and the capture of a spool line (they are
    separated by a tab).

    The first tab ends the metadata: JSON holds no raw tab, so whatever follows it (base64 from
    nginx, or anything else) cannot make the metadata unreadable."""
    text, _, body = line.partition(b"\t")
    try:
        meta = orjson.loads(text)
    except orjson.JSONDecodeError:
        # A client can put any byte in the path nginx logs; keep the rest of the line readable.
        meta = orjson.loads(text.decode("utf-8", "replace"))
    if type(meta) is not dict:
        raise ValueError("not a JSON object")
    for name in _FIELDS:
        if type(meta.get(name, "")) is not str:
            raise ValueError(f"{name} is not a string: not a line nginx wrote")
    if b"%" in text:  # the sidecar's header values, percent-encoded, as nginx logged them
        for name in ("id", "own", "mk"):
            if "%" in meta.get(name, ""):
                meta[name] = unquote(meta[name])
    return meta, body


def _body(meta: dict[str, str], body: bytes) -> tuple[int, str, bytes, bytes | None]:
    """The body filter's capture: (body bytes, flags, head, tail or None), see nginx/lmgate.js.
    No capture (nginx's own answers, header-only ones): nginx's byte count and an empty head."""
    i = body.find(b":")
    j = body.find(b":", i + 1)
    k = body.find(b":", j + 1) if j > 0 else -1
    if k < 0:
        return _int(meta.get("n")), "", b"", None
    size, flags = _int(body[:i]), body[i + 1:j].decode("ascii", "replace")
    view = memoryview(body)  # decoded in place: no copy of a long capture
    try:
        return (size, flags, pybase64.b64decode(view[j + 1:k], validate=True),
                pybase64.b64decode(view[k + 1:], validate=True) if "g" in flags else None)
    except ValueError:  # not what nginx writes: count the bytes, read no usage
        return size, flags, b"", None


def from_spool(line: bytes, received_at: float) -> dict[str, Any]:
    """The record for one call, from its spool line (nginx's access log, see
    nginx/nginx.conf.template). Raises ValueError for a line that is not one."""
    return from_meta(*load_line(line), received_at)


def from_meta(meta: dict[str, str], body: bytes, received_at: float) -> dict[str, Any]:
    """The record for one call, from a spool line's parts (load_line)."""
    provider = meta.get("p", "")
    path = meta.get("u", "").split("?", 1)[0]
    provider_path = _provider_path(path, provider)
    api = provider_answer_format(provider, provider_path)
    status = _int(meta.get("s"))
    response_bytes, flags, head, tail = _body(meta, body)
    nginx_error = meta.get("err") or None
    if nginx_error not in NGINX_ERRORS:
        nginx_error = None
        if meta.get("done") == "OK" and "x" not in flags and head:
            # The answer went through whole: the usual case.
            usage = extract_usage(api, provider_path, status, meta.get("ct", ""), head, tail)
            return _record(meta, path, status, usage, classify(status, None, usage.problem),
                           received_at, api, response_bytes)
        if meta.get("done") != "OK":
            # The client went away before the response was complete; nginx may still say 200.
            status = 499
        elif "x" in flags:
            # nginx finished the call, but the provider's answer broke off (reset or timeout).
            nginx_error = "upstream_unreachable"
    usage, complete = _cut_usage(meta, api, provider_path, status, head, tail)
    problem = None
    if status == 499 and complete:
        # The whole answer reached the client, which closed the connection before the transport's
        # end (SDKs stop reading at [DONE] / message_stop): a complete call, not a cut one.
        status, nginx_error, problem = _int(meta.get("s")), None, usage.problem
    return _record(meta, path, status, usage, classify(status, nginx_error, problem), received_at, api,
                   response_bytes)
