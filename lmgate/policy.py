"""Per-key policies, enforced at /auth: expiry, disabled, providers, models, rpm, tpm, budgets.

The allow-list's policy columns (and the owners file's limits) are parsed by lmgate/allowlist.py.
Here:
- `decide` answers /auth for a key that has a policy (or whose owner has limits): a refusal
  word (records.POLICY_ERRORS) with a Retry-After, or a yes, which nginx may cache only when
  no later call can be answered differently (no rpm, no model in a Google path).
- `Counters` counts requests per minute (rpm, a sliding window of one-second buckets: counted at
  /auth, before the call) and, from the records as the pipeline writes them, tokens per minute
  (tpm) and spend per UTC day and month, priced with the report's prices (metrics.Metrics.spend).
  Only keys and owners with such limits are counted: one dict probe per record otherwise.
- At start, spend of this month is rebuilt from the stats files (`rebuild`, with DuckDB), before
  the spool reader starts; /auth answers meanwhile.
- With policy.redis_url the counters live in Redis instead (lmgate/policy_redis.py), shared by
  every gate that uses it.
"""

from __future__ import annotations

import calendar
import collections
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmgate.allowlist import AllowList, Entry, Limits
from lmgate.metrics import shape_tokens
from lmgate.usage import model_from_path

log = logging.getLogger("lmgate.policy")

WINDOW_SECONDS = 60
# Words /auth answers in X-LMGate-Policy besides records.POLICY_ERRORS: the model is in the body,
# which nginx must check (nginx/lmgate.js checkModel) against X-LMGate-Models.
CHECK_MODEL = "check_model"
# Providers whose model is in the path (checked here); the others name it in the JSON body.
MODEL_IN_PATH = frozenset({"google", "gemini"})


@dataclass(frozen=True, slots=True)
class Verdict:
    refusal: str | None = None   # a records.POLICY_ERRORS word, CHECK_MODEL, or None: a yes
    retry_after: int = 0         # seconds, with a 429
    cacheable: bool = True       # nginx may reuse a yes for auth.cache_seconds
    models_regex: str | None = None


YES = Verdict()


class Window:
    """Counts in one-second buckets over the last WINDOW_SECONDS (a sliding window)."""

    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        self.buckets: collections.deque[list[int]] = collections.deque()
        self.total = 0

    def count(self, second: int) -> int:
        buckets = self.buckets
        while buckets and buckets[0][0] <= second - WINDOW_SECONDS:
            self.total -= buckets.popleft()[1]
        return self.total

    def add(self, second: int, n: int) -> None:
        buckets = self.buckets
        if buckets and buckets[-1][0] == second:
            buckets[-1][1] += n
        else:
            buckets.append([second, n])
        self.total += n

    def retry_after(self, second: int, limit: int) -> int:
        """Seconds until the window's count is below `limit` again."""
        left = self.total
        for stamp, n in self.buckets:
            left -= n
            if left < limit:
                return max(1, stamp + WINDOW_SECONDS - second)
        return WINDOW_SECONDS


class Spend:
    """A key's or an owner's counted use: tokens in the last minute, USD today and this month,
    tokens this month (UTC)."""

    __slots__ = ("minute", "day", "usd_day", "month", "usd_month", "tokens_month")

    def __init__(self) -> None:
        self.minute = Window()
        self.day = ""
        self.usd_day = 0.0
        self.month = ""
        self.usd_month = 0.0
        self.tokens_month = 0

    def add(self, day: str, tokens: int, usd: float, second: int | None) -> None:
        if day > self.day:
            self.day, self.usd_day = day, 0.0
        if day[:7] > self.month:
            self.month, self.usd_month, self.tokens_month = day[:7], 0.0, 0
        if day == self.day:
            self.usd_day += usd
        if day[:7] == self.month:
            self.usd_month += usd
            self.tokens_month += tokens
        if second is not None:
            self.minute.add(second, tokens)

    def usage(self, now: float) -> dict[str, float]:
        today, month = _day(now), _day(now)[:7]
        second = int(now)
        return {"tokens_last_minute": self.minute.count(second),
                "usd_today": round(self.usd_day, 6) if self.day == today else 0.0,
                "usd_month": round(self.usd_month, 6) if self.month == month else 0.0,
                "tokens_month": self.tokens_month if self.month == month else 0}


def _day(now: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(now))


def seconds_to_next_day(now: float) -> int:
    return max(1, 86400 - int(now) % 86400)


def seconds_to_next_month(now: float) -> int:
    t = time.gmtime(now)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return max(1, calendar.timegm((year, month, 1, 0, 0, 0)) - int(now))


