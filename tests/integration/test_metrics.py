"""The sidecar's /metrics through aiohttp's test client: per-call counters from the records, /auth
decisions and timing, the pipeline's values, and nginx's stub_status read on the readiness socket."""

from __future__ import annotations

import json
import time

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from lmgate.readiness import SOCKET_NAME, STUB_STATUS_PATH
from lmgate.report.prices import Pricer
from tests.integration import test_sidecar_app
from tests.integration.test_sidecar_app import KEY_ALICE, KEY_UNKNOWN, call_line

make_gate = test_sidecar_app.make_gate   # the sidecar app's fixture

pytestmark = pytest.mark.integration


def samples(text: str) -> dict[tuple, float]:
    """(sample name, sorted label items) -> value, from a scrape; checks that it parses."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(scraped: dict, name: str, **labels) -> float:
    return scraped[(name, tuple(sorted(labels.items())))]


async def scrape(gate) -> tuple[str, dict]:
    resp = await gate.client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = await resp.text()
    return text, samples(text)


ANTHROPIC_BODY = json.dumps({
    "id": "msg_1", "type": "message", "model": "claude-sonnet-4-5-20250929", "role": "assistant",
    "content": [{"type": "text", "text": "Hi"}], "stop_reason": "end_turn",
    "usage": {"input_tokens": 100, "output_tokens": 20, "cache_read_input_tokens": 50,
              "cache_creation_input_tokens": 10}}).encode()


async def test_calls_tokens_cost_and_durations_match_the_records(make_gate):
    gate = await make_gate()
    gate.write(
        call_line(rid="a1", t="0.250"),
        call_line(rid="a2", t="3.000"),
        call_line(rid="c1", p="anthropic", u="/anthropic/v1/messages", body=ANTHROPIC_BODY, t="1.000"),
        call_line(rid="denied", s=403, err="forbidden", id="", own="", body=b""),
        call_line(rid="down", s=403, err="gate_unavailable", id="", own="", mk="", body=b""),
        call_line(rid="slow", s=429, body=b'{"error":{"message":"slow down"}}'),
    )
    records = await gate.wait_records(6)
    assert (await gate.auth({"Authorization": f"Bearer {KEY_ALICE}"}))[0].status == 200
    assert (await gate.auth({"Authorization": f"Bearer {KEY_UNKNOWN}"}))[0].status == 403
    text, m = await scrape(gate)

    calls = {k[1]: v for k, v in m.items() if k[0] == "lmgate_calls_total"}
    assert sum(calls.values()) == len(records)
    assert value(m, "lmgate_calls_total", provider="openai", model="gpt-4o-mini", status_class="2xx",
                 error_type="") == 2
    assert value(m, "lmgate_calls_total", provider="openai", model="", status_class="4xx",
                 error_type="forbidden") == 1
    assert value(m, "lmgate_calls_total", provider="openai", model="", status_class="4xx",
                 error_type="rate_limited") == 1
    # The report's token shape: OpenAI's input includes cache reads (none here).
    tokens = {kind: value(m, "lmgate_tokens_total", provider="openai", model="gpt-4o-mini", kind=kind)
              for kind in ("input", "output", "cache_read", "cache_write", "reasoning")}
    assert tokens == {"input": 22, "output": 6, "cache_read": 0, "cache_write": 0, "reasoning": 0}
    claude = {kind: value(m, "lmgate_tokens_total", provider="anthropic",
                          model="claude-sonnet-4-5-20250929", kind=kind)
              for kind in ("input", "output", "cache_read", "cache_write")}
    assert claude == {"input": 100, "output": 20, "cache_read": 50, "cache_write": 10}
    # Cost at the report's prices, per model.
    units = Pricer(None).lookup("openai", "openai", "gpt-4o-mini", len(Pricer(None).change_dates()), 0)
    assert value(m, "lmgate_cost_usd_total", provider="openai", model="gpt-4o-mini") == pytest.approx(
        22 * units.input + 6 * units.output)
    assert value(m, "lmgate_cost_usd_total", provider="anthropic", model="claude-sonnet-4-5-20250929") > 0
    # Upstream durations: the refused calls did not reach the provider.
    hist = "gen_ai_client_operation_duration_seconds"
    assert value(m, f"{hist}_count", provider="openai", model="gpt-4o-mini") == 2
    assert value(m, f"{hist}_sum", provider="openai", model="gpt-4o-mini") == pytest.approx(3.25)
    assert value(m, f"{hist}_bucket", provider="openai", model="gpt-4o-mini", le="0.32") == 1
    assert value(m, f"{hist}_bucket", provider="openai", model="gpt-4o-mini", le="+Inf") == 2
    # Auth: the handler's answers, and the call nginx refused with the sidecar away.
    assert value(m, "lmgate_auth_decisions_total", decision="allowed") == 1
    assert value(m, "lmgate_auth_decisions_total", decision="refused") == 1
    assert value(m, "lmgate_auth_decisions_total", decision="unavailable") == 1
    assert value(m, "lmgate_auth_duration_seconds_count") == 2
    # The pipeline.
    assert value(m, "lmgate_records_written_total") == 6
    assert value(m, "lmgate_stats_flushes_total") >= 1
    assert value(m, "lmgate_stats_write_errors_total") == 0
    assert value(m, "lmgate_spool_lines_read_total") == 6
    assert value(m, "lmgate_spool_backlog_bytes") == 0
    assert value(m, "lmgate_allowlist_keys") == 3
    assert value(m, "lmgate_readiness_problems") == 0
    assert 0 <= value(m, "lmgate_records_lag_seconds") < 60
    # No per-key labels by default, and no key anywhere.
    assert "owner=" not in text and "lmgate_id=" not in text
    assert KEY_ALICE not in text
    # nginx is not running here.
    assert value(m, "nginx_up") == 0


async def test_per_key_labels_setting(make_gate):
    gate = await make_gate(LMGATE_METRICS__PER_KEY_LABELS="true")
    gate.write(call_line(rid="a1"))
    await gate.wait_records(1)
    _, m = await scrape(gate)
    assert value(m, "lmgate_calls_total", provider="openai", model="gpt-4o-mini", status_class="2xx",
                 error_type="", owner="Alice Smith", lmgate_id="alice") == 1
    assert value(m, "lmgate_tokens_total", provider="openai", model="gpt-4o-mini", kind="input",
                 owner="Alice Smith", lmgate_id="alice") == 11


async def test_folded_refusals_count_their_calls(make_gate):
    gate = await make_gate()
    # Calls of 20 s ago: their window has ended, so the folded record is written at once.
    ts = f"{time.time() - 20:.3f}"
    gate.write(*(call_line(rid=f"d{i}", s=403, err="forbidden", id="", own="", body=b"", ts=ts)
                 for i in range(25)))
    # 10 recorded one by one, the other 15 folded into one record.
    records = await gate.wait_records(11)
    assert [r.get("folded_calls") for r in records].count(15) == 1
    _, m = await scrape(gate)
    assert value(m, "lmgate_calls_total", provider="openai", model="", status_class="4xx",
                 error_type="forbidden") == 25
    assert value(m, "lmgate_refusals_folded_calls_total") == 15


STUB = (b"Active connections: 3 \nserver accepts handled requests\n 17 16 42 \n"
        b"Reading: 0 Writing: 1 Waiting: 2 \n")


async def test_nginx_stub_status_is_read_on_the_readiness_socket(make_gate):
    gate = await make_gate()
    # nginx's stub_status, as it answers on the readiness socket.
    seen = []

    async def stub(request):
        seen.append(request.path)
        return web.Response(body=STUB, content_type="text/plain")

    app = web.Application()
    app.router.add_get(STUB_STATUS_PATH, stub)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.UnixSite(runner, str(gate.spool / SOCKET_NAME))
    await site.start()
    try:
        _, m = await scrape(gate)
    finally:
        await runner.cleanup()
    assert seen == [STUB_STATUS_PATH]
    assert value(m, "nginx_up") == 1
    assert value(m, "nginx_connections_active") == 3
    assert value(m, "nginx_connections_accepted_total") == 17
    assert value(m, "nginx_connections_handled_total") == 16
    assert value(m, "nginx_http_requests_total") == 42
    assert (value(m, "nginx_connections_reading"), value(m, "nginx_connections_writing"),
            value(m, "nginx_connections_waiting")) == (0, 1, 2)


async def test_a_bad_price_file_is_one_logged_line_and_the_gate_runs(make_gate, tmp_path, caplog):
    bad = tmp_path / "prices.yaml"
    bad.write_text("prices_as_of: 2026-12-01\ncurrency: EUR\n", encoding="utf-8")
    gate = await make_gate(LMGATE_REPORT__PRICES_PATH=str(bad))
    [line] = [r.getMessage() for r in caplog.records if r.name == "lmgate.sidecar" and "metrics:" in r.getMessage()]
    assert str(bad) in line and "genai-prices alone" in line and "\n" not in line
    gate.write(call_line(rid="a1"))
    await gate.wait_records(1)
    _, m = await scrape(gate)
    assert value(m, "lmgate_cost_usd_total", provider="openai", model="gpt-4o-mini") > 0
