"""Token and model extraction from a captured provider response body.

nginx hands over either the whole body (``tail is None``) or its first bytes
(head) and last bytes (tail) with an unknown gap between them. Three body
shapes occur: one JSON document, an SSE stream (LF or CRLF line endings) and
Gemini's JSON-array stream (``:streamGenerateContent`` without ``alt=sse``).

Nothing is guessed: a count the provider did not report stays None. The
extractor never raises; this runs once per proxied call and must not break
accounting on odd bodies.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import unquote

import orjson

from lmgate.providers import answer_format, is_stream

__all__ = ["CAPTURE_TRUNCATED", "STREAM_ERROR", "USAGE_MISSING", "Usage", "extract_usage", "websocket_counts"]

USAGE_MISSING = "usage_missing"
CAPTURE_TRUNCATED = "capture_truncated"
STREAM_ERROR = "stream_error"


@dataclass(slots=True)  # not frozen: slower to build, once per call (docs/performance-history.md)
class Usage:
    model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None
    total_tokens: int | None = None
    # Streamed: SSE content type, or a Google :streamGenerateContent / :streamRawPredict path.
    stream: bool = False
    # None, USAGE_MISSING (a 2xx generation reported no usage), CAPTURE_TRUNCATED (the usage
    # may have been in the part of the body that was not captured) or STREAM_ERROR (a 2xx stream
    # ended with the provider's error; the counts are what it reported before).
    problem: str | None = None


# A unit is one JSON document of the body: an SSE event's data (bytes, parsed
# only when a cheap regex says it may hold what we look for) or an already
# parsed object (a whole JSON body, or an element of Gemini's array stream).
Unit = bytes | dict
# Token counts in Usage's field order: input, output, cache read, cache write, reasoning, total.
Counts = tuple[int | None, int | None, int | None, int | None, int | None, int | None]

_USAGE = re.compile(rb'"usage"\s*:\s*\{')            # skips OpenAI's `"usage":null` chunks
_USAGE_OR_MODEL = re.compile(rb'"(?:usage|model)"')
_MODEL = re.compile(rb'"model"')
_USAGE_METADATA = re.compile(rb'"usageMetadata"\s*:\s*\{')
_MODEL_VERSION = re.compile(rb'"modelVersion"')
_PATH_MODEL = re.compile(r"/models/([^/:]+):")     # Google style: .../models/<model>:<method>
# An error inside a stream: an `error` object (OpenAI chat chunks, Gemini / Vertex, Anthropic), or
# an event of type `error` (Anthropic, OpenAI Responses) or `response.failed` (OpenAI Responses).
_STREAM_ERROR_NEEDLE = re.compile(rb'"error"\s*:\s*\{|"type"\s*:\s*"(?:error|response\.failed)"')
_ERROR_TYPES = ("error", "response.failed")
# Units looked at from a stream's end for an error: providers stop sending after one, and OpenAI
# chat may still end with [DONE].
_ERROR_LOOKBACK = 3
_DECODER = json.JSONDecoder()

_OPENAI_GENERATION = ("/chat/completions", "/completions", "/responses", "/embeddings")
_GOOGLE_GENERATION = {"generateContent", "streamGenerateContent", "rawPredict", "streamRawPredict"}


# ---------------------------------------------------------------- value helpers

def _int(value: object) -> int | None:
    """A token count, or None for anything that is not a non-negative int (bools included)."""
    return value if type(value) is int and value >= 0 else None


def _count(usage: dict, key: str) -> int | None:
    """Main input/output counts: 0 when the usage object omits the key (embeddings, Gemini zeros)."""
    return 0 if key not in usage else _int(usage[key])


def _sub(usage: dict, key: str, inner: str) -> int | None:
    details = usage.get(key)
    return _int(details.get(inner)) if isinstance(details, dict) else None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


# ------------------------------------------------------------- body splitting

def _load(unit: Unit, needle: re.Pattern[bytes]) -> dict | None:
    """Parse a unit when the needle occurs in it; None when absent or not a JSON object."""
    if isinstance(unit, dict):
        return unit
    if needle.search(unit) is None:
        return None
    try:
        doc = _loads(unit)
    except Exception:  # ValueError, and RecursionError on absurd nesting
        return None
    return doc if isinstance(doc, dict) else None


def _loads(data: bytes) -> object:
    """orjson when it can (fast); the json module for what orjson refuses (invalid UTF-8,
    integers past 64 bits, very deep nesting), so both read the same documents."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data.decode("utf-8", "replace"))


