"""A scriptable mock provider on 127.0.0.1, run in its own thread so synchronous SDK clients can
call through LMGate to it from a test."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from tests.support.threaded_server import ThreadedServer




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
    # Computes the reply from the request body instead (e.g. answer as the provider would).
    dynamic: Callable[[bytes], "Reply"] | None = None


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes


class MockUpstream(ThreadedServer):
    def __init__(self) -> None:
        super().__init__()
        self.url = f"http://127.0.0.1:{self.port}"
        self.replies: dict[str, Reply] = {}
        self.seen: list[Seen] = []

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
        if reply.dynamic is not None:
            reply = reply.dynamic(body)
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
