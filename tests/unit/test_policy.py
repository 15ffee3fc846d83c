"""lmgate.policy: decisions for keys with a policy, the rpm window, spend from records, and the
rebuild of this month's spend from the stats files at start."""

from __future__ import annotations

import asyncio
import calendar
import time

import orjson
import pytest

from lmgate.allowlist import parse_allowlist, parse_owners
from lmgate.metrics import Metrics
from lmgate.policy import (CHECK_MODEL, Counters, Enforcer, Window, rebuild, seconds_to_next_day,
                           seconds_to_next_month)

pytestmark = pytest.mark.unit

KEY = "sk-alice-0123456789abcdef"
HEADER = "id,api_key,owner,added,expires,disabled,providers,models,rpm,tpm,budget_usd_day,budget_usd_month,budget_tokens_month\n"
NOW = calendar.timegm((2026, 12, 5, 12, 0, 0))


def enforcer_for(row: str, owners: str | None = None) -> tuple[Enforcer, object]:
    lists = parse_allowlist((HEADER + f"alice,{KEY},a@x,2026,{row}\n").encode(), "keys.csv")
    if owners:
        lists.owners = parse_owners(owners.encode(), "owners.csv")
    metrics = Metrics()
    enforcer = Enforcer(Counters(), metrics.spend, lambda: lists)
    enforcer.watch(lists)
    return enforcer, lists


def decide(enforcer, lists, uri: str, now: float = NOW):
    entry = lists.lookup(KEY)
    return asyncio.run(enforcer.decide(entry, lists.owners.get(entry.owner), uri, now))


@pytest.mark.parametrize("row, uri, refusal, cacheable", [
    (",true,,,,,,,", "/openai/v1/chat/completions", "policy_disabled", True),
    ("2026-12-05,,,,,,,,", "/openai/v1/chat/completions", "policy_expired", True),
    ("2026-12-06,,,,,,,,", "/openai/v1/chat/completions", None, True),
    (",,anthropic|gemini,,,,,,", "/openai/v1/chat/completions", "policy_provider", True),
    (",,anthropic|gemini,,,,,,", "/gemini/v1beta/models/x:generateContent?key=k", None, True),
    (",,,gemini-2.5-*,,,,,", "/gemini/v1beta/models/gemini-2.5-flash:generateContent", None, False),
    (",,,gemini-2.5-*,,,,,", "/gemini/v1beta/models/gemini-1.5-pro:generateContent", "policy_model", True),
    (",,,gemini-2.5-*,,,,,", "/gemini/v1beta/models", "policy_model", True),
    (",,,gpt-4o-mini*,,,,,", "/openai/v1/chat/completions", CHECK_MODEL, False),
    (",,,,5,,,,", "/openai/v1/chat/completions", None, False),
    (",,,,,1000,,,", "/openai/v1/chat/completions", None, True),
])
def test_static_decisions(row, uri, refusal, cacheable):
    enforcer, lists = enforcer_for(row)
    verdict = decide(enforcer, lists, uri)
    assert verdict.refusal == refusal
    if refusal is None:
        assert verdict.cacheable is cacheable
    if refusal == CHECK_MODEL:
        assert verdict.models_regex == r"^(?:gpt\-4o\-mini[\s\S]*)$"


def test_rpm_counts_allowed_calls_in_a_sliding_minute():
    enforcer, lists = enforcer_for(",,,,3,,,,")
    uri = "/openai/v1/chat/completions"
    assert [decide(enforcer, lists, uri, NOW + i).refusal for i in range(5)] == [
        None, None, None, "rate_limited_gate", "rate_limited_gate"]
    refused = decide(enforcer, lists, uri, NOW + 10)
    assert refused.refusal == "rate_limited_gate" and refused.retry_after == 50  # the first call's second leaves
    assert decide(enforcer, lists, uri, NOW + 60).refusal is None
    assert decide(enforcer, lists, uri, NOW + 60).refusal == "rate_limited_gate"


def test_owner_rpm_is_the_sum_over_the_owners_keys():
    lists = parse_allowlist((HEADER + f"alice,{KEY},team,2026,,,,,,,,,\nbob,sk-bob-0123456789abcdef,team,2026,,,,,,,,,\n")
                            .encode(), "k.csv")
    lists.owners = parse_owners(b"owner,rpm\nteam,2\n", "o.csv")
    enforcer = Enforcer(Counters(), Metrics().spend, lambda: lists)
    out = []
    for key in (KEY, "sk-bob-0123456789abcdef", KEY):
        entry = lists.lookup(key)
        out.append(asyncio.run(enforcer.decide(entry, lists.owners["team"], "/openai/v1/x", NOW)).refusal)
    assert out == [None, None, "rate_limited_gate"]