class _SSEEvents:
    """The data of each SSE event in a body, split as they are read, from either end: readers
    that look for the usage from the end (OpenAI, Google) read only the last few events.

    Lines end in LF, CRLF or CR, as SSE allows; an event ends at a blank line.
    """

    def __init__(self, buf: bytes) -> None:
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        self.buf = buf

    def __iter__(self) -> Iterator[bytes]:
        buf, pos = self.buf, 0
        while pos < len(buf):
            end = buf.find(b"\n\n", pos)
            end = len(buf) if end < 0 else end
            data = _event_data(buf[pos:end])
            if data is not None:
                yield data
            pos = end + 2

    def __reversed__(self) -> Iterator[bytes]:
        buf, end = self.buf, len(self.buf)
        while end > 0:
            start = buf.rfind(b"\n\n", 0, end)
            data = _event_data(buf[start + 2 if start >= 0 else 0:end])
            if data is not None:
                yield data
            end = max(start, 0)


# What the readers below take: both directions must work (reversed() included).
Units = list[Unit] | _SSEEvents


def _event_data(block: bytes) -> bytes | None:
    """The data of one event (its `data:` lines joined by LF), None when it has none."""
    if block.startswith(b"data:") and b"\n" not in block:  # the usual event: one data line
        return block[6:] if block[5:6] == b" " else block[5:]
    if b"data:" not in block:
        return None
    data = [line[6:] if line[5:6] == b" " else line[5:]
            for line in block.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(data) if data else None


def _sse_events(buf: bytes) -> list[bytes]:
    return list(_SSEEvents(buf))


def _split(head: bytes, tail: bytes | None) -> tuple[Units, bool]:
    """Cut the capture into units.

    Returns (units, lost): lost means the units may lack the part of the body
    that carries the usage, so the caller falls back to key scanning.
    """
    if head.lstrip()[:1] in (b"{", b"["):  # lstrip(): JSON's whitespace, and \f and \v
        if tail is not None:
            return [], True              # a JSON document cut in the middle cannot be parsed
        try:
            doc = _loads(head)
        except Exception:
            return [], True              # e.g. a Gemini array stream that ended early
        if isinstance(doc, dict):
            return [doc], False
        return [d for d in doc if isinstance(d, dict)], False  # an array: Gemini's JSON stream
    if tail is None:
        return _SSEEvents(head), False
    # Drop the partial line at the end of the head and at the start of the tail.
    head = head[: max(head.rfind(b"\n"), head.rfind(b"\r")) + 1]
    ends = [i for i in (tail.find(b"\n"), tail.find(b"\r")) if i >= 0]
    tail_events = _sse_events(tail[min(ends) + 1:]) if ends else []
    # Usage sits in the last JSON event(s) of every provider's stream: if the tail
    # holds one complete JSON event, that end of the stream was captured.
    lost = not any(e.lstrip()[:1] == b"{" for e in tail_events)
    return _sse_events(head) + tail_events, lost


def _scan(buf: bytes, key: str) -> list[object]:
    """Values of every `"key":` in raw JSON text that cannot be parsed whole (a cut body).

    An unescaped `"key":` cannot occur inside a JSON string, so each hit is a real key.
    """
    text = buf.decode("utf-8", "replace")
    values = []
    for match in re.finditer(r'"%s"\s*:\s*' % key, text):  # a literal prefix keeps this fast
        if text[match.start() - 1: match.start()] == "\\":
            continue                     # `\"key\"` inside a string
        try:
            values.append(_DECODER.raw_decode(text, match.end())[0])
        except Exception:
            pass                         # value runs into the gap or the end of the capture
    return values


def _stream_error(units: Units) -> bool:
    """A stream ended with the provider's error (one of its last few units)."""
    # Every error the needle finds holds one of these: a literal search of the whole body (fast)
    # spares most streams the unit-by-unit look (~3.5 us a stream).
    if isinstance(units, _SSEEvents) and b'"error"' not in units.buf and b"response.failed" not in units.buf:
        return False
    for i, unit in enumerate(reversed(units)):
        if i == _ERROR_LOOKBACK:
            return False
        doc = _load(unit, _STREAM_ERROR_NEEDLE)
        if doc is not None and (doc.get("type") in _ERROR_TYPES or isinstance(doc.get("error"), dict)):
            return True
    return False


def _first_model(units: Units, needle: re.Pattern[bytes], pick: Callable[[dict], str | None],
                 reverse: bool = False) -> str | None:
    for unit in reversed(units) if reverse else units:
        doc = _load(unit, needle)
        if doc is not None and (model := pick(doc)):
            return model
    return None


# ---------------------------------------------------------- provider formats

def _openai_body(doc: dict) -> dict:
    """Responses stream events wrap the response object in `response`."""
    response = doc.get("response")
    return response if isinstance(response, dict) else doc


def _openai_model(doc: dict) -> str | None:
    return _str(_openai_body(doc).get("model"))


def _openai(units: Units) -> tuple[str | None, dict | None]:
    """Chat/completions/embeddings and Responses, plain or streamed."""
    for unit in reversed(units):      # usage is in the last chunk / the terminal event
        doc = _load(unit, _USAGE)
        if doc is None:
            continue
        body = _openai_body(doc)
        if isinstance(usage := body.get("usage"), dict):
            return _str(body.get("model")) or _first_model(units, _MODEL, _openai_model), usage
    return _first_model(units, _MODEL, _openai_model), None


# The Responses API says input/output, chat/completions/embeddings say prompt/completion:
# (input, output, input details, output details).
_RESPONSES_NAMES = ("input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details")
_CHAT_NAMES = ("prompt_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details")


def _openai_counts(usage: dict) -> Counts:
    responses = "input_tokens" in usage or "output_tokens" in usage
    inp, out, inp_details, out_details = _RESPONSES_NAMES if responses else _CHAT_NAMES
    return (_count(usage, inp), _count(usage, out), _sub(usage, inp_details, "cached_tokens"), None,
            _sub(usage, out_details, "reasoning_tokens"), _int(usage.get("total_tokens")))


def _anthropic(units: Units) -> tuple[str | None, dict | None]:
    """Messages, plain or streamed: message_start usage, then each message_delta merged in."""
    model, usage = None, None
    for unit in units:
        doc = _load(unit, _USAGE_OR_MODEL)
        if doc is None:
            continue
        message = doc.get("message") if doc.get("type") == "message_start" else doc
        if not isinstance(message, dict):
            continue
        model = model or _str(message.get("model"))
        if isinstance(part := message.get("usage"), dict):
            # message_delta usage is cumulative but may carry only some fields
            # (older streams: output_tokens only), so merge field by field.
            usage = usage or {}
            usage.update((k, v) for k, v in part.items() if v is not None)
    return model, usage


def _anthropic_counts(usage: dict) -> Counts:
    # Context compaction: top-level numbers cover the last iteration only; the
    # billed amount is the sum over `iterations`.
    iterations = usage.get("iterations")
    parts = [i for i in iterations if isinstance(i, dict)] if isinstance(iterations, list) else []

    def total(key: str) -> int | None:
        values = [v for p in parts or [usage] if (v := _int(p.get(key))) is not None]
        return sum(values) if values else None

    return (total("input_tokens"), total("output_tokens"), total("cache_read_input_tokens"),
            total("cache_creation_input_tokens"), None, None)


def _google_model(doc: dict) -> str | None:
    return _str(doc.get("modelVersion"))


def _google(units: Units) -> tuple[str | None, dict | None]:
    """Gemini API and Vertex AI: every chunk holds a cumulative snapshot, so the last one counts."""
    for unit in reversed(units):
        doc = _load(unit, _USAGE_METADATA)
        if doc is not None and isinstance(usage := doc.get("usageMetadata"), dict):
            return (_google_model(doc) or _first_model(units, _MODEL_VERSION, _google_model, reverse=True),
                    usage)
    return _first_model(units, _MODEL_VERSION, _google_model, reverse=True), None


def _google_counts(usage: dict) -> Counts:
    return (_count(usage, "promptTokenCount"), _count(usage, "candidatesTokenCount"),
            _int(usage.get("cachedContentTokenCount")), None, _int(usage.get("thoughtsTokenCount")),
            _int(usage.get("totalTokenCount")))


def websocket_counts(api: str, usage: dict) -> Counts:
    """Token counts of a usage object read from a WebSocket API's frame (lmgate/ws_relay.py): as
    over HTTP, except that OpenAI Realtime says `input_token_details` and Gemini Live
    `responseTokenCount` for the output."""
    if api == "google":
        counts = _google_counts(usage)
        if "candidatesTokenCount" not in usage and "responseTokenCount" in usage:
            counts = (counts[0], _int(usage["responseTokenCount"]), *counts[2:])
        return counts
    if api == "anthropic":
        return _anthropic_counts(usage)
    counts = _openai_counts(usage)
    if counts[2] is None and "input_token_details" in usage:
        counts = (counts[0], counts[1], _sub(usage, "input_token_details", "cached_tokens"), *counts[3:])
    return counts


# format -> (reader, counts mapper, usage key, model key, model position in a cut body)
_FORMATS = {
    "openai": (_openai, _openai_counts, "usage", "model", 0),
    "anthropic": (_anthropic, _anthropic_counts, "usage", "model", 0),
    "google": (_google, _google_counts, "usageMetadata", "modelVersion", -1),
}


# ---------------------------------------------------------------- entry point

def _verb(path: str) -> str:
    return path.rsplit(":", 1)[1] if ":" in path else ""


def _generates(api: str, path: str) -> bool:
    """Endpoints that normally report usage on success."""
    path = path.rstrip("/")
    if _verb(path) in _GOOGLE_GENERATION:
        return True
    if api == "openai":
        return path.endswith(_OPENAI_GENERATION)
    return api == "anthropic" and path.endswith("/messages")


def model_from_path(path: str) -> str | None:
    """The model a Google-style path names (.../models/<model>:<method>), if any."""
    m = _PATH_MODEL.search(path)
    return _str(unquote(m.group(1))) if m else None


def extract_usage(api: str, path: str, status: int, content_type: str, head: bytes,
                  tail: bytes | None) -> Usage:
    """Model and token counts of one response, from its captured body.

    `tail is None`: `head` is the whole body. Otherwise head and tail are the
    first and last bytes of a longer body.
    """
    try:
        return _extract(api, path, status, content_type, head, tail)
    except Exception:  # last line of defence: accounting must never break a call
        return Usage()


def _extract(api: str, path: str, status: int, content_type: str, head: bytes,
             tail: bytes | None) -> Usage:
    path = path or ""
    head = head if type(head) is bytes else bytes(head or b"")
    tail = tail if tail is None or type(tail) is bytes else bytes(tail)
    stream = is_stream(path, content_type)
    fmt = answer_format(api, path)
    if fmt not in _FORMATS:
        return Usage(stream=stream)
    reader, counts_of, usage_key, model_key, model_pos = _FORMATS[fmt]

    units, lost = _split(head, tail)
    model, usage = reader(units)
    if usage is None and lost:
        found = [v for v in _scan(tail if tail is not None else head, usage_key) if isinstance(v, dict)]
        usage = found[-1] if found else None
    if model is None and (lost or tail is not None):
        names = [v for buf in (head, tail or b"") for v in _scan(buf, model_key) if _str(v)]
        # OpenAI/Anthropic name the model near the start, Google's modelVersion ends each chunk.
        model = names[model_pos] if names else None

    if not 200 <= status < 300:   # the caller classifies errors by status
        return Usage(model=model, stream=stream)
    if model is None:
        model = model_from_path(path)   # Gemini / Vertex (Claude on Vertex too) name it in the path
    errored = stream and _stream_error(units)
    if usage is None:
        problem = STREAM_ERROR if errored else None
        if problem is None and _generates(fmt, path):
            problem = CAPTURE_TRUNCATED if tail is not None and lost else USAGE_MISSING
        return Usage(model=model, stream=stream, problem=problem)
    counts = counts_of(usage)
    problem = STREAM_ERROR if errored else None
    if problem is None and tail is not None and counts[0] is None and _generates(fmt, path):
        problem = CAPTURE_TRUNCATED      # e.g. an Anthropic message_start cut off by a tiny head
    return Usage(model, *counts, stream, problem)
