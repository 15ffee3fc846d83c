"""Masking API keys out of log text we do not write ourselves (nginx's lines, library errors).

nginx quotes the request line (with its query string) and, at info level, raw header lines; an
HTTP library may quote an over-long header in its error. Everything that looks like a credential
is reduced to its last 6 characters, the same as `keys.mask_key`.
"""

from __future__ import annotations

import logging
import re

from lmgate.keys import mask_key
from lmgate.providers import KEY_HEADERS, KEY_SUBPROTOCOLS

# A whole query string: a key can hide behind any parameter name, encoded or not (ke%79=...),
# and behind any character but the ASCII space, which nginx (>= 1.21.1) refuses in a request line;
# a quote that closes nginx's quoted field is kept.
_QUERY = re.compile(r"\?[^ \r\n]+")
# Credential header values, as nginx or a library may quote them: "Authorization: Bearer X",
# "x-api-key: X", also inside Python reprs (b'...').
_HEADER = re.compile(r"(?i)\b(" + "|".join(map(re.escape, KEY_HEADERS)) +
                     r")(\s*[:=]\s*)(bearer\s+|basic\s+)?([^\s\"',\\]+)")
# A key sent as a WebSocket subprotocol (openai-insecure-api-key.<key>).
_SUBPROTOCOL = re.compile(r"(?i)\b(" + "|".join(map(re.escape, KEY_SUBPROTOCOLS)) + r")([^\s\"',\\]+)")
_BEARER = re.compile(r"(?i)\b(bearer\s+)([^\s\"',\\]+)")


def redact(text: str) -> str:
    text = _QUERY.sub(_hide_query, text)
    text = _HEADER.sub(lambda m: m.group(1) + m.group(2) + (m.group(3) or "") + mask_key(m.group(4)), text)
    text = _SUBPROTOCOL.sub(lambda m: m.group(1) + mask_key(m.group(2)), text)
    return _BEARER.sub(lambda m: m.group(1) + mask_key(m.group(2)), text)


def _hide_query(match: re.Match[str]) -> str:
    query = match.group()
    return "?<query hidden>" + ('",' if query.endswith('",') else '"' if query.endswith('"') else "")


class RedactingFormatter(logging.Formatter):
    """Formats like logging.Formatter, then masks credentials (tracebacks included)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
