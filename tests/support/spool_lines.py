"""Spool lines as nginx writes them (the `lmgate_spool` log formats in nginx/nginx.conf.template,
the capture from nginx/lmgate.js), and spool files as the sidecar finds them (lmgate/spool.py),
for the unit and integration tests. The line format is known here only."""

from __future__ import annotations

import base64
import re
import time
from pathlib import Path
from urllib.parse import quote

from lmgate.app import HEADER_SAFE
from lmgate.spool import SLOT_SECONDS

# The metadata fields of the log format, in its order (the JSON before the tab; the capture
# follows the tab).
FIELDS = ("rid", "id", "own", "mk", "p", "m", "u", "s", "done", "t", "ts", "err", "ra", "ct", "n")
# What nginx.conf.template's map sends to the escaped format: a control character, '"' or '\'
# in the path or the content type.
_NEEDS_ESCAPE = re.compile(rb'[\x00-\x1f"\\]')
_SHORT_ESCAPES = {0x22: b'\\"', 0x5C: b"\\\\", 0x0A: b"\\n", 0x0D: b"\\r", 0x09: b"\\t", 0x08: b"\\b",
                  0x0C: b"\\f"}


def sidecar_encoded(text: str) -> str:
    """How the sidecar percent-encodes id, owner and masked key in its /auth answer headers, which
    nginx logs as they are."""
    return quote(text, safe=HEADER_SAFE)


def json_escaped(value: bytes) -> bytes:
    """nginx's escape=json (ngx_escape_json): '"', '\\' and control bytes; others as they are."""
    out = bytearray()
    for byte in value:
        if byte in _SHORT_ESCAPES:
            out += _SHORT_ESCAPES[byte]
        elif byte < 0x20:
            out += b"\\u%04X" % byte
        else:
            out.append(byte)
    return bytes(out)


def capture_field(size: int, flags: str, head: str, tail: str = "") -> str:
    """The body filter's capture as lmgate.js writes it, from its parts (head and tail in base64)."""
    return f"{size}:{flags}:{head}:{tail}"


def capture(body: bytes, head_max: int = 16384, tail_max: int = 65536, last: bool = True) -> str:
    """The capture of a response body as nginx/lmgate.js makes it: the whole body when it fits in
    head + tail, else its first head_max and last tail_max bytes with flag "g"; flag "x" when the
    last buffer never came; "" when no body passed."""
    if not body:
        return ""
    if len(body) <= head_max + tail_max:
        head, tail, gap = body, b"", ""
    else:
        head, tail, gap = body[:head_max], body[-tail_max:], "g"
    return capture_field(len(body), gap + ("" if last else "x"), base64.b64encode(head).decode(),
                         base64.b64encode(tail).decode())


def body_flags(line: bytes) -> str:
    """The capture flags a spool line carries ("" without a capture)."""
    text = line.partition(b"\t")[2].decode()
    return text.split(":")[1] if text else ""


def spool_line(body: bytes = b"", *, rid: str = "0123abcd", id: str = "alice", own: str = "Alice",
               mk: str = "...abcdef", p: str = "openai", m: str = "POST",
               u: str | bytes = "/openai/v1/chat/completions", s: int | str = 200, done: bool = True,
               t: str = "1.250", ts: str = "1700000000.500", err: str = "", ra: str = "127.0.0.1", ct: str | bytes = "application/json",
               n: int | None = None, last: bool = True, head_max: int = 16384, tail_max: int = 65536,
               fields: dict[str, str] | None = None) -> bytes:
    """One spool line (no newline) for a call, filled in as nginx's log format does: every value a
    string, id/own/mk percent-encoded by the sidecar, done "OK" or "", the capture of `body`.
    `n` is nginx's $body_bytes_sent (default: the body's length). `fields` sets any field to
    exactly the given text (for values nginx would never write); its "body" is the capture, the
    part after the tab."""
    values: dict[str, str | bytes] = {
        "rid": rid, "id": sidecar_encoded(id), "own": sidecar_encoded(own), "mk": sidecar_encoded(mk),
        "p": p, "m": m, "u": u, "s": str(s), "done": "OK" if done else "", "t": t, "ts": ts, "err": err,
        "ra": ra, "ct": ct, "n": str(len(body) if n is None else n), "body": capture(body, head_max, tail_max, last),
        **(fields or {}),
    }
    raw = {k: v if isinstance(v, bytes) else v.encode() for k, v in values.items()}
    escape = bool(_NEEDS_ESCAPE.search(raw["u"] + raw["ct"]))
    parts = []
    for name in FIELDS:
        value = json_escaped(raw[name]) if escape else raw[name]
        parts.append(b'"' + name.encode() + b'":"' + value + b'"')
    return b"{" + b",".join(parts) + b"}\t" + raw["body"]


# ---------------------------------------------------------------- spool files

def slot(when: float | None = None) -> int:
    """The slot (second) of a moment, as nginx names the file it writes then."""
    return int(time.time() if when is None else when) // SLOT_SECONDS * SLOT_SECONDS


def spool_file(folder: Path, slot_start: int) -> Path:
    return folder / f"calls-{slot_start}.jsonl"


def append(path: Path, data: bytes) -> None:
    """Append in one write, as nginx does for each line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab", buffering=0) as f:
        written = f.write(data)
    assert written == len(data)
