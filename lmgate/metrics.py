"""The sidecar's Prometheus metrics (GET /metrics, text format, with prometheus-client).

Per call, from every record the stats writer takes (spool lines and the WebSocket relay's alike):
`StatsWriter.on_add` is `Metrics.add`, which keeps the record; `drain` (each second, and before a
scrape) groups them by label tuple and adds each group's sums into one list of numbers per label
tuple (`observe` does the same for one record: the rare groups whose records are priced apart);
the collector turns those into Prometheus families at scrape time. Sums by builtins and plain
lists, not a prometheus-client child per counter: docs/metrics.md, "What it costs".

Tokens have the report's meaning (docs/report.md, "Tokens mean the same for every provider"), and
cost is the report's price at the call's UTC day and long-context tier, looked up once per
(provider, format, model, day, tier). Pipeline values and nginx's stub_status are read at scrape
time.
"""

from __future__ import annotations

import asyncio
import bisect
import datetime as dt
import itertools
import logging
import operator
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)

from lmgate.refusals import FOLDED
from lmgate.report.output import DENIED  # refused by the gate: no upstream duration
from lmgate.report.prices import Pricer, PriceError, load_prices

log = logging.getLogger("lmgate.sidecar")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The OpenTelemetry GenAI semantic conventions' buckets for gen_ai.client.operation.duration (s).
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92)
AUTH_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
TOKEN_KINDS = ("input", "output", "cache_read", "cache_write", "reasoning")
STUB_STATUS_TIMEOUT_SECONDS = 1.0
_STUB = re.compile(rb"Active connections:\s*(\d+)\s+server accepts handled requests\s+(\d+)\s+(\d+)\s+"
                   rb"(\d+)\s+Reading:\s*(\d+)\s+Writing:\s*(\d+)\s+Waiting:\s*(\d+)")

# A slot's layout: calls, the five token kinds, cost, unpriced calls, duration count and sum, then
# one count per duration bucket (not cumulative; +Inf last).
_CALLS, _TOKENS, _COST, _UNPRICED, _DCOUNT, _DSUM, _BUCKETS = 0, 1, 6, 7, 8, 9, 10
DURATION_BUCKETS_MS = tuple(round(bound * 1000, 6) for bound in DURATION_BUCKETS)
_KEY = operator.itemgetter("provider", "model", "status", "error_type", "api_format")
_KEY_WHO = operator.itemgetter("provider", "model", "status", "error_type", "api_format", "owner",
                               "lmgate_id")
TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
                "reasoning_tokens")
_COLUMNS = tuple(operator.itemgetter(name) for name in ("duration_ms", *TOKEN_FIELDS, "timestamp"))


