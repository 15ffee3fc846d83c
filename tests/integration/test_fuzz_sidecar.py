"""The sidecar fuzzed with garbage, oversize and hostile input (hypothesis): /auth headers, and
the spool lines it reads.

The app runs through aiohttp's test client; the tests write into its spool folder as nginx does.
What must hold whatever arrives:
- /auth answers 200 or 403, never 5xx, and never echoes a full key;
- every line nginx could write becomes exactly one record, and every line of the stats file stays
  strict JSON (UTF-8, no NaN/Infinity) with the documented fields and types;
- a line that is not nginx's is counted as bad, never stops the lines after it, and never puts key
  material in the log; oversize lines are skipped with memory bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from lmgate import records as records_mod
from lmgate.allowlist import AllowListHolder
from lmgate.keys import hash_key, mask_key
from lmgate.refusals import FOLDED
from lmgate.app import create_app
from lmgate.settings import load_settings
from tests.support.gate import ALICE_KEY, BOB_KEY, CONFIG, UNLISTED_KEY
from tests.support.http import parse_response
from tests.support.hardening import rss_kib
from tests.support.spool_lines import FIELDS, append, slot, spool_file, spool_line
from tests.support.wait import wait_until_async

pytestmark = pytest.mark.integration

RECORD_KEYS = ("timestamp", "request_id", "lmgate_id", "owner", "provider", "api_format", "method", "endpoint",
               "model", "stream", "status", "input_tokens", "output_tokens", "cache_read_tokens",
               "cache_write_tokens", "reasoning_tokens", "total_tokens", "duration_ms", "response_bytes",
               "masked_key", "error_type")
TOKEN_KEYS = RECORD_KEYS[11:17]
ERROR_TYPES = {None, "forbidden", "gate_unavailable", "rate_limited", "upstream_error", "upstream_unreachable",
               "client_closed", "usage_missing", "capture_truncated", "stream_error"}
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
FUZZ = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
HEAD_BYTES, TAIL_BYTES = 2048, 4096


def _reject_constant(name: str):
    raise ValueError(f"not strict JSON: {name}")


def strict_records(data: bytes) -> list[dict]:
    """Parse stats lines strictly and check each record's shape."""
    assert data == b"" or data.endswith(b"\n"), "torn line"
    records = []
    for line in data.splitlines():
        record = json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
        keys = tuple(record)
        if keys[-1:] == ("folded_calls",):  # stands for a flood of refused calls (lmgate/refusals.py)
            assert record["error_type"] in FOLDED and type(record["folded_calls"]) is int, record
            assert record["folded_calls"] >= 1
            keys = keys[:-1]
        assert keys == RECORD_KEYS, list(record)
        assert TIMESTAMP.fullmatch(record["timestamp"]), record["timestamp"]
        assert type(record["status"]) is int and type(record["stream"]) is bool
        assert type(record["response_bytes"]) is int
        assert isinstance(record["duration_ms"], (int, float)) and math.isfinite(record["duration_ms"])
        assert record["duration_ms"] >= 0
        for key in TOKEN_KEYS:
            assert record[key] is None or (type(record[key]) is int and record[key] >= 0), (key, record[key])
        for key in ("request_id", "lmgate_id", "owner", "provider", "method", "endpoint", "model", "masked_key"):
            assert record[key] is None or isinstance(record[key], str), (key, record[key])
        assert record["api_format"] in ("openai", "anthropic", "google")
        assert record["error_type"] in ERROR_TYPES, record["error_type"]
        assert "?" not in record["endpoint"]
        records.append(record)
    return records


