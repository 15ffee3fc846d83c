"""Provider facts, in one place: URL prefix, response format, where keys travel, error shape.

The upstream URLs are configuration (config/lmgate.yaml); which token fields each format reports is
in lmgate/usage.py, keyed by the `api` named here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Provider:
    name: str  # also the URL prefix: /<name>/...
    api: str   # response format: "openai", "anthropic" or "google"
    description: str
    # Every place the provider (or an upstream speaking its API) reads a credential from: header
    # names (lower case) and query parameter names (after percent-decoding, as Google decodes them).
    key_headers: tuple[str, ...]
    key_params: tuple[str, ...] = ()
    # A WebSocket subprotocol that carries a key: `<prefix><key>` in Sec-WebSocket-Protocol.
    key_subprotocol: str | None = None


_GOOGLE_HEADERS = ("x-goog-api-key", "authorization")
# An API key (`key`) or an OAuth access token (`access_token`, and its old name `oauth_token`);
# Google also reads each as a system parameter, `$key` (PARAM_PREFIX), in any case the same name.
_GOOGLE_PARAMS = ("key", "access_token", "oauth_token")
PARAM_PREFIX = "$"

PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        # OpenAI-compatible upstreams such as Azure OpenAI read `api-key`.
        # The Realtime API also takes a key as a subprotocol (browsers cannot set headers).
        Provider("openai", "openai", "OpenAI API", ("authorization", "api-key"),
                 key_subprotocol="openai-insecure-api-key."),
        # Authorization: Bearer carries OAuth tokens (Claude subscriptions).
        Provider("anthropic", "anthropic", "Anthropic API", ("x-api-key", "authorization")),
        Provider("google", "google", "Google Vertex AI", _GOOGLE_HEADERS, _GOOGLE_PARAMS),
        Provider("gemini", "google", "Google Gemini API", _GOOGLE_HEADERS, _GOOGLE_PARAMS),
    )
}

# The gate reads every provider's places on every call: a credential an upstream might read where
# its provider would not (a proxy, another gateway) can then only make the gate refuse more.
KEY_HEADERS: tuple[str, ...] = tuple(dict.fromkeys(h for p in PROVIDERS.values() for h in p.key_headers))
KEY_PARAMS: frozenset[str] = frozenset(q for p in PROVIDERS.values() for q in p.key_params)
KEY_SUBPROTOCOLS: tuple[str, ...] = tuple(p.key_subprotocol for p in PROVIDERS.values() if p.key_subprotocol)
# The headers nginx hashes for its /auth cache key: every one a key can travel in.
SUBPROTOCOL_HEADER = "sec-websocket-protocol"


# Streams that report usage only when the request asks for it (`stream_options.include_usage`):
# with stats.ensure_stream_usage, LMGate asks for it on these paths (as the client sends them).
STREAM_USAGE_PATHS: dict[str, tuple[str, ...]] = {
    "openai": ("/v1/chat/completions", "/v1/completions"),
}


def answer_format(api: str, provider_path: str) -> str:
    """The format of an answer to a call for a provider of `api`: that API's, except Claude on
    Vertex AI (`.../publishers/anthropic/models/...` under the google prefix), which answers in
    Anthropic's."""
    if api == "google" and "/publishers/anthropic/" in provider_path:
        return "anthropic"
    return api


def provider_answer_format(provider: str, provider_path: str) -> str:
    """answer_format for a provider prefix (an unknown one answers in OpenAI's format)."""
    p = PROVIDERS.get(provider)
    return answer_format(p.api, provider_path) if p is not None else "openai"


# Google's streaming methods (`...:streamGenerateContent`, Claude on Vertex `...:streamRawPredict`).
GOOGLE_STREAM_METHODS = frozenset({"streamGenerateContent", "streamRawPredict"})


def is_stream(provider_path: str, content_type: str) -> bool:
    """The answer is streamed: SSE, or one of Google's streaming methods (a JSON array)."""
    method = provider_path.rsplit(":", 1)[1] if ":" in provider_path else ""
    return "event-stream" in (content_type or "").lower() or method in GOOGLE_STREAM_METHODS


def error_body(api: str, status: int, message: str, kind: str) -> str:
    """A JSON error in the provider's own shape, so each SDK raises its usual exception.

    `kind` is a short machine word (e.g. "lmgate_forbidden") put where the format has a type/code.
    """
    if api == "anthropic":
        anthropic_type = {403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                          400: "invalid_request_error", 429: "rate_limit_error",
                          504: "timeout_error"}.get(status, "api_error")
        body = {"type": "error", "error": {"type": anthropic_type, "message": message}}
    elif api == "google":
        google_status = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                         413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 502: "UNAVAILABLE",
                         504: "DEADLINE_EXCEEDED"}
        body = {"error": {"code": status, "message": message, "status": google_status.get(status, "INTERNAL")}}
    else:
        body = {"error": {"message": message, "type": kind, "param": None, "code": kind}}
    return json.dumps(body, separators=(",", ":"))
