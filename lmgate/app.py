"""The sidecar: an aiohttp app that answers nginx's /auth subrequests and records every call.

Endpoints (never exposed through nginx's public port):
- GET  /auth    yes/no for the key in the original request's headers; 200 carries X-LMGate-ID.
- GET  /livez   the process answers.
- GET  /metrics Prometheus text format (lmgate/metrics.py; docs/metrics.md).
- GET  /policy/usage  current use of the keys with a policy (lmgate/keys_command.py).
- GET  /readyz  the allow-list is loaded, the stats file's folder is writable, the spool is read,
                and nginx's calls reach it (lmgate/readiness.py).
Records come from the spool folder that nginx appends to, off the request path (lmgate/pipeline.py);
WebSocket APIs pass through a relay (lmgate/ws_relay.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from time import perf_counter
from typing import AsyncIterator
from urllib.parse import quote

from aiohttp import web

from lmgate import pipeline, records, ws_relay
from lmgate.allowlist import AllowList, AllowListHolder, Entry
from lmgate.keys import KeyProblem, extract_key, mask_key
from lmgate.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from lmgate.metrics import Metrics
from lmgate.pipeline import READ_AFTER, READER_TASK, READINESS, SPOOL, WRITER
from lmgate.policy import CHECK_MODEL, Counters, Enforcer, counted_subjects, rebuild
from lmgate.readiness import STUB_STATUS_PATH
from lmgate.settings import Settings, size_bytes
from lmgate.writer import STDOUT

log = logging.getLogger("lmgate.sidecar")

SETTINGS = web.AppKey("settings", Settings)
ALLOWLIST = web.AppKey("allowlist", AllowListHolder)

# Kept as they are (besides letters, digits and "-._~") in the id and owner headers: nginx copies
# them into the spool line unescaped, where these are harmless, and most owners are e-mail
# addresses that then need no percent-decoding per record.
HEADER_SAFE = "@+"
# Seconds a cached "yes" past auth.cache_seconds is still used while nginx asks the sidecar again
# in the background: a busy key never queues at the sidecar when its entry expires
# (docs/performance-history.md).
AUTH_REFRESH_SECONDS = 1
_AUTH_CACHE_CONTROL = f"stale-while-revalidate={AUTH_REFRESH_SECONDS}"
# Header through which nginx hands the original request's URI (for the `key` parameter) to /auth.
QUERY_HEADER = "X-LMGate-Query"

POLICY = web.AppKey("policy", Enforcer)


async def auth(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    started = perf_counter()
    response = _auth_answer(request)
    if type(response) is tuple:  # a key with a policy, or whose owner has limits
        response = await _policy_answer(request, *response)
    metrics.auth_seconds.observe(perf_counter() - started)
    if response.status == 200 or response.headers.get("X-LMGate-Policy", "").startswith(CHECK_MODEL):
        metrics.allowed += 1
    else:
        metrics.refused += 1
    return response


async def _policy_answer(request: web.Request, lists: AllowList, entry: Entry, masked: str) -> web.Response:
    """/auth for a key with a policy (lmgate/policy.py). A refusal is a 403 whose X-LMGate-Policy
    says which (with the seconds to wait, for a 429): nginx's denied location answers with the
    status and body it means (nginx_conf._policy_refusals)."""
    enforcer = request.app[POLICY]
    enforcer.watch(lists)
    verdict = await enforcer.decide(entry, lists.owners.get(entry.owner), request.headers.get(QUERY_HEADER, ""),
                                    time.time())
    headers = {"X-LMGate-ID": quote(entry.id, safe=HEADER_SAFE),
               "X-LMGate-Owner": quote(entry.owner, safe=HEADER_SAFE),
               "X-LMGate-Key": masked}
    if verdict.refusal is None:
        # A yes that a later call of this key may not get (an rpm to count, a model in the path)
        # is never cached by nginx.
        headers["Cache-Control"] = _AUTH_CACHE_CONTROL if verdict.cacheable else "no-store"
        return web.Response(status=200, headers=headers)
    if verdict.refusal == CHECK_MODEL:
        headers["X-LMGate-Policy"] = f"{CHECK_MODEL} {verdict.models_regex}"
    elif verdict.retry_after:
        headers["X-LMGate-Policy"] = f"{verdict.refusal} {verdict.retry_after}"
    else:
        headers["X-LMGate-Policy"] = verdict.refusal
    headers["X-LMGate-Reason"] = verdict.refusal
    return web.Response(status=403, headers=headers)


def _auth_answer(request: web.Request) -> web.Response | tuple:
    # The answer has no body: nginx never reads an auth subrequest's body, and one would cost it
    # its keepalive connection to the sidecar.
    try:
        key = extract_key(request.headers, request.headers.get(QUERY_HEADER, "").partition("?")[2])
    except KeyProblem as problem:
        return web.Response(status=403, headers={"X-LMGate-Reason": str(problem)})
    lists = request.app[ALLOWLIST].current
    entry = lists.lookup(key)
    # A key of arbitrary bytes arrives with surrogates; keep them encodable.
    masked = quote(mask_key(key), safe="", errors="surrogateescape")
    if entry is None:
        return web.Response(status=403, headers={"X-LMGate-Key": masked,
                                                 "X-LMGate-Reason": "key not on the allow-list"})
    if entry.policy is not None or (lists.owners and entry.owner in lists.owners):
        return lists, entry, masked
    return web.Response(status=200, headers={
        "X-LMGate-ID": quote(entry.id, safe=HEADER_SAFE),
        "X-LMGate-Owner": quote(entry.owner, safe=HEADER_SAFE),
        "X-LMGate-Key": masked,
        # nginx may keep serving this yes for AUTH_REFRESH_SECONDS past auth.cache_seconds while
        # it asks again in the background (see nginx_conf._auth_cache).
        "Cache-Control": _AUTH_CACHE_CONTROL,
    })


async def policy_usage(request: web.Request) -> web.Response:
    """Current use of the keys with a policy and of the owners with limits (`lmgate keys`)."""
    return web.json_response(await request.app[POLICY].usage(request.app[ALLOWLIST].current, time.time()))


async def livez(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def _problems(app: web.Application) -> list[str]:
    """What keeps the sidecar from being ready (/readyz; /metrics counts them)."""
    problems = []
    holder = app[ALLOWLIST]
    if holder.last_error:
        problems.append(f"allow-list: {holder.last_error} (previous list in force)")
    writer = app[WRITER]
    if not writer.to_stdout and not _writable_folder(writer.path.parent):
        problems.append(f"stats: {writer.path.parent} is not writable")
    if writer.last_error:
        problems.append(f"stats: {writer.last_error}")
    spool = app[SPOOL]
    if app[READER_TASK].done():
        problems.append("spool: the reader has stopped")
    if spool.last_error:
        problems.append(f"spool: {spool.last_error}")
    if not _writable_folder(spool.folder):
        problems.append(f"spool: {spool.folder} is not writable")
    if app[READINESS].problem:
        problems.append(f"spool: {app[READINESS].problem}")
    return problems


async def readyz(request: web.Request) -> web.Response:
    app = request.app
    problems = _problems(app)
    holder, writer, spool = app[ALLOWLIST], app[WRITER], app[SPOOL]
    body = {"ready": not problems, "allowlist_keys": len(holder.current),
            "stats_buffered": writer.buffered, "stats_written": writer.written,
            "spool_lines_read": spool.lines, "spool_bad_lines": spool.bad_lines,
            "spool_backlog_bytes": spool.backlog_bytes, "problems": problems}
    # For `lmgate doctor`: when the list in force was loaded, and why the last reload was refused.
    body["allowlist_loaded_at"] = records.iso_utc(holder.loaded_at)
    body["allowlist_last_error"] = holder.last_error
    return web.json_response(body, status=503 if problems else 200)


METRICS = web.AppKey("metrics", Metrics)
# Seconds between counts of the records added (a scrape counts them first).
METRICS_DRAIN_SECONDS = 1.0


async def metrics(request: web.Request) -> web.Response:
    return await _exposition(request.app)


async def _exposition(app: web.Application) -> web.Response:
    m = app[METRICS]
    m.drain()
    m.readiness_problems = len(_problems(app))  # /readyz's own list: one source for both
    await m.scrape_nginx(app[READINESS].socket, STUB_STATUS_PATH)
    return web.Response(body=m.exposition(), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def metrics_port_ctx(app: web.Application) -> AsyncIterator[None]:
    """metrics.port: /metrics alone on a listener of its own, so that a scraper can be let in
    without reaching /auth or /policy/usage."""
    s = app[SETTINGS].metrics
    only = web.Application()

    async def handler(request: web.Request) -> web.Response:
        return await _exposition(app)

    only.router.add_get("/metrics", handler)
    runner = web.AppRunner(only, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, s.host, s.port, reuse_address=True).start()
    except OSError as exc:
        await runner.cleanup()
        raise SystemExit(f"lmgate: the sidecar cannot serve /metrics on {s.host}:{s.port} (metrics.port): "
                         f"{exc.strerror or exc}") from None
    log.info("/metrics also on %s:%d", s.host, s.port)
    yield
    await runner.cleanup()


def _pipeline(app: web.Application) -> dict[str, float]:
    """The values /metrics reads at scrape time (metrics.PIPELINE names them)."""
    holder, writer, spool = app[ALLOWLIST], app[WRITER], app[SPOOL]
    return {
        "lmgate_spool_backlog_bytes": spool.backlog_bytes,
        "lmgate_spool_lines_read_total": spool.lines,
        "lmgate_spool_bad_lines_total": spool.bad_lines,
        "lmgate_records_buffered": writer.buffered,
        "lmgate_records_written_total": writer.written,
        "lmgate_records_dropped_total": writer.dropped,
        "lmgate_stats_flushes_total": writer.flushes,
        "lmgate_stats_rotations_total": writer.rotations,
        "lmgate_stats_write_errors_total": writer.write_errors,
        "lmgate_allowlist_keys": len(holder.current),
        "lmgate_allowlist_reloads_total": holder.reloads,
        "lmgate_allowlist_reload_errors_total": holder.reload_errors,
        "lmgate_allowlist_last_reload_failed": 1 if holder.last_error else 0,
        "lmgate_allowlist_loaded_timestamp_seconds": holder.loaded_at,
        "lmgate_readiness_problems": app[METRICS].readiness_problems,
    }


async def metrics_ctx(app: web.Application) -> AsyncIterator[None]:
    # After the writer's context: every record it takes is counted (the relay's too), in batches.
    m = app[METRICS]
    enforcer = app[POLICY]

    def on_add(record: dict) -> None:
        m.add(record)
        enforcer.add(record)

    app[WRITER].on_add = on_add

    async def drain_forever() -> None:
        while True:
            await asyncio.sleep(METRICS_DRAIN_SECONDS)
            m.drain()

    task = asyncio.create_task(drain_forever())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def policy_ctx(app: web.Application) -> AsyncIterator[None]:
    """Rebuild this month's spend of counted keys and owners from the stats files, in a thread
    (/auth answers meanwhile, budgets against what is known so far), before the spool is read."""
    enforcer, settings = app[POLICY], app[SETTINGS]
    enforcer.watch(app[ALLOWLIST].current)
    await enforcer.counters.start()
    subjects = counted_subjects(app[ALLOWLIST].current)
    task = None
    if subjects and not enforcer.counters.shared and settings.stats.output_path != STDOUT:
        enforcer.ready = False

        async def run() -> None:
            started = time.monotonic()
            try:
                spends, n = await asyncio.to_thread(rebuild, subjects, settings.stats.output_path,
                                                    app[METRICS], time.time())
                for subject, day, tokens, usd in spends:
                    enforcer.counters.add(subject, day, tokens, usd, None)
                log.info("policy: spend of %d keys and owners rebuilt from %d records of this month in %.1f s",
                         len(subjects), n, time.monotonic() - started)
            except Exception as exc:  # the gate runs on: budgets count from now
                log.error("policy: spend could not be rebuilt from the stats files (%s); budgets count "
                          "from now on", exc)
            finally:
                enforcer.ready = True
                app[READ_AFTER].set()

        task = asyncio.create_task(run())
    else:
        app[READ_AFTER].set()
    yield
    if task is not None:
        await asyncio.gather(task, return_exceptions=True)
    await enforcer.counters.close()


def _writable_folder(folder) -> bool:
    existing = folder if folder.exists() else folder.parent
    return existing.is_dir() and os.access(existing, os.W_OK)


async def allowlist_ctx(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[ALLOWLIST].poll_forever())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def create_app(settings: Settings, holder: AllowListHolder | None = None) -> web.Application:
    """Build the sidecar app. `holder` is loaded here unless given (tests pass one)."""
    app = web.Application()
    app[SETTINGS] = settings
    # Before the allow-list: loading it sets every object alive aside from the cycle collector's
    # scans (allowlist.load_outside_gc), the price data the metrics hold included.
    app[METRICS] = Metrics(settings.metrics.per_key_labels, settings.report.prices_path)
    owners = Path(settings.auth.owners_path) if settings.auth.owners_path else None
    app[ALLOWLIST] = holder or AllowListHolder(settings.auth.allowlist_path,
                                               settings.auth.poll_interval_seconds, owners)
    if settings.policy.redis_url:
        from lmgate.policy_redis import RedisCounters
        counters = RedisCounters(settings.policy.redis_url)
    else:
        counters = Counters()
    app[POLICY] = Enforcer(counters, app[METRICS].spend, lambda: app[ALLOWLIST].current)
    app[READ_AFTER] = asyncio.Event()
    app.cleanup_ctx.append(policy_ctx)
    pipeline.setup(app, settings)
    app.cleanup_ctx.append(allowlist_ctx)
    app.router.add_get("/auth", auth)
    app.router.add_get("/livez", livez)
    app.router.add_get("/policy/usage", policy_usage)
    app.router.add_get("/readyz", readyz)
    app[METRICS].pipeline = lambda: _pipeline(app)
    app.cleanup_ctx.append(metrics_ctx)
    app.router.add_get("/metrics", metrics)
    if settings.metrics.port:
        app.cleanup_ctx.append(metrics_port_ctx)
    # WebSocket APIs: nginx hands their handshakes to the relay (lmgate/ws_relay.py).
    ws_relay.register(app, settings, ALLOWLIST, WRITER)
    return app


def request_limits(settings: Settings) -> dict[str, int]:
    """aiohttp's header limits, at least as large as what nginx lets through to /auth."""
    line = max(size_bytes(settings.proxy.max_header_size), 8190) * 2
    return {"max_line_size": line, "max_field_size": line, "max_headers": 4096}


def serve(settings: Settings) -> None:
    """Run the sidecar until SIGTERM/SIGINT; buffered records are written before exit."""
    app = create_app(settings)
    if settings.stats.output_path != STDOUT and not _writable_folder(settings.stats.output_path.parent):
        log.error("stats folder %s is not writable: records stay in memory until it is",
                  settings.stats.output_path.parent)
    log.info("sidecar listening on %s:%d, allow-list %s (%d keys), spool %s, stats %s",
             settings.server.host, settings.server.port, settings.auth.allowlist_path,
             len(app[ALLOWLIST].current), settings.stats.spool_dir, settings.stats.output_path)
    try:
        web.run_app(app, host=settings.server.host, port=settings.server.port, print=None,
                    access_log=None, handle_signals=True, shutdown_timeout=5, reuse_address=True,
                    **request_limits(settings))
    except OSError as exc:  # typically a port already in use: one line, no traceback
        raise SystemExit(f"lmgate: the sidecar cannot listen on {settings.server.host}:"
                         f"{settings.server.port}: "
                         f"{exc.strerror or exc}") from None