class Sidecar:
    def __init__(self, client, stats: Path, spool: Path) -> None:
        self.client, self.stats, self.spool = client, stats, spool
        self.app = client.server.app
        self.offset = 0
        self.sentinels = 0
        self.slot = slot() + 1000       # files of their own, after any nginx would write now

    async def raw(self, data: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send bytes as they are; return status, headers and body."""
        reader, writer = await asyncio.open_connection(self.client.host, self.client.port)
        try:
            writer.write(data)
            await writer.drain()
            received = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        return parse_response(received)

    async def auth(self, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict[str, str], bytes]:
        lines = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        return await self.raw(b"GET /auth HTTP/1.1\r\nHost: sidecar\r\n" + lines + b"Connection: close\r\n\r\n")

    def write(self, lines: list[bytes], whole: bool = False) -> Path:
        """Append lines to the current spool file; `whole`: make them appear at once in a new
        file (renamed into place), so the reader never sees one of them half written."""
        data = b"".join(line + b"\n" for line in lines)
        if whole:
            self.slot += 10
            tmp = self.spool / "incoming.tmp"
            tmp.write_bytes(data)
            os.rename(tmp, spool_file(self.spool, self.slot))
        else:
            append(spool_file(self.spool, self.slot), data)
        return spool_file(self.spool, self.slot)

    async def readyz(self) -> dict:
        resp = await self.client.get("/readyz")
        return await resp.json()

    async def new_records(self, timeout: float = 10) -> list[dict]:
        """Write a sentinel line after everything written so far, wait until its record is on disk,
        and return the records written since the last call, the sentinel excluded. The spool is
        read in order: everything written before it has been read when it shows."""
        self.sentinels += 1
        rid = f"sentinel-{self.sentinels}"
        self.write([spool_line(b"{}", rid=rid, m="GET", u="/openai/v1/models", ts=f"{time.time():.3f}")])
        needle = f'"request_id":"{rid}"'.encode()

        def written() -> bytes:
            data = self.stats.read_bytes()[self.offset:] if self.stats.exists() else b""
            return data if needle in data else b""

        data = await wait_until_async(written, timeout, f"the line {rid} in the stats file (the reader stopped?)")
        self.offset += len(data)
        records = strict_records(data)
        assert records[-1]["request_id"] == rid
        return records[:-1]


def _settings(tmp_path: Path, **env: str):
    allowlist = tmp_path / "allowlist.csv"
    allowlist.write_text("id,api_key,owner,added\n"
                         f"alice,{ALICE_KEY},alice@example.com,2026-01-01\n"
                         f"bob,{hash_key(BOB_KEY)},bob@example.com,2026-01-02\n")
    stats = tmp_path / "stats.jsonl"
    spool = tmp_path / "spool"
    environ = {
        "LMGATE_AUTH__ALLOWLIST_PATH": str(allowlist),
        "LMGATE_STATS__OUTPUT_PATH": str(stats),
        "LMGATE_STATS__SPOOL_DIR": str(spool),
        "LMGATE_STATS__FLUSH_INTERVAL_SECONDS": "0.02",
        "LMGATE_STATS__CAPTURE_HEAD_BYTES": str(HEAD_BYTES),
        "LMGATE_STATS__CAPTURE_TAIL_BYTES": str(TAIL_BYTES),
        **env,
    }
    return load_settings(CONFIG, environ=environ), stats, spool


@pytest.fixture
async def sidecar(tmp_path, aiohttp_client):
    s, stats, spool = _settings(tmp_path)
    holder = AllowListHolder(s.auth.allowlist_path, s.auth.poll_interval_seconds)
    client = await aiohttp_client(create_app(s, holder))
    return Sidecar(client, stats, spool)


# ============================================================================ /auth

LISTED = {ALICE_KEY: "alice", BOB_KEY: "bob"}
printable = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=60)
key_like = st.one_of(st.sampled_from([ALICE_KEY, BOB_KEY, UNLISTED_KEY, "", " "]), printable)
header_value = st.one_of(key_like, key_like.map(lambda k: "Bearer " + k), key_like.map(lambda k: "bearer  " + k),
                         printable.map(lambda t: t + " " + ALICE_KEY))
query_value = st.lists(st.tuples(st.sampled_from(["key", "KEY", "ke%79", "alt", "k"]), key_like),
                       max_size=4).map(lambda kv: "/gemini/v1beta/models/m:generateContent?" + urlencode(kv))
auth_headers = st.lists(st.tuples(st.sampled_from(["Authorization", "x-api-key", "x-goog-api-key", "X-API-KEY",
                                                   "X-LMGate-Query", "X-LMGate-ID", "Cookie"]),
                                  st.one_of(header_value, query_value)), max_size=6)


@settings(max_examples=150, **FUZZ)
@given(headers=auth_headers)
async def test_auth_answers_200_or_403_for_any_text_headers_and_never_echoes_a_key(sidecar, headers):
    raw = [(n.encode(), v.strip().encode("utf-8")) for n, v in headers]
    status, answer, body = await sidecar.auth(raw)
    assert status in (200, 403), (status, body[:200])
    assert body == b""  # nginx never reads it
    sent = [v for _, v in headers]
    if status == 200:
        who = answer["x-lmgate-id"]
        key = next(k for k, w in LISTED.items() if w == who)
        assert any(key in v for v in sent), "approved without the listed key in the request"
        assert answer["x-lmgate-key"] == quote(mask_key(key), safe="")
    for value in answer.values():
        for secret in [ALICE_KEY, BOB_KEY, UNLISTED_KEY] + [v for v in sent if len(v.strip()) > 12]:
            assert secret.strip() not in value, "a full key in an /auth answer header"


@settings(max_examples=60, report_multiple_bugs=False, derandomize=True, **FUZZ)
@given(name=st.sampled_from([b"Authorization", b"x-api-key", b"x-goog-api-key"]),
       value=st.binary(min_size=6, max_size=40).filter(lambda b: not set(b) & {0, 10, 13}))
async def test_auth_never_5xx_for_raw_bytes_in_key_headers(sidecar, name, value):
    value = b"sk-lmgate-" + value  # long enough (> 12) for the masked form to show its end
    if name == b"Authorization":
        value = b"Bearer " + value
    status, _, body = await sidecar.auth([(name, value)])
    assert status in (200, 400, 403), f"/auth answered {status} for {name!r}: {value!r}"


async def test_auth_oversize_and_hostile_headers_never_5xx(sidecar):
    cases = [
        [(b"Authorization", b"Bearer " + b"k" * 100_000)],
        [(b"X-LMGate-Query", b"/gemini/x?" + b"&".join(b"key=%d" % i for i in range(5000)))],
        [(b"X-H%d" % i, b"v") for i in range(2000)],
        [(b"x-api-key", ALICE_KEY.encode()), (b"X-LMGate-Query", b"/x?key=" + b"%" * 3000)],
        [(b"x-api-key", b"\t" + ALICE_KEY.encode() + b" \t")],
    ]
    rss = rss_kib(os.getpid())
    for headers in cases * 20:
        status, _, _ = await sidecar.auth(headers)
        assert status in (200, 400, 403, 431), status
    assert rss_kib(os.getpid()) - rss < 64 * 1024
    status, answer, _ = await sidecar.auth([(b"x-api-key", ALICE_KEY.encode())])
    assert status == 200 and answer["x-lmgate-id"] == "alice"


# ============================================================================ the spool

def _json_values():
    scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                        max_leaves=12)



usage_like = st.fixed_dictionaries({}, optional={
    name: _json_values() for name in ("prompt_tokens", "completion_tokens", "total_tokens", "input_tokens",
                                      "output_tokens", "cache_read_input_tokens", "prompt_tokens_details",
                                      "promptTokenCount", "candidatesTokenCount")})
document = st.fixed_dictionaries({}, optional={"model": _json_values(), "modelVersion": _json_values(),
                                               "usage": st.one_of(usage_like, _json_values()),
                                               "usageMetadata": st.one_of(usage_like, _json_values()),
                                               "type": st.sampled_from(["message_start", "message_delta", "x"]),
                                               "message": st.fixed_dictionaries({}, optional={"usage": usage_like})})
body_strategy = st.one_of(
    st.binary(max_size=400),
    document.map(lambda d: json.dumps(d).encode()),
    st.lists(document, max_size=5).map(lambda ds: b"".join(b"data: " + json.dumps(d).encode() + b"\n\n" for d in ds)),
    st.lists(document, max_size=5).map(lambda ds: json.dumps(ds).encode()),
    st.binary(min_size=7000, max_size=9000),  # longer than head + tail: captured with a gap
)
field_value = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["openai", "anthropic", "google", "gemini", "200", "429", "499", "500", "-1", "1e400", "nan",
                     "inf", "OK", "", "forbidden", "gate_unavailable", "upstream_unreachable",
                     "/openai/v1/chat/completions", "/google/v1/x/publishers/anthropic/models/c:rawPredict",
                     "/gemini/v1beta/models/g:streamGenerateContent", "text/event-stream", "%ZZ", "%ff%fe",
                     "5:g:e30=:e30=", "5:x:e30=:", "1:gx::", "::::", "9" * 5000]),
)
# Any field nginx writes, or one it does not, set to any text (nginx writes every value as a string).
fields_strategy = st.dictionaries(st.sampled_from(FIELDS + ("body", "x", "bf", "bh")), field_value, max_size=10)


def nginx_like_line(body: bytes, fields: dict[str, str], last: bool, done: bool) -> bytes:
    """A line as nginx would write it for `body`, with some fields set to other text."""
    text, tab, capture_text = spool_line(body, head_max=HEAD_BYTES, tail_max=TAIL_BYTES, last=last,
                                         done=done).rpartition(b"\t")
    meta = json.loads(text)
    if "body" in fields:  # other text after the tab (never a line break: nginx writes base64 there)
        capture_text = fields.pop("body").replace("\n", "").encode()
    meta.update(fields)
    return json.dumps(meta, ensure_ascii=False).encode() + tab + capture_text


async def test_every_line_nginx_could_write_becomes_exactly_one_strict_record(sidecar):
    drawn: list[bytes] = []

    @settings(max_examples=200, **FUZZ)
    @given(body=body_strategy, fields=fields_strategy, last=st.booleans(), done=st.booleans(),
           secret_in_query=st.booleans())
    def draw(body, fields, last, done, secret_in_query):
        if secret_in_query:   # nginx logs the path without its query; a line that had one must not leak it
            fields["u"] = fields.get("u", "/openai/v1/x") + "?key=" + UNLISTED_KEY
        drawn.append(nginx_like_line(body, fields, last, done))

    draw()
    for start in range(0, len(drawn), 25):
        sidecar.write(drawn[start:start + 25])
    records = await sidecar.new_records()
    assert len(records) == len(drawn), (len(records), len(drawn))
    for record in records:
        assert UNLISTED_KEY not in json.dumps(record, ensure_ascii=False)
    ready = await sidecar.readyz()
    assert ready["spool_bad_lines"] == 0 and ready["spool_lines_read"] == len(drawn) + 1


def _mutate(line: bytes, edits: list[tuple[int, bytes]]) -> bytes:
    data = bytearray(line)
    for where, new in edits:
        where %= len(data) + 1
        data[where:where + len(new) % 3] = new
    return bytes(data)


GOOD_LINE = spool_line(b'{"model":"gpt-4o","usage":{"prompt_tokens":1,"completion_tokens":2}}', rid="template")
bad_line = st.one_of(
    st.binary(max_size=300),
    st.tuples(st.sampled_from([GOOD_LINE, spool_line(b"", s=403, err="forbidden", id="", own="")]),
              st.lists(st.tuples(st.integers(min_value=0, max_value=400), st.binary(max_size=4)), min_size=1,
                       max_size=4)).map(lambda t: _mutate(*t)),
    st.lists(_json_values(), max_size=3).map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(FIELDS), st.text(max_size=30), min_size=1, max_size=6).map(
        lambda d: json.dumps(d).encode()),
    st.text(max_size=200).map(lambda t: ("{" + t).encode()),
    st.just(b"[" * 5000), st.just(b'{"s":"' + b"9" * 10000 + b'"}'),
    st.just(b'{"rid":"\\ud800","s":"200"}'),
    st.just(("garbage " + UNLISTED_KEY).encode()),
    st.just(GOOD_LINE.replace(b'"u":"/openai/v1/chat/completions"',
                              b'"u":"/openai/v1/chat/completions?key=' + UNLISTED_KEY.encode() + b'"')[:-40]),
)


async def test_bad_lines_are_counted_never_stop_the_next_and_never_leak_a_key(sidecar, caplog):
    drawn: list[bytes] = []

    @settings(max_examples=300, **FUZZ)
    @given(bad_line)
    def draw(line):
        drawn.extend(piece for piece in line.split(b"\n") if piece)

    draw()
    lines, good, expect_bad, expect_records, expect_refused = [], [], 0, 0, 0
    for i, line in enumerate(drawn):
        try:
            refused = records_mod.from_spool(line, 1.0)["error_type"] == "forbidden"
            expect_records += not refused
            expect_refused += refused
        except Exception:  # noqa: BLE001 - whatever the reader catches, it counts
            expect_bad += 1
        rid = f"good-{i}"
        good.append(rid)
        lines += [line, spool_line(b"{}", rid=rid)]
    with caplog.at_level(logging.INFO):
        for start in range(0, len(lines), 40):
            sidecar.write(lines[start:start + 40])
        records = await sidecar.new_records(timeout=20)
    rids = [r["request_id"] for r in records]
    assert [rid for rid in rids if rid in set(good)] == good, "a good line after a bad one was lost"
    # Refused calls past lmgate/refusals.py's bound are folded into a record written later.
    refused = sum(r["error_type"] == "forbidden" for r in records)
    assert len(records) - refused == len(good) + expect_records
    assert min(expect_refused, 1) <= refused <= expect_refused
    ready = await sidecar.readyz()
    assert ready["spool_bad_lines"] == expect_bad
    assert ready["spool_lines_read"] == len(lines) + 1
    assert expect_bad > len(drawn) // 4                  # the draw was largely garbage (~40-60 %)
    assert UNLISTED_KEY not in caplog.text, "a key in the log"
    for record in records:
        assert UNLISTED_KEY not in json.dumps(record, ensure_ascii=False)


async def test_a_folded_record_of_refused_calls_has_the_record_shape_plus_its_count(sidecar):
    """The fuzz draws above can hold a flood of refusals from one address: its folded record is
    written as soon as a later call of that address ends its window."""
    per_window = 10  # stats.refusal_records_per_window's default
    refused = [spool_line(b"{}", rid=f"refused-{i}", id="", own="", s=403, err="forbidden", ra="192.0.2.9",
                          ts="1700000000.500") for i in range(per_window + 3)]
    later = spool_line(b"{}", rid="refused-later", id="", own="", s=403, err="forbidden", ra="192.0.2.9",
                       ts="1700000030.500")
    sidecar.write([*refused, later])
    records = await sidecar.new_records()
    folded = [r for r in records if "folded_calls" in r]
    assert [(r["request_id"], r["folded_calls"]) for r in folded] == [(f"refused-{per_window}", 3)]
    assert len(records) == per_window + 2


async def test_a_line_with_values_other_than_strings_is_bad_or_a_strict_record(sidecar):
    """nginx writes every value as a string; a line with others must not put a record of the wrong
    shape in the stats file (one is a dict where a request id goes)."""
    sidecar.write([b'{"rid":{"a":1},"p":"openai","u":"/openai/v1/x","s":"200","done":"OK"}',
                   b'{"rid":"list-provider","p":["openai"],"u":"/openai/v1/x","s":"200","done":"OK"}'])
    try:
        records = await sidecar.new_records()
    except AssertionError as exc:
        raise AssertionError(f"a record of the wrong shape: {str(exc)[:200]}") from None
    assert len(records) <= 2


async def test_oversize_lines_are_skipped_and_memory_stays_bounded(sidecar):
    ready = await sidecar.readyz()
    # Above app._max_spool_line (the longest line nginx writes) for any header limit up to 512k.
    line_limit = (HEAD_BYTES + TAIL_BYTES) * 4 // 3 + 2 * 512 * 1024 + 65536
    big = b"x" * (2 << 20)
    assert len(big) > line_limit
    rss = rss_kib(os.getpid())
    for i in range(20):
        sidecar.write([big, spool_line(b"{}", rid=f"after-big-{i}")], whole=True)
    records = await sidecar.new_records(timeout=30)
    assert [r["request_id"] for r in records] == [f"after-big-{i}" for i in range(20)]
    growth = rss_kib(os.getpid()) - rss
    assert growth < 64 * 1024, f"RSS grew {growth / 1024:.1f} MiB after 20 skipped 2 MiB lines"
    after = await sidecar.readyz()
    assert after["spool_bad_lines"] - ready["spool_bad_lines"] == 20


async def test_a_line_of_the_largest_size_nginx_writes_is_recorded(sidecar):
    body = os.urandom(HEAD_BYTES + TAIL_BYTES + 1000)
    line = spool_line(body, rid="largest", head_max=HEAD_BYTES, tail_max=TAIL_BYTES,
                      u="/openai/v1/" + "p" * 30_000)
    sidecar.write([line])
    [record] = await sidecar.new_records()
    assert record["request_id"] == "largest" and record["response_bytes"] == len(body)


async def test_a_flood_of_lines_is_each_recorded_once(sidecar):
    total = 3000
    for start in range(0, total, 100):
        sidecar.write([spool_line(b"{}", rid=f"flood{i}", u="/openai/x") for i in range(start, start + 100)])
        await asyncio.sleep(0)
    records = await sidecar.new_records(timeout=30)
    rids = [r["request_id"] for r in records]
    assert len(set(rids)) == len(rids), "a record was doubled"
    assert sorted(rids) == sorted(f"flood{i}" for i in range(total))
    ready = await sidecar.readyz()
    assert ready["spool_lines_read"] == total + 1 and ready["spool_bad_lines"] == 0


@pytest.mark.parametrize("where", ["line", "body"])
async def test_a_lone_surrogate_never_stops_recording(sidecar, where):
    if where == "line":
        # nginx never writes a \u escape past \u001F: this line is not nginx's, and is skipped.
        sidecar.write([b'{"rid":"surrogate","p":"\\udc80","u":"/openai/x","s":"403","done":"OK","err":"forbidden"}'])
    else:
        body = b'{"model":"gpt-\\ud800","usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}'
        sidecar.write([spool_line(body, rid="surrogate")])
    records = await sidecar.new_records(timeout=5)
    assert len(records) == (0 if where == "line" else 1)
    if where == "body":
        assert records[0]["model"] == "gpt-\ud800" and records[0]["input_tokens"] == 1
