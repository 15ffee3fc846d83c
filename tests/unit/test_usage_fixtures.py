"""lmgate.usage against recorded provider responses (see the fixtures' README.md).

Each `<provider>/<name>.json` metadata file in the fixtures folder is one case;
a fixture added later is picked up without changing this file. The folder is
`$LMGATE_FIXTURES_DIR`, by default `<repo>/../shared/fixtures`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lmgate.usage import Usage, extract_usage

pytestmark = pytest.mark.unit

FIXTURES = Path(os.environ.get("LMGATE_FIXTURES_DIR")
                or Path(__file__).resolve().parents[2].parent / "shared" / "fixtures")

# The forced split: the first 200 and last 2000 bytes of bodies longer than 2200.
SPLIT_HEAD, SPLIT_TAIL = 200, 2000

# Fixtures whose needed data lies in the gap of that forced split, with the
# reason and what is still expected. Every other fixture must come out of the
# split exactly as out of the whole body. A new fixture that fails the split
# test needs a look: is the data really in the gap? Then list it here.
IN_THE_GAP = {
    "anthropic/messages_stream_legacy_delta_usage": (
        "message_start (the only input count) is longer than the 200-byte head and the 2024-shape "
        "message_delta carries output_tokens only",
        {"input_tokens": None, "cache_read_tokens": None, "problem": "capture_truncated"}),
    "anthropic/messages_stream_cache_read": (
        "message_start (input and cache read counts) is longer than the 200-byte head and the "
        "2024-shape message_delta carries output_tokens only",
        {"input_tokens": None, "cache_read_tokens": None, "cache_write_tokens": None,
         "problem": "capture_truncated"}),
    "openai/responses_stream_reasoning_tokens": (
        "`model` is past byte 200 of response.created and at the start of response.completed, "
        "which begins before the 2000-byte tail; the usage at its end is still found",
        {"model": None}),
}


def _cases(min_body: int = 0) -> list:
    """One param per metadata file (id "provider/name"), or a single skipping param."""
    if not FIXTURES.is_dir():
        reason = f"fixtures folder {FIXTURES} not found (set LMGATE_FIXTURES_DIR)"
    else:
        metas = [p for p in sorted(FIXTURES.glob("*/*.json"))
                 if p.with_suffix(".response").is_file()
                 and p.with_suffix(".response").stat().st_size > min_body]
        if metas:
            return [pytest.param(p, id=f"{p.parent.name}/{p.stem}") for p in metas]
        reason = f"no fixture with a body over {min_body} bytes in {FIXTURES}"
    return [pytest.param(None, marks=pytest.mark.skip(reason=reason), id="no-fixtures")]


def _load(meta_path: Path) -> tuple[dict, bytes]:
    meta = json.loads(meta_path.read_text())
    return meta, meta_path.with_suffix(".response").read_bytes()


def _call(meta: dict, head: bytes, tail: bytes | None) -> Usage:
    return extract_usage(meta["provider"], meta["request_path"], meta["status"], meta["content_type"], head, tail)


def _expected(meta: dict) -> dict:
    """The Usage fields a whole-body extraction must produce, per the README's rules."""
    exp, extra, provider = meta["expected"], meta["expected_extra"], meta["provider"]
    if "cache_creation_input_tokens" in extra:
        cache_write = extra["cache_creation_input_tokens"]
    else:
        # Only Anthropic reports cache writes; its old usage shape has no cache keys at all.
        assert provider != "anthropic" or exp["cached_input_tokens"] is None, "fixture lacks cache_creation"
        cache_write = None
    if "total_tokens" in extra:
        total = extra["total_tokens"]
    else:
        # Anthropic has no total; elsewhere a missing total means no usage was reported.
        assert provider == "anthropic" or exp["input_tokens"] is None, "fixture lacks total_tokens"
        total = None
    ok = 200 <= meta["status"] < 300
    return {
        "model": exp["model"],
        "input_tokens": exp["input_tokens"],
        "output_tokens": exp["output_tokens"],
        "cache_read_tokens": exp["cached_input_tokens"],
        "cache_write_tokens": cache_write,
        "reasoning_tokens": exp["reasoning_tokens"],
        "total_tokens": total,
        # every fixture with a 2xx status is a generation endpoint
        "problem": "usage_missing" if ok and exp["input_tokens"] is None else None,
    }