def test_window_expires_old_buckets():
    w = Window()
    w.add(100, 2)
    w.add(130, 1)
    assert w.count(159) == 3 and w.count(160) == 1 and w.count(190) == 0


def record(ts: str, key: str = "alice", owner: str = "a@x", inp: int = 1000, out: int = 500,
           model: str = "gpt-4o-mini-2024-07-18", error: str | None = None) -> dict:
    return {"timestamp": ts, "request_id": f"r-{ts}-{inp}", "lmgate_id": key, "owner": owner,
            "provider": "openai", "api_format": "openai", "method": "POST",
            "endpoint": "/openai/v1/chat/completions", "model": model, "stream": False, "status": 200,
            "input_tokens": inp, "output_tokens": out, "cache_read_tokens": 200, "cache_write_tokens": None,
            "reasoning_tokens": 0, "total_tokens": inp + out, "duration_ms": 5.0, "response_bytes": 100,
            "masked_key": "...abcdef", "error_type": error}


def test_budget_from_records_refuses_until_the_next_day():
    enforcer, lists = enforcer_for(",,,,,,0.001,,")
    uri = "/openai/v1/chat/completions"
    assert decide(enforcer, lists, uri).refusal is None
    enforcer.add(record("2026-12-05T11:59:00.000Z", inp=3000, out=1000))
    verdict = decide(enforcer, lists, uri)
    assert verdict.refusal == "budget_exceeded"
    assert verdict.retry_after == seconds_to_next_day(NOW) == 12 * 3600
    # The next day the budget is fresh.
    assert decide(enforcer, lists, uri, NOW + 12 * 3600).refusal is None


def test_tokens_month_budget_and_tpm():
    enforcer, lists = enforcer_for(",,,,,,,,1500")
    enforcer.add(record("2026-12-05T11:00:00.000Z", inp=1000, out=499))
    assert decide(enforcer, lists, "/openai/v1/x").refusal is None
    enforcer.add(record("2026-12-05T11:00:01.000Z", inp=1, out=0))
    verdict = decide(enforcer, lists, "/openai/v1/x")
    assert verdict.refusal == "budget_exceeded" and verdict.retry_after == seconds_to_next_month(NOW)
    tpm, lists = enforcer_for(",,,,,100,,,")
    tpm.add(record("2026-12-05T11:00:00.000Z", inp=60, out=40))
    assert decide(tpm, lists, "/openai/v1/x", time.time()).refusal == "rate_limited_gate"
    assert decide(tpm, lists, "/openai/v1/x", time.time() + 61).refusal is None


def test_records_of_other_keys_are_not_counted():
    enforcer, lists = enforcer_for(",,,,,,0.001,,")
    enforcer.add(record("2026-12-05T11:59:00.000Z", key="bob", owner="b@x", inp=10**6))
    assert enforcer.counters.spends == {}


def test_rebuild_from_the_stats_files_equals_counting_the_records_live(tmp_path):
    metrics = Metrics()
    stats = tmp_path / "stats.jsonl"
    rotated = tmp_path / "stats.20261203T000000Z.jsonl"
    records = [record("2026-11-30T23:00:00.000Z", inp=10**6),  # last month: not counted
               record("2026-12-01T10:00:00.000Z", inp=5000, out=100),
               record("2026-12-04T10:00:00.000Z", owner="team", inp=300_000, out=2000, model="gemini-2.5-pro"),
               record("2026-12-05T10:00:00.000Z", key="bob", owner="team", inp=7000, out=7),
               record("2026-12-05T11:00:00.000Z", inp=0, out=0, error="forbidden"),
               record("2026-12-05T11:30:00.000Z", key="carol", owner="c@x", inp=999)]
    records[2]["provider"] = records[2]["api_format"] = "google"
    records[4]["input_tokens"] = records[4]["output_tokens"] = None
    rotated.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records[:3]))
    stats.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records[3:]))
    subjects = frozenset({"k:alice", "o:team"})
    spends, summed = rebuild(subjects, stats, metrics, NOW)
    assert summed == 3  # alice's two of this month and bob's for the team; not last month's, not carol's
    rebuilt = Counters()
    for subject, day, tokens, usd in spends:
        rebuilt.add(subject, day, tokens, usd, None)
    live = Counters()
    live.counted = subjects
    enforcer = Enforcer(live, metrics.spend, lambda: None)
    enforcer._lists = None
    enforcer.current = lambda: enforcer._lists
    for r in records[1:]:
        if r["timestamp"] >= "2026-12":
            enforcer.add(r)
    for subject in subjects:
        a, b = rebuilt.spends[subject].usage(NOW), live.spends[subject].usage(NOW)
        assert a["tokens_month"] == b["tokens_month"] > 0
        assert a["usd_month"] == pytest.approx(b["usd_month"]) and a["usd_month"] > 0
        assert a["usd_today"] == pytest.approx(b["usd_today"])
