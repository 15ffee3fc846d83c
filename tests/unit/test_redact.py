"""Log redaction: what nginx and libraries quote must not carry a usable key."""

import logging

import pytest

from lmgate.redact import RedactingFormatter, redact

pytestmark = pytest.mark.unit

KEY = "sk-lmgate-test-redact-0123456789abcdef"


@pytest.mark.parametrize("line", [
    f'connect() failed, request: "POST /gemini/v1beta/models/m:generateContent?key={KEY} HTTP/1.1"',
    f'request: "GET /openai/v1/models?ke%79={KEY}&x=1 HTTP/1.1", upstream: "http://h/v1/models?ke%79={KEY}"',
    f'client sent duplicate header line: "Authorization: Bearer {KEY}", previous value: "Authorization: Bearer {KEY}"',
    f'client sent invalid header line: "x-api-key: {KEY}"',
    f"aiohttp: Got more than 8190 bytes when reading: b'X-Goog-Api-Key: {KEY}xxxxxxxx'",
    f"Authorization={KEY}",
    f"bearer {KEY}",
    # Quotes and non-ASCII spaces end nothing: only the ASCII space ends a query in a request line.
    f'request: "POST /gemini/v1beta/models/m:generateContent?x=\'&key={KEY} HTTP/1.1"',
    f'request: "POST /gemini/v1beta/models/m:generateContent?x="&key={KEY} HTTP/1.1"',
    f'request: "POST /gemini/v1beta/models/m:generateContent?x=\u00a0&key={KEY} HTTP/1.1"',
    f'request: "POST /gemini/v1beta/models/m:generateContent?x=\u2028&key={KEY} HTTP/1.1"',
    f'request: "GET /gemini/x?a=",upstream:"&access_token={KEY} HTTP/1.1", host: "x"',
    # Every header a key travels in (lmgate.providers), and a key sent as a WebSocket subprotocol.
    f'client sent too long header line: "api-key: {KEY}"',
    f'"Sec-WebSocket-Protocol: realtime, openai-insecure-api-key.{KEY}"',
])
def test_no_full_key_survives(line):
    out = redact(line)
    assert KEY not in out
    assert KEY[:20] not in out


def test_masked_value_keeps_the_last_six_characters_for_tracing():
    assert redact(f'"x-api-key: {KEY}"') == f'"x-api-key: ...{KEY[-6:]}"'
    assert redact("GET /openai/v1/models?limit=5 HTTP/1.1") == "GET /openai/v1/models?<query hidden> HTTP/1.1"
    assert (redact('upstream: "http://h/v1/x?alt=sse", host: "h"')
            == 'upstream: "http://h/v1/x?<query hidden>", host: "h"')


def test_text_without_credentials_is_unchanged():
    line = "2026/11/27 12:00:00 [notice] 1#1: signal process started"
    assert redact(line) == line


def test_formatter_redacts_messages_and_tracebacks():
    formatter = RedactingFormatter("%(message)s")
    try:
        raise ValueError(f"bad header Authorization: Bearer {KEY}")
    except ValueError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed for %s", (f"?key={KEY}",),
                                   exc_info=True)
        import sys
        record.exc_info = sys.exc_info()
    text = formatter.format(record)
    assert KEY not in text and "ValueError" in text