def over_spend(spend: Spend | dict | None, limits: Limits, now: float) -> tuple[str, int] | None:
    """The refusal for spent limits (tpm, budgets), or None. `spend` as Spend.usage() says."""
    if spend is None:
        return None
    use = spend.usage(now) if isinstance(spend, Spend) else spend
    if limits.budget_usd_day is not None and use["usd_today"] >= limits.budget_usd_day:
        return "budget_exceeded", seconds_to_next_day(now)
    if limits.budget_usd_month is not None and use["usd_month"] >= limits.budget_usd_month:
        return "budget_exceeded", seconds_to_next_month(now)
    if limits.budget_tokens_month is not None and use["tokens_month"] >= limits.budget_tokens_month:
        return "budget_exceeded", seconds_to_next_month(now)
    if limits.tpm is not None and use["tokens_last_minute"] >= limits.tpm:
        minute = spend.minute.retry_after(int(now), limits.tpm) if isinstance(spend, Spend) else 1
        return "rate_limited_gate", minute
    return None


def _subjects(entry: Entry, owner_limits: Limits | None) -> list[tuple[str, Limits]]:
    """The counted subjects of a call: ("k:<id>", the key's limits), ("o:<owner>", the owner's)."""
    subjects = []
    limits = entry.policy.limits if entry.policy is not None else None
    if limits is not None:
        subjects.append(("k:" + entry.id, limits))
    if owner_limits is not None:
        subjects.append(("o:" + entry.owner, owner_limits))
    return subjects


class Counters:
    """The counters of one sidecar, in memory."""

    shared = False

    def __init__(self) -> None:
        self.requests: dict[str, Window] = {}
        self.spends: dict[str, Spend] = {}
        # Subjects whose records are counted (tpm or a budget), from the allow-list in force.
        self.counted: frozenset[str] = frozenset()

    async def take(self, subjects: list[tuple[str, Limits]], now: float) -> int:
        """Count one request against every subject's rpm; 0 when it may pass (then counted), else
        the seconds until it may (then nothing is counted)."""
        second = int(now)
        windows = []
        for subject, limits in subjects:
            if limits.rpm is None:
                continue
            window = self.requests.get(subject)
            if window is None:
                window = self.requests[subject] = Window()
            if window.count(second) >= limits.rpm:
                return window.retry_after(second, limits.rpm) if limits.rpm else WINDOW_SECONDS
            windows.append(window)
        for window in windows:
            window.add(second, 1)
        return 0

    def spend_of(self, subject: str) -> Spend | dict | None:
        return self.spends.get(subject)

    async def requests_last_minute(self, subject: str, now: float) -> int:
        window = self.requests.get(subject)
        return window.count(int(now)) if window is not None else 0

    def add(self, subject: str, day: str, tokens: int, usd: float, second: int | None) -> None:
        spend = self.spends.get(subject)
        if spend is None:
            spend = self.spends[subject] = Spend()
        spend.add(day, tokens, usd, second)

    async def start(self) -> None:
        """Background work of a shared store (lmgate/policy_redis.py); none here."""

    async def close(self) -> None:
        pass


def counted_subjects(lists: AllowList) -> frozenset[str]:
    subjects = {"k:" + e.id for e in lists.with_policy if e.policy.limits is not None and e.policy.limits.counted}
    subjects.update("o:" + owner for owner, limits in lists.owners.items() if limits.counted)
    return frozenset(subjects)