class Metrics:
    """The registry of one sidecar app, and the per-record hook."""

    def __init__(self, per_key_labels: bool = False, prices_path: Path | None = None) -> None:
        self.per_key_labels = per_key_labels
        self.registry = CollectorRegistry(auto_describe=True)
        self.slots: dict[tuple, list] = {}
        self._prices: dict[tuple, Any] = {}
        overrides = None
        if prices_path is not None:
            try:
                overrides = load_prices(Path(prices_path))
            except PriceError as exc:   # the gate runs on; `lmgate report` names the same problem
                log.error("metrics: %s; cost is priced by genai-prices alone", exc)
        self.pricer = Pricer(overrides)
        self._thresholds = self.pricer.thresholds()
        self._lowest = self._thresholds[0] if self._thresholds else float("inf")
        self.folded_calls = 0
        self.unavailable = 0
        self.newest: dict[str, Any] | None = None  # the last record, and when it was added
        self.newest_at = 0.0
        # Records wait here and are counted in batches (drain): one record at a time, between
        # nginx's turns on a shared core, cost ~4 us each; in a batch, grouped, well under 1 us.
        self.pending: list[dict[str, Any]] = []
        self.pending_since = 0.0
        self._key = _KEY_WHO if per_key_labels else _KEY
        self.nginx: tuple[int, ...] | None = None
        self.auth_seconds = Buckets(AUTH_BUCKETS)
        self.allowed = 0   # /auth answers
        self.readiness_problems = 0   # set by the /metrics handler from /readyz's answer
        self.refused = 0
        self.pipeline: Callable[[], dict[str, float]] = dict
        self.registry.register(_Collector(self))

    def add(self, record: dict[str, Any]) -> None:
        """StatsWriter.on_add: keep the record for the next drain."""
        if not self.pending:
            self.pending_since = time.time()
        self.pending.append(record)

    def drain(self) -> None:
        """Count the records added since the last drain: grouped by label tuple, each group summed
        by builtins (sum, sorted, bisect) rather than record by record in Python."""
        pending = self.pending
        if not pending:
            return
        self.pending = []
        groups: dict[tuple, list] = {}
        for key, record in zip(map(self._key, pending), pending, strict=True):
            group = groups.get(key)
            if group is None:
                groups[key] = [record]
            else:
                group.append(record)
        for key, group in groups.items():
            self._observe_group(key, group)
        self.newest = pending[-1]
        self.newest_at = self.pending_since

    def _slot(self, key: tuple) -> list:
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = [0] * (_BUCKETS + len(DURATION_BUCKETS) + 1)
            slot[_COST] = 0.0
            slot[_DSUM] = 0.0
        return slot

    def _observe_group(self, group_key: tuple, group: list[dict[str, Any]]) -> None:
        """What observe does for each record of the group (same provider, model, status, error
        and format), with the same result."""
        provider, model, status, error, fmt, *who = group_key
        durations, inp, out, cr, cw, rsn, stamps = (list(map(column, group)) for column in _COLUMNS)
        no_tokens = list(zip(inp, out, strict=True)).count((None, None))
        day = min(stamps)[:10]
        top = max(filter(None, inp), default=0)
        if fmt == "anthropic":
            top += max(filter(None, cr), default=0) + max(filter(None, cw), default=0)
        # Rare groups go record by record: refusals (folded), and prices that differ within the
        # group (a long-context tier, two days).
        if error in FOLDED or error in DENIED or top > self._lowest or max(stamps)[:10] != day:
            for record in group:
                self.observe(record)
            return
        slot = self._slot((provider, model, (status or 0) // 100, error, fmt, *who))
        n = len(group)
        slot[_CALLS] += n
        slot[_DCOUNT] += n
        slot[_DSUM] += sum(durations) / 1000
        ordered = sorted(durations)
        below = 0
        for i, bound in enumerate(DURATION_BUCKETS_MS):
            upto = bisect.bisect_right(ordered, bound)
            slot[_BUCKETS + i] += upto - below
            below = upto
        slot[-1] += n - below
        if no_tokens == n:
            return
        if no_tokens:    # a record without input and output counts no tokens at all
            usage = [i is not None or o is not None for i, o in zip(inp, out, strict=True)]
            cr, cw, rsn = (itertools.compress(column, usage) for column in (cr, cw, rsn))
        # The shape is linear: the shape of the sums is the sum of the shapes.
        sums = dict(zip(TOKEN_FIELDS, (sum(filter(None, c)) for c in (inp, out, cr, cw, rsn)), strict=True))
        inp, out, cr, cw, rsn, _ = shape_tokens({**sums, "api_format": fmt})
        slot[_TOKENS] += inp
        slot[_TOKENS + 1] += out
        slot[_TOKENS + 2] += cr
        slot[_TOKENS + 3] += cw
        slot[_TOKENS + 4] += rsn
        units = self._units((provider, fmt, model, day, 0))
        if units is None:
            slot[_UNPRICED] += n - no_tokens
        else:
            slot[_COST] += (inp * units.input + cr * units.cache_read + cw * units.cache_write
                            + out * units.output)

    def _units(self, price_key: tuple) -> Any:
        units = self._prices.get(price_key, False)
        if units is False:
            units = self._prices[price_key] = self._price(price_key)
        return units

    def observe(self, record: dict[str, Any]) -> None:
        """Count one record (StatsWriter.on_add)."""
        error = record["error_type"]
        status = record["status"] or 0
        if self.per_key_labels:
            key = (record["provider"], record["model"], status // 100, error, record["api_format"],
                   record["owner"], record["lmgate_id"])
        else:
            key = (record["provider"], record["model"], status // 100, error, record["api_format"])
        slot = self._slot(key)
        folded = record.get("folded_calls")
        if folded:
            slot[_CALLS] += folded
            self.folded_calls += folded
        else:
            slot[_CALLS] += 1
        if error in DENIED:
            if error == "gate_unavailable":
                self.unavailable += 1
            return
        seconds = record["duration_ms"] / 1000
        slot[_DCOUNT] += 1
        slot[_DSUM] += seconds
        slot[_BUCKETS + bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        shaped = shape_tokens(record)
        if shaped is None:
            return
        inp, out, cr, cw, rsn, prompt = shaped
        slot[_TOKENS] += inp
        slot[_TOKENS + 1] += out
        slot[_TOKENS + 2] += cr
        slot[_TOKENS + 3] += cw
        slot[_TOKENS + 4] += rsn
        cost = self.cost(record, shaped)
        if cost is None:
            slot[_UNPRICED] += 1
        else:
            slot[_COST] += cost

    def cost(self, record: dict[str, Any], shaped: tuple) -> float | None:
        """USD at the report's price for the call's day and long-context tier; None: unpriced."""
        inp, out, cr, cw, _, prompt = shaped
        # How many long-context thresholds the prompt exceeds (most calls: none).
        tier = bisect.bisect_left(self._thresholds, prompt) if prompt > self._lowest else 0
        price_key = (record["provider"], record["api_format"], record["model"], record["timestamp"][:10], tier)
        units = self._units(price_key)
        if units is None:
            return None
        return inp * units.input + cr * units.cache_read + cw * units.cache_write + out * units.output

    def spend(self, record: dict[str, Any]) -> tuple[int, float]:
        """A record's tokens (prompt with cache reads and writes, plus output with reasoning) and
        cost in USD (0 when unpriced), at the report's prices: what policies count."""
        shaped = shape_tokens(record)
        if shaped is None:
            return 0, 0.0
        return shaped[5] + shaped[1], self.cost(record, shaped) or 0.0

    def _price(self, price_key: tuple) -> Any:
        provider, fmt, model, day, tier = price_key
        try:
            epoch = bisect.bisect_right(self.pricer.change_dates(), dt.date.fromisoformat(day))
            return self.pricer.lookup(provider, fmt, model, epoch, tier)
        except Exception:  # a price that cannot be found is unpriced, never a lost record
            log.exception("metrics: no price for %s %s", provider, model)
            return None

    async def scrape_nginx(self, socket: Path, path: str) -> None:
        """Read nginx's stub_status on the readiness socket; None when nginx does not answer."""
        self.nginx = None
        try:
            connector = aiohttp.UnixConnector(path=str(socket))
            timeout = aiohttp.ClientTimeout(total=STUB_STATUS_TIMEOUT_SECONDS)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                async with session.get(f"http://lmgate{path}") as resp:
                    body = await resp.read() if resp.status == 200 else b""
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            return
        match = _STUB.search(body)
        if match:
            self.nginx = tuple(int(v) for v in match.groups())

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def shape_tokens(record: dict[str, Any]) -> tuple[int, int, int, int, int, int] | None:
    """The report's token shape (In without cache reads, Out with reasoning: docs/report.md) and
    the prompt's size, or None when the record has no counts."""
    inp = record["input_tokens"]
    out = record["output_tokens"]
    if inp is None and out is None:
        return None
    inp = inp or 0
    out = out or 0
    cr = record["cache_read_tokens"] or 0
    cw = record["cache_write_tokens"] or 0
    rsn = record["reasoning_tokens"] or 0
    if record["api_format"] == "anthropic":
        prompt = inp + cr + cw
    else:
        prompt = inp
        inp -= cr
        cw = 0
        if record["api_format"] == "google":
            out += rsn
    return inp, out, cr, cw, rsn, prompt


def _epoch(timestamp: str) -> float:
    return dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


class Buckets:
    """A histogram's counts: a bisect and two additions per observation, against ~1.5 us for a
    prometheus-client Histogram (a lock and a child lookup) on every /auth answer."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)   # not cumulative; +Inf last
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def family(self, name: str, text: str) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, text)
        family.add_metric([], cumulative(self.bounds, self.counts), self.total)
        return family


def cumulative(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, int]]:
    """Per-bucket counts (+Inf last) as Prometheus's cumulative (le, count) pairs."""
    buckets, running = [], 0
    for bound, n in zip((*bounds, float("inf")), counts, strict=True):
        running += n
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return buckets


class _Collector:
    """Families built at scrape time from the slots, the pipeline's values and stub_status."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self):
        m = self.m
        extra = ["owner", "lmgate_id"] if m.per_key_labels else []
        calls = CounterMetricFamily("lmgate_calls", "Calls recorded, by provider, model, HTTP "
                                    "status class and error_type (empty: none)",
                                    labels=["provider", "model", "status_class", "error_type", *extra])
        tokens = CounterMetricFamily("lmgate_tokens", "Tokens by kind, as the report counts them "
                                     "(input excludes cache reads; output includes reasoning)",
                                     labels=["provider", "model", "kind", *extra])
        cost = CounterMetricFamily("lmgate_cost_usd", "Cost in US dollars at the report's prices",
                                   labels=["provider", "model", *extra])
        unpriced = CounterMetricFamily("lmgate_unpriced_calls", "Calls with tokens but no known price",
                                       labels=["provider", "model", *extra])
        duration = HistogramMetricFamily(
            "gen_ai_client_operation_duration_seconds",
            "Upstream call duration (from the records; calls the gate refused excluded)",
            labels=["provider", "model"])
        # Label values: the internal keys also carry api_format, which no label shows.
        merged: dict[tuple, list] = {}
        hist: dict[tuple, list] = {}
        for key, slot in list(m.slots.items()):
            provider, model, cls, error, _fmt, *who = key
            base = (provider or "", model or "")
            who = tuple(v or "" for v in who)
            label = (*base, f"{cls}xx" if cls else "none", error or "", *who)
            into = merged.setdefault(label, [0] * _DCOUNT)
            for i in range(_DCOUNT):
                into[i] += slot[i]
            h = hist.setdefault(base, [0] * (len(slot) - _DCOUNT))
            for i in range(_DCOUNT, len(slot)):
                h[i - _DCOUNT] += slot[i]
        per_model: dict[tuple, list] = {}
        for label, values in merged.items():
            calls.add_metric(list(label), values[_CALLS])
            key = (label[0], label[1], *label[4:])
            into = per_model.setdefault(key, [0] * _DCOUNT)
            for i in range(_DCOUNT):
                into[i] += values[i]
        for key, values in per_model.items():
            for i, kind in enumerate(TOKEN_KINDS):
                tokens.add_metric([key[0], key[1], kind, *key[2:]], values[_TOKENS + i])
            cost.add_metric(list(key), values[_COST])
            unpriced.add_metric(list(key), values[_UNPRICED])
        for base, h in hist.items():
            if not h[0]:      # only refused calls: no upstream duration
                continue
            duration.add_metric(list(base), cumulative(DURATION_BUCKETS, h[2:]), h[1])
        yield from (calls, tokens, cost, unpriced, duration)
        yield m.auth_seconds.family("lmgate_auth_duration_seconds",
                                    "Time the sidecar took to answer nginx's /auth subrequests")
        decisions = CounterMetricFamily("lmgate_auth_decisions", "Auth decisions: /auth answers "
                                        "(allowed, refused; nginx caches a yes for auth.cache_seconds) "
                                        "and calls nginx refused because the sidecar did not answer "
                                        "(unavailable)", labels=["decision"])
        decisions.add_metric(["allowed"], m.allowed)
        decisions.add_metric(["refused"], m.refused)
        decisions.add_metric(["unavailable"], m.unavailable)
        yield decisions
        yield CounterMetricFamily("lmgate_refusals_folded_calls", "Refused calls folded into one "
                                  "record per client address and window (SECURITY.md)",
                                  value=m.folded_calls)
        lag = GaugeMetricFamily("lmgate_records_lag_seconds",
                                "How long after its call ended the newest record was recorded")
        newest = GaugeMetricFamily("lmgate_newest_record_end_timestamp_seconds",
                                   "When the newest record's call ended (Unix time)")
        if m.newest is not None:
            try:
                end = _epoch(m.newest["timestamp"]) + m.newest["duration_ms"] / 1000
                lag.add_metric([], max(m.newest_at - end, 0.0))
                newest.add_metric([], end)
            except ValueError:
                pass
        yield lag
        yield newest
        values = m.pipeline()
        for name, (kind, text) in PIPELINE.items():
            value = values.get(name)
            if value is None:
                continue
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name.removesuffix("_total") if kind == "counter" else name, text, value=value)
        yield GaugeMetricFamily("nginx_up", "Whether nginx's stub_status answered this scrape",
                                value=0 if m.nginx is None else 1)
        if m.nginx is not None:
            active, accepted, handled, requests, reading, writing, waiting = m.nginx
            yield GaugeMetricFamily("nginx_connections_active", "Active client connections", value=active)
            yield GaugeMetricFamily("nginx_connections_reading", "Connections reading the request",
                                    value=reading)
            yield GaugeMetricFamily("nginx_connections_writing", "Connections writing the answer",
                                    value=writing)
            yield GaugeMetricFamily("nginx_connections_waiting", "Idle keepalive connections",
                                    value=waiting)
            yield CounterMetricFamily("nginx_connections_accepted", "Client connections accepted",
                                      value=accepted)
            yield CounterMetricFamily("nginx_connections_handled", "Client connections handled",
                                      value=handled)
            yield CounterMetricFamily("nginx_http_requests", "Client requests", value=requests)


# Values the app reads at scrape time (app.py's _pipeline): name -> (type, help).
PIPELINE = {
    "lmgate_spool_backlog_bytes": ("gauge", "Spool bytes nginx wrote that the sidecar has not read"),
    "lmgate_spool_lines_read_total": ("counter", "Spool lines read"),
    "lmgate_spool_bad_lines_total": ("counter", "Spool lines that were not valid"),
    "lmgate_records_buffered": ("gauge", "Records waiting in memory for the stats file"),
    "lmgate_records_written_total": ("counter", "Records written to the stats file"),
    "lmgate_records_dropped_total": ("counter", "Records dropped while the disk refused writes"),
    "lmgate_stats_flushes_total": ("counter", "Writes of buffered records to the stats file"),
    "lmgate_stats_rotations_total": ("counter", "Rotations of the stats file"),
    "lmgate_stats_write_errors_total": ("counter", "Writes of the stats file the disk refused"),
    "lmgate_allowlist_keys": ("gauge", "Keys on the allow-list in force"),
    "lmgate_allowlist_reloads_total": ("counter", "Allow-list reloads put in force"),
    "lmgate_allowlist_reload_errors_total": ("counter", "Allow-list reloads refused (bad file)"),
    "lmgate_allowlist_last_reload_failed": ("gauge", "1 while the last reload was refused (the "
                                                     "previous list stays in force), else 0"),
    "lmgate_allowlist_loaded_timestamp_seconds": ("gauge", "When the list in force was loaded"),
    "lmgate_readiness_problems": ("gauge", "Problems /readyz reports (0: ready)"),
}
