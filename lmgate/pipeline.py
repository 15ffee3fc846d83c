"""The records pipeline, off the request path: nginx's spool lines -> records -> the stats file.

The spool reader (lmgate/spool.py) hands each line to the Recorder, which turns it into a record
(lmgate/records.py), skips calls already in the stats file, folds floods of refused calls
(lmgate/refusals.py) and notes the readiness probe's lines (lmgate/readiness.py); the writer
(lmgate/writer.py) buffers the records and writes them, and each flush lets the spool forget the
lines it holds. Each resource has its own cleanup context (setup below); on shutdown the spool is
read to its end, then the writer flushes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

from aiohttp import web

from lmgate import records
from lmgate.readiness import SPOOL_WORD as READINESS_WORD
from lmgate.readiness import ReadinessProbe
from lmgate.refusals import RefusalFolder
from lmgate.settings import Settings, size_bytes
from lmgate.spool import SpoolReader
from lmgate.writer import StatsWriter, request_ids_after

log = logging.getLogger("lmgate.sidecar")

# Spool lines turned into records before the loop serves anything else (a few milliseconds).
BATCH = 128
# Seconds between looks at the spool: short while calls are coming in, so that the sidecar's
# turns on a core it shares with nginx stay short and evenly spread (docs/performance.md); every
# 50 ms once idle for a second.
SPOOL_POLL_SECONDS = 0.005
SPOOL_IDLE_POLL_SECONDS = 0.05
SPOOL_IDLE_AFTER_SECONDS = 1.0
# Records held for the stats file past which the spool is left unread (the disk refuses writes):
# the lines wait in the spool, where they are safe, instead of in memory.
MAX_PENDING_RECORDS = 100_000
# Seconds a stopping sidecar keeps reading the spool before its final flush.
SHUTDOWN_READ_SECONDS = 2.0
# Seconds after a refusal window's end before its folded record is written: lines reach the spool
# up to a few seconds after their call ended.
REFUSAL_LINES_LATE_SECONDS = 3.0


class Recorder:
    """Spool line -> record -> stats writer, skipping calls already in the stats file and folding
    floods of refused calls."""

    def __init__(self, writer: StatsWriter, readiness: ReadinessProbe, refusals_per_window: int) -> None:
        self.writer = writer
        self.readiness = readiness
        self.skip: set[str] = set()
        self.refusals = RefusalFolder(writer.add, refusals_per_window)

    def __call__(self, line: bytes) -> None:
        meta, body = records.load_line(line)
        if meta.get("err") == READINESS_WORD:
            self.readiness.seen(meta.get("u", ""))
            return
        now = time.time()
        record = records.from_meta(meta, body, now)
        if self.skip and record["request_id"] in self.skip:
            self.skip.discard(record["request_id"])
            return
        if record["error_type"] is None or self.refusals.keep(record, meta.get("ra", ""),
                                                              records.ended_at(meta, now)):
            self.writer.add(record)


WRITER = web.AppKey("writer", StatsWriter)
SPOOL = web.AppKey("spool", SpoolReader)
RECORDER = web.AppKey("recorder", Recorder)
READINESS = web.AppKey("readiness", ReadinessProbe)
READER_TASK = web.AppKey("reader_task", asyncio.Task)
# Set when the spool may be read: per-key spend is first rebuilt from the stats files (app.py),
# which must not change meanwhile; the lines wait in the spool.
READ_AFTER = web.AppKey("read_after", asyncio.Event)


def setup(app: web.Application, settings: Settings) -> None:
    """Add the pipeline's resources to `app`, in the order their cleanup needs (reverse)."""

    async def stats_ctx(app: web.Application) -> AsyncIterator[None]:
        """The writer and the spool it checkpoints: the writer flushes last, at shutdown."""
        s = settings.stats
        try:
            s.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            log.error("cannot create the spool folder %s: %s", s.spool_dir, exc.strerror or exc)
        writer = app[WRITER] = StatsWriter(s.output_path, s.rotate_bytes, s.flush_interval_seconds)
        readiness = app[READINESS] = ReadinessProbe(s.spool_dir.resolve())
        recorder = app[RECORDER] = Recorder(writer, readiness, s.refusal_records_per_window)
        spool = app[SPOOL] = SpoolReader(s.spool_dir, recorder, max_spool_line(settings))
        # Records written after the last checkpoint (the previous sidecar was killed between a
        # flush and its checkpoint): their lines come again, and are skipped.
        recorder.skip = request_ids_after(s.output_path, spool.stats_mark)
        if recorder.skip:
            log.warning("spool: %d calls were recorded after the last checkpoint; their lines are skipped",
                        len(recorder.skip))
        # The spool may forget lines only once their records are on disk.
        writer.on_flushed = lambda: spool.commit(stats_mark=writer.mark())
        task = asyncio.create_task(writer.flush_forever())
        yield
        await _cancelled(task)
        if not writer.flush():
            log.error("%d stats records could not be written at shutdown; their calls stay in the spool",
                      writer.buffered)
        spool.close()

    async def reader_ctx(app: web.Application) -> AsyncIterator[None]:
        task = app[READER_TASK] = asyncio.create_task(read_spool(app))
        yield
        await _cancelled(task)
        # What nginx wrote up to now becomes records before the final flush (for at most a few
        # seconds: the rest waits in the spool for the next start).
        deadline = time.monotonic() + SHUTDOWN_READ_SECONDS
        while app[SPOOL].read(BATCH * 8) and time.monotonic() < deadline:
            pass
        app[RECORDER].refusals.close_all()

    async def readiness_ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(app[READINESS].run_forever())
        yield
        await _cancelled(task)

    app.cleanup_ctx.extend((stats_ctx, reader_ctx, readiness_ctx))


async def _cancelled(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def read_spool(app: web.Application) -> None:
    spool, writer, refusals, readiness = app[SPOOL], app[WRITER], app[RECORDER].refusals, app[READINESS]
    if READ_AFTER in app:
        await app[READ_AFTER].wait()
    loop = asyncio.get_running_loop()
    lines_came = loop.time()
    folds_due = 0.0
    while True:
        if refusals.windows and loop.time() >= folds_due:
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


def max_spool_line(settings: Settings) -> int:
    """The longest line nginx can write: the capture in base64, a path up to the header limit
    (escaped: at most doubled), and a bounded rest."""
    capture = settings.stats.capture_head_bytes + settings.stats.capture_tail_bytes
    return capture * 4 // 3 + 2 * size_bytes(settings.proxy.max_header_size) + 65536