class Enforcer:
    """Decides /auth for keys with a policy, and counts the records of counted keys and owners."""

    def __init__(self, counters: Counters, spend: Any, current: Any) -> None:
        self.counters = counters
        self.spend = spend  # record -> (tokens, usd): metrics.Metrics.spend, the report's prices
        self.current = current  # () -> the allow-list in force
        self._lists: AllowList | None = None
        self.ready = True   # False while spend is rebuilt from the stats files at start

    def watch(self, lists: AllowList) -> None:
        """The allow-list in force (called at each /auth of a policy key: cheap when unchanged)."""
        if lists is not self._lists:
            self._lists = lists
            self.counters.counted = counted_subjects(lists)

    async def decide(self, entry: Entry, owner_limits: Limits | None, uri: str, now: float) -> Verdict:
        policy = entry.policy
        cacheable = True
        models = None
        if policy is not None:
            if policy.disabled:
                return Verdict("policy_disabled")
            if policy.expires is not None and now >= policy.expires:
                return Verdict("policy_expired")
            path = uri.partition("?")[0]
            provider = path.split("/", 2)[1] if path.count("/") >= 2 else ""
            if policy.providers is not None and provider not in policy.providers:
                return Verdict("policy_provider")
            if policy.models_regex is not None:
                if provider in MODEL_IN_PATH:
                    model = model_from_path(path)
                    if model is None or not re.search(policy.models_regex, model):
                        return Verdict("policy_model")
                    cacheable = False  # another call of this key may name another model
                else:
                    models = policy.models_regex
        subjects = _subjects(entry, owner_limits)
        for subject, limits in subjects:
            if limits.counted:
                spent = over_spend(self.counters.spend_of(subject), limits, now)
                if spent is not None:
                    return Verdict(spent[0], spent[1])
        if any(limits.rpm is not None for _, limits in subjects):
            cacheable = False  # every call must be counted
            wait = await self.counters.take(subjects, now)
            if wait:
                return Verdict("rate_limited_gate", wait)
        if models is not None:
            return Verdict(CHECK_MODEL, cacheable=False, models_regex=models)
        return Verdict(cacheable=cacheable)

    def add(self, record: dict[str, Any]) -> None:
        """StatsWriter.on_add: count the record if its key or owner has counted limits."""
        lists = self.current()
        if lists is not self._lists:
            self.watch(lists)
        counted = self.counters.counted
        if not counted:
            return
        key = "k:" + (record["lmgate_id"] or "")
        owner = "o:" + (record["owner"] or "")
        if key not in counted and owner not in counted:
            return
        tokens, usd = self.spend(record)
        if not tokens and not usd:
            return
        second = int(time.time())
        day = record["timestamp"][:10]
        for subject in (key, owner):
            if subject in counted:
                self.counters.add(subject, day, tokens, usd, second)

    async def usage(self, lists: AllowList, now: float) -> dict[str, Any]:
        """Current use of every key with a policy and every owner with limits (`lmgate keys`)."""
        self.watch(lists)

        async def of(subject: str) -> dict[str, Any]:
            spend = self.counters.spend_of(subject)
            use = (spend.usage(now) if isinstance(spend, Spend) else spend) or Spend().usage(now)
            return {"requests_last_minute": await self.counters.requests_last_minute(subject, now), **use}

        keys = {e.id: await of("k:" + e.id) for e in lists.with_policy}
        owners = {owner: await of("o:" + owner) for owner in lists.owners}
        return {"keys": keys, "owners": owners, "shared": self.counters.shared,
                "rebuilt": self.ready}


def rebuild(subjects: frozenset[str], output_path: Path, metrics: Any,
            now: float) -> tuple[list[tuple[str, str, int, float]], int]:
    """This month's spend of the counted `subjects` in the stats files (the current one and its
    rotated files): (subject, day, tokens, usd) in day order, and how many records it summed. DuckDB sums the token
    counts per key, owner, model, day and long-context tier; each sum is then priced as metrics
    prices a record (the report's prices): prices are linear in the counts."""
    from lmgate.report.query import open_records, sql_string, ts_bound  # DuckDB: only when needed
    import datetime as dt

    ids = [s[2:] for s in subjects if s.startswith("k:")]
    owners = [s[2:] for s in subjects if s.startswith("o:")]
    if not ids and not owners:
        return [], 0
    month = dt.datetime(*time.gmtime(now)[:2], 1, tzinfo=dt.timezone.utc)
    thresholds = metrics.pricer.thresholds()
    prompt = ("CASE WHEN api_format = 'anthropic' THEN coalesce(input_tokens, 0) + "
              "coalesce(cache_read_tokens, 0) + coalesce(cache_write_tokens, 0) "
              "ELSE coalesce(input_tokens, 0) END")
    tier = " + ".join(f"({prompt} > {t})::INTEGER" for t in thresholds) or "0"

    def listed(values: list[str]) -> str:
        return "[" + ", ".join(sql_string(v) for v in values) + "]::VARCHAR[]"

    with open_records(output_path, since=ts_bound(month)) as records:
        records.con.execute("SET threads = 2")  # beside nginx: never every core
        rows = records.con.execute(f"""
            SELECT lmgate_id, owner, provider, api_format, model,
                   strftime(timestamp, '%Y-%m-%d') AS day, {tier} AS tier, count(*),
                   sum(input_tokens), sum(output_tokens), sum(cache_read_tokens),
                   sum(cache_write_tokens), sum(reasoning_tokens)
            FROM records
            WHERE (list_contains({listed(ids)}, lmgate_id) OR list_contains({listed(owners)}, owner))
              AND (input_tokens IS NOT NULL OR output_tokens IS NOT NULL)
            GROUP BY ALL ORDER BY day""").fetchall()
    summed = 0
    spends = []
    for key, owner, provider, fmt, model, day, k, n, inp, out, cr, cw, rsn in rows:
        record = {"provider": provider, "api_format": fmt, "model": model, "timestamp": day,
                  "input_tokens": int(inp or 0), "output_tokens": int(out or 0),
                  "cache_read_tokens": int(cr or 0), "cache_write_tokens": int(cw or 0),
                  "reasoning_tokens": int(rsn or 0)}
        tokens, _ = metrics.spend(record)
        shaped = list(shape_tokens(record))
        shaped[5] = thresholds[k - 1] + 1 if k else 0  # a prompt of the group's tier
        usd = metrics.cost(record, tuple(shaped)) or 0.0
        for subject in ("k:" + (key or ""), "o:" + (owner or "")):
            if subject in subjects:
                spends.append((subject, day, tokens, usd))
        summed += n
    return spends, summed
