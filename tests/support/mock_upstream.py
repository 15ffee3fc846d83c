"""A scriptable mock provider on 127.0.0.1, run in its own thread so synchronous SDK clients can
call through LMGate to it from a test."""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass, field

from aiohttp import web


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    # Streamed replies: each chunk is written (and flushed) separately, `delay` seconds apart.
    chunks: list[bytes] | None = None
    delay: float = 0.0
    # Set by the test to let a streamed reply send its last chunk (proves nothing is buffered).
    release_last: threading.Event | None = None
    # "reset": close the connection after the first chunk; "stall": never finish.
    fault: str | None = None


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes


class MockUpstream:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.replies: dict[str, Reply] = {}
        self.seen: list[Seen] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def reply(self, path: str, reply: Reply | None = None, **kwargs) -> Reply:
        """Answer requests whose path (no query) is `path` with `reply`; "*" answers any other path."""
        reply = reply or Reply(**kwargs)
        self.replies[path] = reply
        return reply

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.method, request.raw_path, dict(request.headers), body))
        reply = self.replies.get(request.path) or self.replies.get("*")
        if reply is None:
            return web.json_response({"error": {"message": f"mock: no reply for {request.path}"}}, status=404)
        if reply.chunks is None and reply.fault is None:
            return web.Response(status=reply.status, body=reply.body, content_type=None,
                                headers={"Content-Type": reply.content_type, **reply.headers})
        resp = web.StreamResponse(status=reply.status, headers={"Content-Type": reply.content_type, **reply.headers})
        await resp.prepare(request)
        chunks = reply.chunks or [reply.body]
        for i, chunk in enumerate(chunks):
            if i == len(chunks) - 1 and reply.release_last is not None:
                await asyncio.get_running_loop().run_in_executor(None, reply.release_last.wait, 10)
            await resp.write(chunk)
            if reply.fault == "reset":
                request.transport.abort()
                return resp
            if reply.delay:
                await asyncio.sleep(reply.delay)
        if reply.fault == "stall":
            await asyncio.sleep(3600)
        await resp.write_eof()
        return resp

    async def _start(self) -> None:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # Limits as generous as a real provider's, so header-size tests measure LMGate, not the mock.
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, max_line_size=1 << 20,
                                     max_field_size=1 << 20, max_headers=10000)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def start(self) -> "MockUpstream":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
