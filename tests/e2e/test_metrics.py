"""/metrics on a real gate (`lmgate up`: nginx + njs + sidecar): calls through the public port
show up as counts and tokens equal to their records, nginx's stub_status counters are there, the
public port serves neither, and every query of the Grafana dashboard names what the sidecar
really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmgate.report.output import DENIED
from tests.support.gate import ALICE_KEY, BOB_KEY, UNLISTED_KEY
from tests.support.ports import free_port
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "lmgate.json"
CHAT = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,
                  "prompt_tokens_details": {"cached_tokens": 4}}}
# PromQL words in the dashboard's queries that are not metric names.
PROMQL = {"sum", "rate", "increase", "histogram_quantile", "topk", "time"}


def scrape(gate) -> list:
    resp = httpx.get(gate.sidecar_url("/metrics"), timeout=10)
    assert resp.status_code == 200
    return list(text_string_to_metric_families(resp.text))


def samples(families, name: str) -> list:
    return [s for f in families for s in f.samples if s.name == name]


def test_metrics_of_a_running_gate(own_gate, mock_upstream):
    gate = own_gate(LMGATE_METRICS__PER_KEY_LABELS="true")
    mock_upstream.reply("/v1/metrics-test/chat", body=json.dumps(CHAT).encode(),
                        content_type="application/json")
    mark = gate.mark()
    for key, status in ((ALICE_KEY, 200), (ALICE_KEY, 200), (BOB_KEY, 200), (UNLISTED_KEY, 403)):
        resp = httpx.post(gate.base("openai") + "/v1/metrics-test/chat", json={"model": "gpt-4o-mini"},
                          headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert resp.status_code == status
    records = gate.new_records(mark, 4)

    families = wait_until(lambda: (f := scrape(gate)) and sum(
        s.value for s in samples(f, "lmgate_calls_total")) >= len(records) and f, 10,
        "the calls in /metrics")
    calls = samples(families, "lmgate_calls_total")
    assert sum(s.value for s in calls) == len(records)
    per_owner = {}
    for s in calls:
        per_owner[s.labels["owner"]] = per_owner.get(s.labels["owner"], 0) + s.value
    assert per_owner == {"alice@example.com": 2, "bob@example.com": 1, "": 1}
    # Tokens as the report counts them: OpenAI's input less its cache reads.
    tokens = {}
    for s in samples(families, "lmgate_tokens_total"):
        tokens[s.labels["kind"]] = tokens.get(s.labels["kind"], 0) + s.value
    answered = [r for r in records if r["error_type"] is None]
    assert tokens["input"] == sum(r["input_tokens"] - r["cache_read_tokens"] for r in answered) == 21
    assert tokens["output"] == sum(r["output_tokens"] for r in answered) == 21
    assert tokens["cache_read"] == sum(r["cache_read_tokens"] for r in answered) == 12
    [cost] = {s.labels["model"]: s.value for s in samples(families, "lmgate_cost_usd_total")
              if s.labels["owner"] == "alice@example.com"}.values()
    assert cost > 0
    [count] = [s.value for s in samples(families, "gen_ai_client_operation_duration_seconds_count")]
    assert count == len(answered)
    decisions = {s.labels["decision"]: s.value for s in samples(families, "lmgate_auth_decisions_total")}
    assert decisions["refused"] >= 1 and decisions["allowed"] >= 1
    # nginx's own counters, read on the readiness socket.
    [up] = samples(families, "nginx_up")
    assert up.value == 1
    [active] = samples(families, "nginx_connections_active")
    assert active.value >= 1          # the scrape's own connection to stub_status
    [requests] = samples(families, "nginx_http_requests_total")
    assert requests.value >= len(records)
    assert ALICE_KEY not in str(families)

    # Not through the public port.
    for path in ("/metrics", "/_lmgate/stub_status"):
        resp = httpx.get(gate.url + path, timeout=10)
        assert resp.status_code != 200 and b"Active connections" not in resp.content
        assert b"lmgate_calls_total" not in resp.content

    check_dashboard(families)


def test_a_metrics_port_of_its_own_answers_metrics_alone(own_gate, mock_upstream):
    port = free_port()
    gate = own_gate(LMGATE_METRICS__PORT=str(port))
    mock_upstream.reply("/v1/metrics-port/chat", body=json.dumps(CHAT).encode(), content_type="application/json")
    mark = gate.mark()
    assert httpx.post(gate.base("openai") + "/v1/metrics-port/chat", json={"model": "gpt-4o-mini"},
                      headers={"Authorization": f"Bearer {ALICE_KEY}"}, timeout=10).status_code == 200
    gate.new_records(mark, 1)
    url = f"http://127.0.0.1:{port}"
    resp = httpx.get(url + "/metrics", timeout=10)
    assert resp.status_code == 200
    own = list(text_string_to_metric_families(resp.text))
    for name in ("lmgate_calls_total", "lmgate_tokens_total"):
        assert samples(own, name) and samples(own, name) == samples(scrape(gate), name), name
    # A scraper let in there reaches nothing else of the sidecar.
    for path in ("/auth", "/policy/usage", "/readyz"):
        assert httpx.get(url + path, headers={"Authorization": f"Bearer {ALICE_KEY}"}, timeout=10).status_code == 404


def check_dashboard(families) -> None:
    """Every metric a query of the dashboard names is exported, with the labels it groups by."""
    labels: dict[str, set[str]] = {}
    for f in families:
        for s in f.samples:
            labels.setdefault(s.name, set()).update(s.labels)
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"]]
    assert len(exprs) > 20
    for expr in exprs:
        grouped = {g.strip() for m in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
                   for g in m.split(",")}
        bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\b(?:by|without)\s*\([^)]*\)|label_values\(|, *instance\)",
                      " ", expr)
        names = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", bare)) - PROMQL
        assert names, expr
        unknown = names - labels.keys()
        assert not unknown, f"{expr}: not exported: {sorted(unknown)}"
        have = set().union(*(labels[n] for n in names))
        assert grouped <= have, f"{expr}: no such labels: {sorted(grouped - have)}"
    # Its share of denied calls counts every refusal the report counts as denied (policies too).
    [ratio] = [p for p in dashboard["panels"] if p.get("title") == "Error and deny ratio"]
    denied = re.search(r'error_type=~"([^"]*)"', ratio["targets"][1]["expr"]).group(1)
    assert set(denied.split("|")) == DENIED
