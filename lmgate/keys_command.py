"""`lmgate keys`: every allow-listed key (masked), its id, owner and policy, and its current use
against each limit (last minute, today, this month), then the owners' limits.

Current use comes from the running sidecar (GET /policy/usage on the sidecar's port, which nginx
never exposes). When it does not answer, it comes from Redis with policy.redis_url (the use of
every gate sharing it), else today's and this month's spend come from the stats files (as the
sidecar rebuilds them at start) and the last minute's use is unknown: the output says which.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, TextIO

from lmgate.allowlist import (LIMIT_COLUMNS, SHA256_FORM, Entry, Limits, Policy, csv_rows, load_allowlist,
                              load_owners, read_file)
from lmgate.keys import mask_key
from lmgate.settings import Settings
from lmgate.writer import STDOUT

USAGE_PATH = "/policy/usage"
TIMEOUT_SECONDS = 2.0
# Use that each limit is compared with.
_USE_OF = {"rpm": "requests_last_minute", "tpm": "tokens_last_minute", "budget_usd_day": "usd_today",
           "budget_usd_month": "usd_month", "budget_tokens_month": "tokens_month"}


_FOOTERS = {"sidecar": "use from the sidecar", "redis": "use from Redis (every gate sharing it)",
            "stats files": "use from the stats files (last minute: unknown)"}


def add_arguments(parser) -> None:
    parser.add_argument("--format", choices=("table", "json"), default="table",
                        help="table (default) or json")


def _masks(path: Path) -> dict[str, str]:
    """id -> the key as shown: the last 6 characters, or the last 6 hex digits of a sha256: form.
    (The allow-list in memory holds only the keys' hashes.)"""
    columns: dict[str, int] = {}

    def check_header(header: list[str], line: int) -> None:
        columns.update(id=header.index("id"), api_key=header.index("api_key"))

    masks = {}
    for _, _, row in csv_rows(read_file(path, "allow-list"), str(path), check_header, "id,api_key,..."):
        key = row[columns["api_key"]].strip()
        masks[row[columns["id"]].strip()] = ("sha256:..." + key[-6:].lower() if SHA256_FORM.fullmatch(key)
                                             else mask_key(key))
    return masks


def _limits(limits: Limits | None) -> dict[str, Any]:
    return {c: getattr(limits, c) for c in LIMIT_COLUMNS if limits is not None and getattr(limits, c) is not None}


def _policy(policy: Policy | None) -> dict[str, Any]:
    if policy is None:
        return {}
    out: dict[str, Any] = {}
    if policy.expires is not None:
        out["expires"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(policy.expires))
    if policy.disabled:
        out["disabled"] = True
    if policy.providers is not None:
        out["providers"] = sorted(policy.providers)
    if policy.models is not None:
        out["models"] = list(policy.models)
    out.update(_limits(policy.limits))
    return out


def _from_sidecar(settings: Settings) -> dict[str, Any] | None:
    url = f"http://{settings.server.reachable_host}:{settings.server.port}{USAGE_PATH}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


def _subjects(entries: list[Entry], owners: dict[str, Limits]) -> list[str]:
    return ["k:" + e.id for e in entries] + ["o:" + o for o in owners]


def _from_redis(settings: Settings, entries: list[Entry], owners: dict[str, Limits],
                err: TextIO) -> dict[str, Any] | None:
    import redis
    from lmgate.policy_redis import read_usage, shown
    try:
        use = read_usage(settings.policy.redis_url, _subjects(entries, owners), time.time(), TIMEOUT_SECONDS)
    except redis.RedisError as exc:
        err.write(f"lmgate: Redis at {shown(settings.policy.redis_url)} does not answer either ({exc})\n")
        return None
    return {"keys": {e.id: use["k:" + e.id] for e in entries}, "owners": {o: use["o:" + o] for o in owners}}


def _from_stats(settings: Settings, entries: list[Entry], owners: dict[str, Limits]) -> dict[str, Any]:
    from lmgate.metrics import Metrics
    from lmgate.policy import Spend, rebuild
    subjects = frozenset(_subjects(entries, owners))
    now = time.time()
    spends: dict[str, Spend] = {}
    if settings.stats.output_path != STDOUT:
        rows, _ = rebuild(subjects, settings.stats.output_path, Metrics(prices_path=settings.report.prices_path), now)
        for subject, day, tokens, usd in rows:
            spends.setdefault(subject, Spend()).add(day, tokens, usd, None)

    def of(subject: str) -> dict[str, Any]:
        use = (spends.get(subject) or Spend()).usage(now)
        use["requests_last_minute"] = use["tokens_last_minute"] = None  # only the sidecar knows
        return use

    return {"keys": {e.id: of("k:" + e.id) for e in entries}, "owners": {o: of("o:" + o) for o in owners}}


def run(settings: Settings, fmt: str, out: TextIO, err: TextIO) -> int:
    lists = load_allowlist(settings.auth.allowlist_path)
    owners = load_owners(Path(settings.auth.owners_path)) if settings.auth.owners_path else {}
    entries = sorted(lists.entries(), key=lambda e: e.line)
    masks = _masks(settings.auth.allowlist_path)
    usage = _from_sidecar(settings)
    source = "sidecar"
    if usage is None:
        err.write(f"lmgate: the sidecar does not answer at {settings.server.reachable_host}:{settings.server.port} "
                  f"(not running?)\n")
        if settings.policy.redis_url:
            usage = _from_redis(settings, entries, owners, err)
            source = "redis"
    if usage is None:
        source = "stats files"
        err.write(f"lmgate: today's and this month's use come from the stats files "
                  f"({settings.stats.output_path}); the last minute's is unknown\n")
        usage = _from_stats(settings, entries, owners)
    keys = []
    for e in entries:
        keys.append({"id": e.id, "key": masks.get(e.id, "..."), "owner": e.owner, "policy": _policy(e.policy),
                     "use": usage["keys"].get(e.id) if e.policy is not None else None})
    owner_rows = [{"owner": o, "limits": _limits(limits), "use": usage["owners"].get(o)}
                  for o, limits in sorted(owners.items())]
    if fmt == "json":
        json.dump({"use_from": source, "keys": keys, "owners": owner_rows}, out, indent=2)
        out.write("\n")
        return 0
    _table(keys, owner_rows, source, out)
    return 0


def _money(value: Any) -> str:
    return f"${value:,.2f}"


def _against(limits: dict[str, Any], use: dict[str, Any] | None) -> str:
    """`rpm 3/60  usd_today $1.20/$5.00 ...`: each limit with the use it is compared with."""
    parts = []
    for column in LIMIT_COLUMNS:
        if column not in limits:
            continue
        value = (use or {}).get(_USE_OF[column])
        money = column.startswith("budget_usd")
        shown = "?" if value is None else (_money(value) if money else f"{value:,}")
        limit = _money(limits[column]) if money else f"{limits[column]:,}"
        parts.append(f"{column} {shown}/{limit}")
    return "  ".join(parts)


def _table(keys: list[dict], owners: list[dict], source: str, out: TextIO) -> None:
    rows = [("ID", "KEY", "OWNER", "POLICY", "USE / LIMIT")]
    for k in keys:
        static = {c: v for c, v in k["policy"].items() if c not in LIMIT_COLUMNS}
        policy = " ".join(f"{c}={'|'.join(v) if isinstance(v, list) else v}" for c, v in static.items())
        rows.append((k["id"], k["key"], k["owner"], policy or "-", _against(k["policy"], k["use"]) or "-"))
    _print(rows, out)
    if owners:
        out.write("\n")
        _print([("OWNER", "USE / LIMIT (sum over the owner's keys)")]
               + [(o["owner"], _against(o["limits"], o["use"]) or "-") for o in owners], out)
    out.write("\n" + _FOOTERS[source] + "\n")


def _print(rows: list[tuple], out: TextIO) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")
