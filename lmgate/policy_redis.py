"""Per-key policy counters in Redis (policy.redis_url): several gates behind a load balancer share
them. The same interface as policy.Counters.

- rpm: one hash per key or owner, a field per second (the same sliding window of one-second
  buckets as in memory), checked and counted for all of a call's subjects in one Lua script: one
  round trip per call, atomic across gates.
- Spend (tpm and budgets): each sidecar adds its records' tokens and USD to per-day and per-month
  keys every REFRESH_SECONDS in one pipeline, and in the same round trip reads back the totals of
  every counted key and owner, which /auth then checks without waiting on Redis. So a gate sees
  another's spend within about REFRESH_SECONDS.
- Redis unreachable: the limits fail open to this gate's own counting. rpm is counted by this
  gate alone (each replica enforces the full rpm), budgets are checked against the last totals
  read, and this gate's spend waits in memory until Redis is back. Auth and the static policies
  (expires, disabled, providers, models) never depend on Redis. The log says when Redis is lost
  and when it is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import urlsplit

from lmgate.allowlist import Limits
from lmgate.policy import WINDOW_SECONDS, Counters

log = logging.getLogger("lmgate.policy")

REFRESH_SECONDS = 0.5
# Seconds a Redis command may take before the gate counts on its own (an /auth waits this long).
TIMEOUT_SECONDS = 0.25
# Seconds between two log lines while Redis stays unreachable.
LOG_EVERY_SECONDS = 30
PREFIX = "lmgate:"
DAY_KEY_TTL = 3 * 86400
MONTH_KEY_TTL = 40 * 86400

# KEYS: the rpm hash of each subject; ARGV: the second now, then each subject's rpm. Returns 0
# (counted in every hash) or the seconds until the first full window has room (nothing counted).
_TAKE = """
local now = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[i + 1])
  local fields = redis.call('HGETALL', key)
  local total, buckets = 0, {}
  for j = 1, #fields, 2 do
    local second = tonumber(fields[j])
    if second <= now - %(window)d then
      redis.call('HDEL', key, fields[j])
    else
      total = total + tonumber(fields[j + 1])
      table.insert(buckets, {second, tonumber(fields[j + 1])})
    end
  end
  if total >= limit then
    table.sort(buckets, function(a, b) return a[1] < b[1] end)
    local left = total
    for _, bucket in ipairs(buckets) do
      left = left - bucket[2]
      if left < limit then return math.max(1, bucket[1] + %(window)d - now) end
    end
    return %(window)d
  end
end
for _, key in ipairs(KEYS) do
  redis.call('HINCRBY', key, ARGV[1], 1)
  redis.call('EXPIRE', key, %(window)d * 2)
end
return 0
""" % {"window": WINDOW_SECONDS}


USAGE_READS = 4


def _queue_usage(pipe, subject: str, day: str) -> None:
    """Queue the reads of one subject's shared use on `pipe`: USAGE_READS replies, for _usage."""
    pipe.get(f"{PREFIX}usd:{subject}:{day}")
    pipe.get(f"{PREFIX}usd:{subject}:{day[:7]}")
    pipe.get(f"{PREFIX}tokens:{subject}:{day[:7]}")
    pipe.hgetall(f"{PREFIX}tpm:{subject}")


def _usage(replies: list, now: float) -> dict[str, float]:
    usd_day, usd_month, tokens_month, minute = replies
    return {"usd_today": float(usd_day or 0), "usd_month": float(usd_month or 0),
            "tokens_month": int(tokens_month or 0), "tokens_last_minute": _last_minute(minute, now)}


def _last_minute(buckets: dict, now: float) -> int:
    """The sum of a one-second-bucket hash over the sliding window that ends now."""
    return sum(int(n) for s, n in buckets.items() if int(s) > int(now) - WINDOW_SECONDS)


def read_usage(url: str, subjects: list[str], now: float, timeout: float) -> dict[str, dict[str, float]]:
    """Each subject's use as all gates share it, for `lmgate keys` when no sidecar answers.
    Raises redis.RedisError when Redis does not answer."""
    import redis
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        pipe = client.pipeline(transaction=False)
        day = time.strftime("%Y-%m-%d", time.gmtime(now))
        for subject in subjects:
            _queue_usage(pipe, subject, day)
            pipe.hgetall(PREFIX + "rpm:" + subject)
        replies = pipe.execute()
    finally:
        client.close()
    n = USAGE_READS + 1
    return {subject: {"requests_last_minute": _last_minute(replies[i * n + USAGE_READS], now),
                      **_usage(replies[i * n:i * n + USAGE_READS], now)}
            for i, subject in enumerate(subjects)}


