"""Finding the caller's API key in a request, the way each provider's SDK sends it."""

from __future__ import annotations

from typing import Mapping
from urllib.parse import parse_qsl


class KeyProblem(Exception):
    """The request carries no usable key; the message says why (safe to show: it holds no key)."""


def _all(headers: Mapping[str, str], name: str) -> list[str]:
    # A header sent twice counts twice: the provider might read either copy.
    getall = getattr(headers, "getall", None)
    if getall is not None:
        return getall(name, [])
    value = headers.get(name)
    return [] if value is None else [value]


def extract_key(headers: Mapping[str, str], query: str) -> str:
    """Return the single API key the request carries, or raise KeyProblem.

    Looked for, in this order: `Authorization: Bearer`, `x-api-key`, `x-goog-api-key`, the `key`
    query parameter. A request carrying two different keys is refused: the gate must approve exactly
    the credential the provider will bill, whichever of them the provider reads.
    """
    found: list[str] = []
    for authorization in _all(headers, "Authorization"):
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            raise KeyProblem("the Authorization header must be 'Bearer <key>'")
        found.append(token)
    for name in ("x-api-key", "x-goog-api-key"):
        found.extend(value.strip() for value in _all(headers, name))
    if query and "key=" in query:
        found.extend(v for k, v in parse_qsl(query, keep_blank_values=True) if k == "key")
    keys = set(found)
    keys.discard("")
    if not keys:
        raise KeyProblem("no API key in the request")
    if len(keys) > 1:
        raise KeyProblem("the request carries more than one different API key")
    return keys.pop()
