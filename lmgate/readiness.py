"""The readiness probe: proof that nginx's calls still become records.

nginx's workers may lose the spool (a folder they cannot write, a full disk) while every call goes
on (stats fail open): nothing but nginx's own log would say so. So every INTERVAL_SECONDS the
sidecar makes a call through nginx, on a socket in the spool folder (nginx/nginx.conf.template:
only nginx and the sidecar can open it), and waits for that call's line to come back through the
spool (it is not a record). /readyz names the problem while one does not, and it is logged once
per interval. `lmgate doctor`'s canary is another thing: a call through the public port that must
come back as a record.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from pathlib import Path

import aiohttp

log = logging.getLogger("lmgate.sidecar")

SOCKET_NAME = "readiness.sock"
PATH_PREFIX = "/_lmgate/readiness/"
# nginx's stub_status on the same socket, read by the sidecar's /metrics (lmgate/metrics.py).
STUB_STATUS_PATH = "/_lmgate/stub_status"
# The probe's $lmgate_error word in the spool line: the sidecar takes such lines as probes, not calls.
SPOOL_WORD = "readiness"
INTERVAL_SECONDS = 5.0
# A probe's line is missing once the spool reader has read to the end this long after it was sent.
MISSING_AFTER_SECONDS = 2.0
MAX_PENDING = 16


class ReadinessProbe:
    def __init__(self, spool_dir: Path) -> None:
        self.socket = spool_dir / SOCKET_NAME
        self.spool_dir = spool_dir
        self.pending: dict[str, float] = {}  # probe name -> when nginx answered it (loop time)
        self.problem: str | None = None
        self.reader_at_end = 0.0  # when the spool reader last read everything there was

    def seen(self, path: str) -> None:
        """A probe's spool line came back: calls are being recorded."""
        self.pending.pop(path[len(PATH_PREFIX):], None)
        if self.problem is not None:
            log.info("spool: calls are recorded again")
        self.problem = None

    def judge(self) -> None:
        for name, sent in list(self.pending.items()):
            if self.reader_at_end - sent >= MISSING_AFTER_SECONDS:
                del self.pending[name]
                self.problem = (
                    f"calls are not being recorded: a probe call that nginx answered never reached the "
                    f"spool {self.spool_dir} (nginx's workers cannot write there, or the disk is full: "
                    f"see nginx's log)")
        if self.problem is not None:
            log.error("spool: %s", self.problem)

    async def send(self, session: aiohttp.ClientSession) -> None:
        """One probe call; nginx not (yet) running is not a recording problem."""
        name = secrets.token_hex(8)
        try:
            async with session.get(f"http://lmgate{PATH_PREFIX}{name}") as resp:
                if resp.status == 204:
                    self.pending[name] = asyncio.get_running_loop().time()
                    if len(self.pending) > MAX_PENDING:  # the reader is held up: keep the newest
                        del self.pending[next(iter(self.pending))]
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            pass

    async def run_forever(self) -> None:
        connector = aiohttp.UnixConnector(path=str(self.socket))
        timeout = aiohttp.ClientTimeout(total=INTERVAL_SECONDS / 2)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            while True:
                self.judge()
                await self.send(session)
                await asyncio.sleep(INTERVAL_SECONDS)
