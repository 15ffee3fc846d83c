"""API keys: the one a request carries (in every place a provider reads one from), and the only
forms of a key LMGate shows or stores (masked, hashed)."""

from __future__ import annotations

import hashlib
import re
from typing import Mapping
from urllib.parse import unquote_plus

from lmgate.providers import KEY_HEADERS, KEY_PARAMS, KEY_SUBPROTOCOLS, PARAM_PREFIX, SUBPROTOCOL_HEADER


def hash_key(key: str) -> str:
    """The `sha256:<hex>` form of a key, as `lmgate hash-key` prints it."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def mask_key(key: str) -> str:
    """The only form of a key that may be logged or recorded: its last 6 characters."""
    return "..." + key[-6:] if len(key) > 12 else "..."


class KeyProblem(Exception):
    """The request carries no usable key; the message says why (safe to show: it holds no key)."""


# Query parameters are split on both separators a server may honour.
_QUERY_SEPARATOR = re.compile(r"[&;]")


def _all(headers: Mapping[str, str], name: str) -> list[str]:
    # A header sent twice counts twice: the provider might read either copy.
    getall = getattr(headers, "getall", None)
    if getall is not None:
        return getall(name, [])
    value = headers.get(name)
    return [] if value is None else [value]


def query_credentials(query: str) -> list[str]:
    """The values of every credential parameter (lmgate.providers.KEY_PARAMS) in a query string,
    their names percent-decoded as Google decodes them (`?k%65y=` is `key`, and so is `?%24key=`)."""
    found = []
    for part in _QUERY_SEPARATOR.split(query):
        name, _, value = part.partition("=")
        if "%" in name or "+" in name:
            name = unquote_plus(name)
        if name.startswith(PARAM_PREFIX):
            name = name[len(PARAM_PREFIX):]
        if name in KEY_PARAMS:
            found.append(unquote_plus(value) if "%" in value or "+" in value else value)
    return found


def extract_key(headers: Mapping[str, str], query: str) -> str:
    """Return the single API key the request carries, or raise KeyProblem.

    Every credential place of every provider counts (lmgate.providers: headers, and query
    parameters with decoded names). A request carrying two different credentials is refused: the
    gate must approve exactly the credential the provider will bill, whichever it reads.
    """
    found: list[str] = []
    for name in KEY_HEADERS:
        for value in _all(headers, name):
            if name == "authorization":
                scheme, _, token = value.strip().partition(" ")
                token = token.strip()
                if scheme.lower() != "bearer" or not token or " " in token:
                    raise KeyProblem("the Authorization header must be 'Bearer <key>'")
                found.append(token)
            else:
                found.append(value.strip())
    for value in _all(headers, SUBPROTOCOL_HEADER):
        for protocol in value.split(","):
            protocol = protocol.strip()
            found.extend(protocol[len(prefix):] for prefix in KEY_SUBPROTOCOLS if protocol.startswith(prefix))
    if query:
        found.extend(query_credentials(query))
    keys = set(found)
    keys.discard("")
    if not keys:
        raise KeyProblem("no API key in the request")
    if len(keys) > 1:
        raise KeyProblem("the request carries more than one different API key")
    return keys.pop()
