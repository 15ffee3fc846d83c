"""An aiohttp server on 127.0.0.1 in its own thread and event loop, so that synchronous clients
(the providers' SDKs, httpx) can call it, directly or through LMGate, from a test."""

from __future__ import annotations

import asyncio
import ssl
import threading

from aiohttp import web

from tests.support.ports import free_port


class ThreadedServer:
    """Subclasses implement `_handle`; every path and method goes to it."""

    ssl_context: ssl.SSLContext | None = None
    # Limits as generous as a real provider's, so header-size tests measure LMGate, not the server.
    runner_options = {"max_line_size": 1 << 20, "max_field_size": 1 << 20, "max_headers": 10000}

    def __init__(self) -> None:
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def _start(self) -> None:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, **self.runner_options)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.ssl_context).start()

    def start(self):
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