def _fields(u: Usage) -> dict:
    return {k: getattr(u, k) for k in ("model", "input_tokens", "output_tokens", "cache_read_tokens",
                                       "cache_write_tokens", "reasoning_tokens", "total_tokens", "problem")}


@pytest.mark.parametrize("meta_path", _cases())
def test_whole_body(meta_path: Path):
    meta, body = _load(meta_path)
    assert len(body) == meta["body_bytes"]
    u = _call(meta, body, None)
    assert _fields(u) == _expected(meta)
    if 200 <= meta["status"] < 300:
        # for successful responses the request's stream flag matches what the response shows
        assert u.stream is meta["stream"]


@pytest.mark.parametrize("meta_path", _cases(min_body=SPLIT_HEAD + SPLIT_TAIL))
def test_head_tail_split(meta_path: Path):
    meta, body = _load(meta_path)
    expected = _expected(meta)
    name = f"{meta_path.parent.name}/{meta_path.stem}"
    if name in IN_THE_GAP:
        expected.update(IN_THE_GAP[name][1])
    u = _call(meta, body[:SPLIT_HEAD], body[-SPLIT_TAIL:])
    assert _fields(u) == expected
    assert u.stream is _call(meta, body, None).stream


def test_gap_cases_exist():
    """Keep IN_THE_GAP honest: every entry names a fixture that is actually split."""
    if not FIXTURES.is_dir():
        pytest.skip(f"fixtures folder {FIXTURES} not found (set LMGATE_FIXTURES_DIR)")
    for name in IN_THE_GAP:
        path = FIXTURES / f"{name}.response"
        if path.exists():
            assert path.stat().st_size > SPLIT_HEAD + SPLIT_TAIL, name


# Each provider's documented error inside a stream, as one SSE event (name, data).
_STREAM_ERRORS = {
    "anthropic": ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    "openai-chat": (None, {"error": {"message": "The server had an error while processing your request.",
                                     "type": "server_error", "param": None, "code": None}}),
    "openai-responses": ("error", {"type": "error", "code": "server_error", "message": "Something went wrong",
                                   "param": None, "sequence_number": 9999}),
    "google": (None, {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}),
}


def _stream_cases() -> list:
    return [c for c in _cases() if c.values[0] is None or _is_ok_stream(c.values[0])]


def _is_ok_stream(meta_path: Path) -> bool:
    meta = json.loads(meta_path.read_text())
    return meta["stream"] and 200 <= meta["status"] < 300


def _broken_off(meta: dict, body: bytes) -> tuple[bytes, bytes]:
    """The first half of a recorded stream's events, and the same followed by the provider's error."""
    kind = meta["provider"]
    if kind == "openai":
        kind = "openai-responses" if meta["request_path"].endswith("/responses") else "openai-chat"
    name, data = _STREAM_ERRORS[kind]
    if body.lstrip()[:1] == b"[":   # Gemini's JSON-array stream
        chunks = json.loads(body)
        half = chunks[: max(1, len(chunks) // 2)]
        return json.dumps(half).encode(), json.dumps(half + [data]).encode()
    nl = b"\r\n" if b"\r\n" in body else b"\n"
    events = [e for e in body.split(nl + nl) if e.strip()]
    cut = b"".join(e + nl + nl for e in events[: max(1, len(events) // 2)])
    event = (b"event: " + name.encode() + nl if name else b"") + b"data: " + json.dumps(data).encode() + nl + nl
    return cut, cut + event


@pytest.mark.parametrize("meta_path", _stream_cases())
def test_recorded_stream_broken_off_by_an_error_keeps_its_usage(meta_path: Path):
    """A real stream cut at half its events and ended with the provider's documented error event:
    a stream error, with the model and counts of the part before the error."""
    meta, body = _load(meta_path)
    before, errored = _broken_off(meta, body)
    expected = _fields(_call(meta, before, None))
    expected["problem"] = "stream_error"
    u = _call(meta, errored, None)
    assert _fields(u) == expected and u.stream
    if meta["provider"] != "openai":   # Anthropic's message_start, Google's every chunk
        assert u.input_tokens is not None