def shown(url: str) -> str:
    """The URL for a log line: without its user and password."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=host).geturl()


class RedisCounters(Counters):
    shared = True

    def __init__(self, url: str) -> None:
        super().__init__()
        import redis.asyncio as aioredis
        self.url = url
        self.client = aioredis.Redis.from_url(url, socket_timeout=TIMEOUT_SECONDS,
                                              socket_connect_timeout=TIMEOUT_SECONDS)
        self._take = self.client.register_script(_TAKE)
        self.local = Counters()          # while Redis is unreachable
        self.totals: dict[str, dict[str, float]] = {}   # subject -> usage, as last read
        self._usd: dict[tuple[str, str], list] = {}     # (subject, day) -> [tokens, usd] not yet added
        self._tpm: dict[tuple[str, int], int] = {}      # (subject, second) -> tokens not yet added
        self.down: str | None = None
        self._logged = 0.0
        self._task: asyncio.Task | None = None

    def _lost(self, exc: Exception) -> None:
        now = time.monotonic()
        if self.down is None or now - self._logged >= LOG_EVERY_SECONDS:
            log.error("policy: Redis at %s is unreachable (%s): limits are counted by this gate alone "
                      "until it is back", shown(self.url), exc or type(exc).__name__)
            self._logged = now
        self.down = str(exc)

    def _back(self) -> None:
        if self.down is not None:
            log.info("policy: Redis at %s is back; counters are shared again", shown(self.url))
            self.down = None

    async def take(self, subjects: list[tuple[str, Limits]], now: float) -> int:
        limited = [(s, limits.rpm) for s, limits in subjects if limits.rpm is not None]
        if not limited:
            return 0
        try:
            wait = await self._take(keys=[PREFIX + "rpm:" + s for s, _ in limited],
                                    args=[int(now), *(rpm for _, rpm in limited)])
        except Exception as exc:  # redis errors, timeouts, connection refused: fail open to local
            self._lost(exc)
            return await self.local.take(subjects, now)
        self._back()
        return int(wait)

    def spend_of(self, subject: str) -> dict[str, float] | None:
        return self.totals.get(subject)

    async def requests_last_minute(self, subject: str, now: float) -> int:
        try:
            buckets = await self.client.hgetall(PREFIX + "rpm:" + subject)
        except Exception:
            return await self.local.requests_last_minute(subject, now)
        return _last_minute(buckets, now)

    def add(self, subject: str, day: str, tokens: int, usd: float, second: int | None) -> None:
        pending = self._usd.get((subject, day))
        if pending is None:
            self._usd[(subject, day)] = [tokens, usd]
        else:
            pending[0] += tokens
            pending[1] += usd
        if second is not None:
            self._tpm[(subject, second)] = self._tpm.get((subject, second), 0) + tokens

    async def start(self) -> None:
        self._task = asyncio.create_task(self._sync_forever())

    async def _sync_forever(self) -> None:
        while True:
            try:
                await self.sync(time.time())
            except Exception as exc:
                self._lost(exc)
            await asyncio.sleep(REFRESH_SECONDS)

    async def sync(self, now: float) -> None:
        """Add this gate's counted spend to Redis and read every counted subject's totals back."""
        usd, tpm = self._usd, self._tpm
        self._usd, self._tpm = {}, {}
        day = time.strftime("%Y-%m-%d", time.gmtime(now))
        subjects = sorted(self.counted)
        pipe = self.client.pipeline(transaction=False)
        for (subject, when), (tokens, dollars) in usd.items():
            pipe.incrbyfloat(f"{PREFIX}usd:{subject}:{when}", dollars)
            pipe.expire(f"{PREFIX}usd:{subject}:{when}", DAY_KEY_TTL)
            pipe.incrbyfloat(f"{PREFIX}usd:{subject}:{when[:7]}", dollars)
            pipe.expire(f"{PREFIX}usd:{subject}:{when[:7]}", MONTH_KEY_TTL)
            pipe.incrby(f"{PREFIX}tokens:{subject}:{when[:7]}", tokens)
            pipe.expire(f"{PREFIX}tokens:{subject}:{when[:7]}", MONTH_KEY_TTL)
        for (subject, second), tokens in tpm.items():
            if second > now - WINDOW_SECONDS:
                pipe.hincrby(f"{PREFIX}tpm:{subject}", str(second), tokens)
                pipe.expire(f"{PREFIX}tpm:{subject}", WINDOW_SECONDS * 2)
        writes = len(pipe)
        for subject in subjects:
            _queue_usage(pipe, subject, day)
        try:
            results = await pipe.execute()
        except Exception:
            # Kept for the next try (a failed pipeline may have applied part: a rare overcount).
            for key, (tokens, dollars) in usd.items():
                self.add(key[0], key[1], tokens, dollars, None)
            for (subject, second), tokens in tpm.items():
                self._tpm[(subject, second)] = self._tpm.get((subject, second), 0) + tokens
            raise
        self._back()
        reads = results[writes:]
        self.totals = {subject: _usage(reads[i * USAGE_READS:(i + 1) * USAGE_READS], now)
                       for i, subject in enumerate(subjects)}

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            try:
                await self.sync(time.time())   # this gate's last spend
            except Exception as exc:
                log.error("policy: the last spend could not be added to Redis: %s", exc)
        await self.client.aclose()
