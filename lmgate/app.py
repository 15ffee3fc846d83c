"""The sidecar: an aiohttp app that answers nginx's /auth subrequests and takes /stats reports.

Endpoints (never exposed through nginx's public port):
- GET  /auth    yes/no for the key in the original request's headers; 200 carries X-LMGate-ID.
- POST /stats   queue the njs body filter's capture; 204 at once, parsing happens off the request path.
- GET  /livez   the process answers.
- GET  /readyz  the allow-list is loaded and the stats file's folder is writable.
Plus a UDP listener for nginx's fallback access-log lines (see records.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import AsyncIterator
from urllib.parse import quote

from aiohttp import web

from lmgate import records
from lmgate.allowlist import AllowListHolder, mask_key
from lmgate.keys import KeyProblem, extract_key
from lmgate.settings import Settings, size_bytes
from lmgate.writer import StatsWriter

log = logging.getLogger("lmgate.sidecar")

SETTINGS = web.AppKey("settings", Settings)
ALLOWLIST = web.AppKey("allowlist", AllowListHolder)
WRITER = web.AppKey("writer", StatsWriter)

# How many queued reports the worker turns into records before yielding to the event loop.
BATCH = 256
# Header through which nginx hands the original request's URI (for the `key` parameter) to /auth.
QUERY_HEADER = "X-LMGate-Query"


class ReportQueue:
    """Bounded queue of raw reports; never blocks the caller, counts what it had to drop."""

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[tuple[str, str, bytes, float]] = asyncio.Queue(size)
        self.dropped = 0
        self._last_drop_log = 0.0

    def put(self, kind: str, query: str, body: bytes) -> None:
        try:
            self.queue.put_nowait((kind, query, body, time.time()))
        except asyncio.QueueFull:
            self.dropped += 1
            now = time.monotonic()
            if now - self._last_drop_log >= 10:
                log.error("stats queue full (%d): %d reports dropped so far", self.queue.maxsize, self.dropped)
                self._last_drop_log = now


REPORTS = web.AppKey("reports", ReportQueue)
WORKER = web.AppKey("worker", asyncio.Task)


async def auth(request: web.Request) -> web.Response:
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
        "X-LMGate-ID": quote(entry.id, safe=""),
        "X-LMGate-Owner": quote(entry.owner, safe=""),
        "X-LMGate-Key": masked,
    })


async def stats(request: web.Request) -> web.Response:
    body = await request.read()
    request.app[REPORTS].put("capture", request.rel_url.raw_query_string, body)
    return web.Response(status=204)


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
    if app[WORKER].done():
        problems.append("stats: the record worker has stopped")
    body = {"ready": not problems, "allowlist_keys": len(holder.current),
            "stats_buffered": writer.buffered, "stats_written": writer.written,
            "reports_dropped": app[REPORTS].dropped, "problems": problems}
    return web.json_response(body, status=503 if problems else 200)


def _writable_folder(folder) -> bool:
    existing = folder if folder.exists() else folder.parent
    return existing.is_dir() and os.access(existing, os.W_OK)


def _to_record(kind: str, query: str, body: bytes, received_at: float) -> dict | None:
    if kind == "capture":
        return records.from_capture(query, body, received_at)
    return records.from_fallback(body, received_at)


def _record_one(app: web.Application, item: tuple[str, str, bytes, float]) -> None:
    try:
        record = _to_record(*item)
        if record is not None:
            app[WRITER].add(record)
    except Exception:  # a report we cannot read must not stop the others
        log.exception("could not turn a %s report into a record", item[0])


async def _work(app: web.Application) -> None:
    queue = app[REPORTS].queue
    while True:
        _record_one(app, await queue.get())
        for _ in range(BATCH - 1):
            if queue.empty():
                break
            _record_one(app, queue.get_nowait())
        await asyncio.sleep(0)


def drain(app: web.Application) -> None:
    """Turn every queued report into a record (used at shutdown)."""
    queue = app[REPORTS].queue
    while not queue.empty():
        _record_one(app, queue.get_nowait())


class _FallbackProtocol(asyncio.DatagramProtocol):
    def __init__(self, reports: ReportQueue) -> None:
        self.reports = reports

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.reports.put("fallback", "", data)


async def writer_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS].stats
    writer = StatsWriter(s.output_path, s.rotate_bytes, s.flush_interval_seconds)
    app[WRITER] = writer
    task = asyncio.create_task(writer.flush_forever())
    yield
    task.cancel()
    if not writer.flush():
        log.error("%d stats records could not be written at shutdown", writer.buffered)


async def allowlist_ctx(app: web.Application) -> AsyncIterator[None]:
    holder = app[ALLOWLIST]
    task = asyncio.create_task(holder.poll_forever())
    yield
    task.cancel()


class StatsProtocol(asyncio.Protocol):
    """POST /stats on server.stats_port, from nginx only: HTTP/1.1 keep-alive with Content-Length
    bodies (none: empty), answered 204 at once. Anything else (another method or path, a bad length, a
    body over the capture limit, a head over 16 KiB, chunked encoding) closes the connection."""

    MAX_HEAD = 16384

    def __init__(self, reports: ReportQueue, limit: int) -> None:
        self.reports = reports
        self.limit = limit
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        answered = 0
        while True:
            end = buf.find(b"\r\n\r\n", 0, self.MAX_HEAD + 4)
            if end < 0:
                if len(buf) > self.MAX_HEAD:
                    return self._close()
                break
            line, _, headers = bytes(buf[:end]).partition(b"\r\n")
            parts = line.split(b" ")
            if len(parts) != 3 or parts[0] != b"POST" or parts[1].partition(b"?")[0] != b"/stats" \
                    or not parts[2].startswith(b"HTTP/1."):
                return self._close()
            length = None
            for header in headers.split(b"\r\n"):
                name, _, value = header.partition(b":")
                name = name.strip().lower()
                if name == b"transfer-encoding" or (name == b"content-length" and length is not None):
                    return self._close()
                if name == b"content-length":
                    value = value.strip()
                    if not value.isdigit():
                        return self._close()
                    length = int(value)
            if length is None:
                length = 0  # an empty capture: nginx sends no body
            if length > self.limit:
                return self._close()
            total = end + 4 + length
            if len(buf) < total:
                break
            body = bytes(buf[end + 4:total])
            del buf[:total]
            self.reports.put("capture", parts[1].partition(b"?")[2].decode("latin-1"), body)
            answered += 1
        if answered:
            self.transport.write(b"HTTP/1.1 204 No Content\r\n\r\n" * answered)

    def _close(self) -> None:
        self.buf.clear()
        self.transport.close()


async def stats_server_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    server = await asyncio.get_running_loop().create_server(
        lambda: StatsProtocol(app[REPORTS], _capture_limit(s)), s.server.host, s.server.stats_port,
        reuse_address=True)
    yield
    server.close()
    await server.wait_closed()


async def reports_ctx(app: web.Application) -> AsyncIterator[None]:
    app[REPORTS] = ReportQueue(app[SETTINGS].stats.queue_size)
    task = app[WORKER] = asyncio.create_task(_work(app))
    yield
    task.cancel()
    drain(app)


async def fallback_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS].server
    sock = socket.socket(socket.AF_INET6 if ":" in s.host else socket.AF_INET, socket.SOCK_DGRAM)
    # A generous receive buffer rides out bursts of fallback lines while the loop is busy.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((s.host, s.fallback_port))
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: _FallbackProtocol(app[REPORTS]), sock=sock)
    yield
    transport.close()


def create_app(settings: Settings, holder: AllowListHolder | None = None, *,
               listen_fallback: bool = True) -> web.Application:
    """Build the sidecar app. `holder` is loaded here unless given (tests pass one)."""
    app = web.Application(client_max_size=_capture_limit(settings))
    app[SETTINGS] = settings
    app[ALLOWLIST] = holder or AllowListHolder(settings.auth.allowlist_path,
                                               settings.auth.poll_interval_seconds)
    # Order matters for shutdown (cleanup runs in reverse): the queue drains into the writer,
    # then the writer flushes.
    app.cleanup_ctx.append(writer_ctx)
    app.cleanup_ctx.append(allowlist_ctx)
    app.cleanup_ctx.append(reports_ctx)
    if listen_fallback:
        app.cleanup_ctx.append(fallback_ctx)
        app.cleanup_ctx.append(stats_server_ctx)
    app.router.add_get("/auth", auth)
    app.router.add_post("/stats", stats)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    return app


def request_limits(settings: Settings) -> dict[str, int]:
    """aiohttp's header limits, at least as large as what nginx lets through to /auth."""
    line = max(size_bytes(settings.proxy.max_header_size), 8190) * 2
    return {"max_line_size": line, "max_field_size": line, "max_headers": 4096}


def _capture_limit(settings: Settings) -> int:
    return settings.stats.capture_head_bytes + settings.stats.capture_tail_bytes + 4096


def serve(settings: Settings) -> None:
    """Run the sidecar until SIGTERM/SIGINT; buffered records are written before exit."""
    app = create_app(settings)
    if not _writable_folder(settings.stats.output_path.parent):
        log.error("stats folder %s is not writable: records stay in memory until it is",
                  settings.stats.output_path.parent)
    log.info("sidecar listening on %s:%d (fallback udp %d), allow-list %s (%d keys), stats %s",
             settings.server.host, settings.server.port, settings.server.fallback_port,
             settings.auth.allowlist_path, len(app[ALLOWLIST].current), settings.stats.output_path)
    try:
        web.run_app(app, host=settings.server.host, port=settings.server.port, print=None,
                    access_log=None, handle_signals=True, shutdown_timeout=5, reuse_address=True,
                    **request_limits(settings))
    except OSError as exc:  # typically a port already in use: one line, no traceback
        raise SystemExit(f"lmgate: the sidecar cannot listen on {settings.server.host}:"
                         f"{settings.server.port} (udp {settings.server.fallback_port}): "
                         f"{exc.strerror or exc}") from None

