"""A local HTTPS provider for the TLS verification tests: a tiny aiohttp server on 127.0.0.1 that
presents a certificate from tests/support/tls_certs.py's TestCA."""

from __future__ import annotations

import ssl
from pathlib import Path

from aiohttp import web

from tests.support.threaded_server import ThreadedServer


class TlsUpstream(ThreadedServer):
    """HTTPS on 127.0.0.1:<port>, answering every request with 200 {"tls":"ok"}."""

    runner_options = {}

    def __init__(self, cert: Path, key: Path) -> None:
        super().__init__()
        self.seen: list[str] = []
        self.sni: list[str | None] = []
        self.ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ssl_context.load_cert_chain(cert, key)
        self.ssl_context.sni_callback = self._on_sni

    def url(self, host: str = "localhost") -> str:
        return f"https://{host}:{self.port}"

    def _on_sni(self, sslobj, server_name, ctx) -> None:
        self.sni.append(server_name)

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.seen.append(request.raw_path)
        return web.json_response({"tls": "ok"})
