"""The sidecar: an aiohttp app that answers nginx's /auth subrequests and records every call.

Endpoints (never exposed through nginx's public port):
- GET  /auth    yes/no for the key in the original request's headers; 200 carries X-LMGate-ID.
- GET  /livez   the process answers.
- GET  /metrics Prometheus text format (lmgate/metrics.py; docs/metrics.md).
- GET  /readyz  the allow-list is loaded, the stats file's folder is writable, the spool is read,
                and nginx's calls reach it (lmgate/readiness.py).
Records come from the spool folder that nginx appends to (lmgate/spool.py), read in batches off
the request path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from time import perf_counter
from typing import AsyncIterator
from urllib.parse import quote

from aiohttp import web
from lmgate.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from lmgate.metrics import Metrics
from lmgate.readiness import STUB_STATUS_PATH

from lmgate import records, ws_relay
from lmgate.allowlist import AllowListHolder, mask_key
from lmgate.readiness import SPOOL_WORD as READINESS_WORD
from lmgate.readiness import ReadinessProbe
from lmgate.keys import KeyProblem, extract_key
from lmgate.refusals import RefusalFolder
from lmgate.settings import Settings, size_bytes
from lmgate.spool import SpoolReader
from lmgate.writer import StatsWriter, request_ids_after

log = logging.getLogger("lmgate.sidecar")

SETTINGS = web.AppKey("settings", Settings)
ALLOWLIST = web.AppKey("allowlist", AllowListHolder)
WRITER = web.AppKey("writer", StatsWriter)

# Spool lines turned into records before the loop serves anything else (a few milliseconds).
BATCH = 128
# Seconds between looks at the spool: short while calls are coming in, so that the sidecar's
# turns on a core it shares with nginx stay short and evenly spread (streams at 64 connections:
# p90 15 ms with 50 ms turns, 12 ms with 5 ms ones); every 50 ms once idle for a second.
SPOOL_POLL_SECONDS = 0.005
SPOOL_IDLE_POLL_SECONDS = 0.05
SPOOL_IDLE_AFTER_SECONDS = 1.0
# Records held for the stats file past which the spool is left unread (the disk refuses writes):
# the lines wait in the spool, where they are safe, instead of in memory.
MAX_PENDING_RECORDS = 100_000
# Seconds a stopping sidecar keeps reading the spool before its final flush.
SHUTDOWN_READ_SECONDS = 2.0
# Kept as they are (besides letters, digits and "-._~") in the id and owner headers: nginx copies
# them into the spool line unescaped, where these are harmless, and most owners are e-mail
# addresses that then need no percent-decoding per record.
HEADER_SAFE = "@+"
# Seconds a cached "yes" past auth.cache_seconds is still used while nginx asks the sidecar again
# in the background: a busy key never waits for the sidecar when its entry expires. Without it,
# every call that came in while the first one refreshed the entry also went to the sidecar and
# waited in its queue, once a second (under load: plain p99 19 -> 13 ms, 3 % more calls/s).
AUTH_REFRESH_SECONDS = 1
_AUTH_CACHE_CONTROL = f"stale-while-revalidate={AUTH_REFRESH_SECONDS}"
# Header through which nginx hands the original request's URI (for the `key` parameter) to /auth.
QUERY_HEADER = "X-LMGate-Query"

# Seconds after a refusal window's end before its folded record is written (lmgate/refusals.py).
REFUSAL_LINES_LATE_SECONDS = 3.0

SPOOL = web.AppKey("spool", SpoolReader)
SPOOL_TASK = web.AppKey("spool_task", asyncio.Task)


async def auth(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    started = perf_counter()
    response = _auth_answer(request)
    metrics.auth_seconds.observe(perf_counter() - started)
    if response.status == 200:
        metrics.allowed += 1
    else:
        metrics.refused += 1
    return response


def _auth_answer(request: web.Request) -> web.Response:
    # The answer has no body: nginx never reads an auth subrequest's body, and one would cost it
    # its keepalive connection to the sidecar.
    try:
        key = extract_key(request.headers, request.headers.get(QUERY_HEADER, "").partition("?")[2])
    except KeyProblem as problem:
        return web.Response(status=403, headers={"X-LMGate-Reason": str(problem)})
    entry = request.app[ALLOWLIST].current.lookup(key)
    # A key of arbitrary bytes arrives with surrogates; keep them encodable.
    masked = quote(mask_key(key), safe="", errors="surrogateescape")
    if entry is None:
        return web.Response(status=403, headers={"X-LMGate-Key": masked,
                                                 "X-LMGate-Reason": "key not on the allow-list"})
    return web.Response(status=200, headers={
        "X-LMGate-ID": quote(entry.id, safe=HEADER_SAFE),
        "X-LMGate-Owner": quote(entry.owner, safe=HEADER_SAFE),
        "X-LMGate-Key": masked,
        # nginx may keep serving this yes for AUTH_REFRESH_SECONDS past auth.cache_seconds while
        # it asks again in the background (see nginx_conf._auth_cache).
        "Cache-Control": _AUTH_CACHE_CONTROL,
    })


async def livez(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    app = request.app
    problems = []
    holder = app[ALLOWLIST]
    if holder.last_error:
        problems.append(f"allow-list: {holder.last_error} (previous list in force)")
    writer = app[WRITER]
    if not _writable_folder(writer.path.parent):
        problems.append(f"stats: {writer.path.parent} is not writable")
    if writer.last_error:
        problems.append(f"stats: {writer.last_error}")
    spool = app[SPOOL]
    if app[SPOOL_TASK].done():
        problems.append("spool: the reader has stopped")
    if spool.last_error:
        problems.append(f"spool: {spool.last_error}")
    if not _writable_folder(spool.folder):
        problems.append(f"spool: {spool.folder} is not writable")
    if app[READINESS].problem:
        problems.append(f"spool: {app[READINESS].problem}")
    body = {"ready": not problems, "allowlist_keys": len(holder.current),
            "stats_buffered": writer.buffered, "stats_written": writer.written,
            "spool_lines_read": spool.lines, "spool_bad_lines": spool.bad_lines,
            "spool_backlog_bytes": spool.backlog_bytes, "problems": problems}
    # For `lmgate doctor`: when the list in force was loaded, and why the last reload was refused.
    body["allowlist_loaded_at"] = records.iso_utc(holder.loaded_at)
    body["allowlist_last_error"] = holder.last_error
    return web.json_response(body, status=503 if problems else 200)


METRICS = web.AppKey("metrics", Metrics)


async def metrics(request: web.Request) -> web.Response:
    app = request.app
    m = app[METRICS]
    # /readyz's own answer says how many problems there are: one source for both.
    m.readiness_problems = len(json.loads((await readyz(request)).text)["problems"])
    await m.scrape_nginx(app[READINESS].socket, STUB_STATUS_PATH)
    return web.Response(body=m.exposition(), headers={"Content-Type": METRICS_CONTENT_TYPE})


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
    # After the writer's context: every record it takes is counted (the relay's too).
    app[WRITER].on_add = app[METRICS].observe
    yield


def _writable_folder(folder) -> bool:
    existing = folder if folder.exists() else folder.parent
    return existing.is_dir() and os.access(existing, os.W_OK)


class _Recorder:
    """Spool line -> record -> stats writer, skipping calls already in the stats file and folding
    floods of refused calls (lmgate/refusals.py)."""

    def __init__(self, writer: StatsWriter, readiness: ReadinessProbe) -> None:
        self.writer = writer
        self.readiness = readiness
        self.skip: set[str] = set()
        self.refusals = RefusalFolder(writer.add)

    def __call__(self, line: bytes) -> None:
        meta, body = records.load_line(line)
        if meta.get("err") == READINESS_WORD:
            self.readiness.seen(meta.get("u", ""))
            return
        record = records.from_meta(meta, body, time.time())
        if self.skip and record["request_id"] in self.skip:
            self.skip.discard(record["request_id"])
            return
        if record["error_type"] is None or self.refusals.keep(record, meta.get("ra", ""),
                                                              records.ended_at(meta, time.time())):
            self.writer.add(record)


RECORDER = web.AppKey("recorder", _Recorder)
READINESS = web.AppKey("readiness", ReadinessProbe)


async def _read_spool(app: web.Application) -> None:
    spool, writer, refusals, readiness = app[SPOOL], app[WRITER], app[RECORDER].refusals, app[READINESS]
    loop = asyncio.get_running_loop()
    lines_came = loop.time()
    folds_due = 0.0
    while True:
        if refusals.windows and loop.time() >= folds_due:
            # Lines reach the spool up to a few seconds after their call ended.
            refusals.close_ended(time.time() - REFUSAL_LINES_LATE_SECONDS)
            folds_due = loop.time() + 1
        if writer.buffered >= MAX_PENDING_RECORDS:
            await asyncio.sleep(SPOOL_IDLE_POLL_SECONDS)
            continue
        try:
            done = spool.read(BATCH)
            if writer.flush_due:  # between reads, never inside one: its checkpoint deletes spool files
                writer.flush()
        except Exception:  # the reader must outlive any surprise; the lines stay in the spool
            log.exception("spool: reading failed")
            done = 0
        if done:
            lines_came = loop.time()
        if done == BATCH:  # more may be waiting: read on once the loop has served the rest
            await asyncio.sleep(0)
            continue
        # The spool's end was reached.
        readiness.reader_at_end = loop.time()
        idle = loop.time() - lines_came >= SPOOL_IDLE_AFTER_SECONDS
        await asyncio.sleep(SPOOL_IDLE_POLL_SECONDS if idle else SPOOL_POLL_SECONDS)


async def writer_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS].stats
    try:
        s.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        log.error("cannot create the spool folder %s: %s", s.spool_dir, exc.strerror or exc)
    writer = StatsWriter(s.output_path, s.rotate_bytes, s.flush_interval_seconds)
    app[WRITER] = writer
    # The spool reader lives with the writer: its checkpoint follows the writer's flushes, the
    # last one at shutdown included (spool_ctx only drives the reading).
    readiness = app[READINESS] = ReadinessProbe(s.spool_dir.resolve())
    recorder = app[RECORDER] = _Recorder(writer, readiness)
    spool = app[SPOOL] = SpoolReader(s.spool_dir, recorder, _max_spool_line(app[SETTINGS]))
    # Records written after the last checkpoint (the previous sidecar was killed between a flush
    # and its checkpoint): their lines come again, and are skipped.
    recorder.skip = request_ids_after(s.output_path, spool.stats_mark)
    if recorder.skip:
        log.warning("spool: %d calls were recorded after the last checkpoint; their lines are skipped",
                    len(recorder.skip))
    # The spool may forget lines only once their records are on disk.
    writer.on_flushed = lambda: spool.commit(stats_mark=writer.mark())
    task = asyncio.create_task(writer.flush_forever())
    yield
    task.cancel()
    if not writer.flush():
        log.error("%d stats records could not be written at shutdown; their calls stay in the spool",
                  writer.buffered)
    spool.close()


async def allowlist_ctx(app: web.Application) -> AsyncIterator[None]:
    holder = app[ALLOWLIST]
    task = asyncio.create_task(holder.poll_forever())
    yield
    task.cancel()


async def readiness_ctx(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[READINESS].run_forever())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def spool_ctx(app: web.Application) -> AsyncIterator[None]:
    task = app[SPOOL_TASK] = asyncio.create_task(_read_spool(app))
    yield
    task.cancel()
    # What nginx wrote up to now becomes records before the final flush (for at most a few
    # seconds: the rest waits in the spool for the next start).
    deadline = time.monotonic() + SHUTDOWN_READ_SECONDS
    while app[SPOOL].read(BATCH * 8) and time.monotonic() < deadline:
        pass
    app[RECORDER].refusals.close_all()


def create_app(settings: Settings, holder: AllowListHolder | None = None) -> web.Application:
    """Build the sidecar app. `holder` is loaded here unless given (tests pass one)."""
    app = web.Application()
    app[SETTINGS] = settings
    app[ALLOWLIST] = holder or AllowListHolder(settings.auth.allowlist_path,
                                               settings.auth.poll_interval_seconds)
    # Order matters for shutdown (cleanup runs in reverse): the spool is read to its end, then
    # the writer flushes.
    app.cleanup_ctx.append(writer_ctx)
    app.cleanup_ctx.append(allowlist_ctx)
    app.cleanup_ctx.append(spool_ctx)
    app.cleanup_ctx.append(readiness_ctx)
    app.router.add_get("/auth", auth)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app[METRICS] = Metrics(settings.metrics.per_key_labels, settings.report.prices_path)
    app[METRICS].pipeline = lambda: _pipeline(app)
    app.cleanup_ctx.append(metrics_ctx)
    app.router.add_get("/metrics", metrics)
    # WebSocket APIs: nginx hands their handshakes to the relay (lmgate/ws_relay.py).
    ws_relay.register(app, settings, ALLOWLIST, WRITER)
    return app


def request_limits(settings: Settings) -> dict[str, int]:
    """aiohttp's header limits, at least as large as what nginx lets through to /auth."""
    line = max(size_bytes(settings.proxy.max_header_size), 8190) * 2
    return {"max_line_size": line, "max_field_size": line, "max_headers": 4096}


def _max_spool_line(settings: Settings) -> int:
    """The longest line nginx can write: the capture in base64, a path up to the header limit
    (escaped: at most doubled), and a bounded rest."""
    capture = settings.stats.capture_head_bytes + settings.stats.capture_tail_bytes
    return capture * 4 // 3 + 2 * size_bytes(settings.proxy.max_header_size) + 65536


def serve(settings: Settings) -> None:
    """Run the sidecar until SIGTERM/SIGINT; buffered records are written before exit."""
    app = create_app(settings)
    if not _writable_folder(settings.stats.output_path.parent):
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

