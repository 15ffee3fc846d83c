"""The WebSocket relay: provider WebSocket APIs through LMGate, one record per response.

nginx's body filters never see upgraded traffic, so nginx hands every WebSocket handshake under a
provider prefix (after the same /auth check as any call) to this relay in the sidecar, at
`/ws/<provider>/<path as sent>`. The relay checks the key again (the sidecar's port must never be
an open door to the providers), connects to the provider's upstream (TLS verified against
proxy.ca_bundle), relays every frame both ways unchanged, and reads the provider's frames for usage:

- OpenAI Responses WebSocket mode (`/v1/responses`): `response.completed` / `response.incomplete`
  (usage), `response.failed` and `error` (stream_error);
- OpenAI Realtime (`/v1/realtime`): `response.done` (usage; status `failed` is a stream_error);
- Gemini Live (`...BidiGenerateContent`, Gemini API and Vertex AI): a turn ends at `turnComplete`,
  its usage is the last `usageMetadata` of the turn; the model is the client's `setup` message's.

Each response becomes one record, written by the same StatsWriter as the spool's records. A
connection closed in the middle of a response gets a record like a cut stream (client_closed, or
upstream_unreachable when the provider went away). The handshake is not a record of its own; a
refused key or a provider's refusal of the handshake is one.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
import uuid
from typing import Any, Callable
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import orjson
from aiohttp import web

from lmgate import records
from lmgate.keys import KeyProblem, extract_key, mask_key
from lmgate.providers import error_body, provider_answer_format
from lmgate.usage import STREAM_ERROR, USAGE_MISSING, Usage, websocket_counts

log = logging.getLogger("lmgate.ws")

# nginx hands handshakes to /ws/<provider>/<path> (nginx/provider.conf.template) with its request
# id in this header; each response's record adds "-<n>" to it.
PATH_PREFIX = "/ws"
REQUEST_ID_HEADER = "X-LMGate-Request-ID"
# Not forwarded to the provider: the handshake's own headers (aiohttp makes the upstream's),
# hop-by-hop headers, and LMGate's.
_NOT_FORWARDED = frozenset(h.lower() for h in (
    "Host", "Upgrade", "Connection", "Sec-WebSocket-Key", "Sec-WebSocket-Version",
    "Sec-WebSocket-Extensions", "Sec-WebSocket-Protocol", "Content-Length", "Transfer-Encoding",
    "Keep-Alive", "TE", "Trailer", "Proxy-Connection", "Accept-Encoding", REQUEST_ID_HEADER,
    "X-LMGate-ID", "X-LMGate-Owner", "X-LMGate-Key", "X-LMGate-Query", "X-LMGate-Reason",
    "X-Forwarded-For", "X-Real-IP"))
# The largest message relayed (Realtime audio and Live media can be large; aiohttp's default is 4 MB).
MAX_MESSAGE_BYTES = 64 << 20
_CLOSE = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
          aiohttp.WSMsgType.ERROR)

# Provider events worth parsing; every other frame (deltas, audio) is relayed without a look inside.
_OPENAI_EVENT = re.compile(rb'"type"\s*:\s*"(response\.(?:created|completed|incomplete|failed|done)'
                           rb'|error|session\.(?:created|updated))"')
_OPENAI_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed",
                              "response.done", "error"})


class _Response:
    """One response in progress on a connection: when it started, its bytes, what it reported."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.bytes = 0
        self.usage: dict | None = None
        self.model: str | None = None


class Tracker:
    """Reads the frames of one connection and emits a record per response."""

    def __init__(self, api: str, provider: str, endpoint: str, meta: dict[str, str],
                 emit: Callable[[dict[str, Any]], None], model: str | None = None) -> None:
        self.api, self.provider, self.endpoint, self.meta, self.emit = api, provider, endpoint, meta, emit
        self.model = model          # the connection's: the query's, the session's, Live's setup
        self.count = 0
        self.current: _Response | None = None
        self.turn_complete = False  # Gemini Live: the turn ended, its usage may still come
        self._realtime = "/realtime" in endpoint  # OpenAI Realtime: only response.done ends one

    # ---------------------------------------------------------------- frames

    def from_client(self, data: bytes | str) -> None:
        if self.api == "google" and self.model is None:
            raw = data.encode() if isinstance(data, str) else data
            if b'"setup"' in raw:
                doc = _json(raw)
                setup = doc.get("setup") if doc else None
                if isinstance(setup, dict) and isinstance(setup.get("model"), str):
                    self.model = setup["model"].rsplit("/", 1)[-1] or None

    def from_upstream(self, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        if self.api == "google":
            self._google(raw)
        else:
            self._openai(raw)

    def closed(self, by_client: bool) -> None:
        """The connection ended: a response still open is recorded as cut."""
        if self.current is None:
            return
        if self.api == "google" and self.turn_complete:
            self._finish(None)          # the turn had ended; its usage never came
        elif by_client:
            self._finish("client_closed", status=499)
        else:
            self._finish("upstream_unreachable")

    # ---------------------------------------------------------------- OpenAI

    def _openai(self, raw: bytes) -> None:
        match = _OPENAI_EVENT.search(raw)
        if match is None:
            if self.current is not None:
                self.current.bytes += len(raw)
            return
        doc = _json(raw)
        kind = doc.get("type") if doc else None
        if kind in ("session.created", "session.updated"):
            session = doc.get("session")
            if isinstance(session, dict) and isinstance(session.get("model"), str):
                self.model = session["model"]
            return
        response = doc.get("response") if doc else None
        response = response if isinstance(response, dict) else {}
        if kind == "error" and self._realtime:
            # Realtime's errors are most often about one client event; the response (if any) goes
            # on and ends with response.done.
            return
        if kind == "response.created" or self.current is None:
            if kind == "response.created" and self.current is not None:
                self.closed(by_client=False)  # a new response without the end of the last one
            self.current = self.current or _Response(time.time())
        current = self.current
        current.bytes += len(raw)
        current.model = _str(response.get("model")) or current.model
        if isinstance(response.get("usage"), dict):
            current.usage = response["usage"]
        if kind not in _OPENAI_TERMINAL:
            return
        failed = kind in ("response.failed", "error") or response.get("status") == "failed"
        self._finish(STREAM_ERROR if failed else None)

    # ---------------------------------------------------------------- Gemini Live

    def _google(self, raw: bytes) -> None:
        content = b'"serverContent"' in raw or b'"toolCall"' in raw
        has_usage = b'"usageMetadata"' in raw
        if self.turn_complete and content and not has_usage:
            self._finish(None)          # the next turn began: the last one's usage never came
        if self.current is None:
            if not (content or has_usage):
                return                  # setupComplete and the like: no response yet
            self.current = _Response(time.time())
        current = self.current
        current.bytes += len(raw)
        if not (has_usage or b'"turnComplete"' in raw):
            return
        doc = _json(raw) or {}
        if isinstance(doc.get("usageMetadata"), dict):
            current.usage = doc["usageMetadata"]
        server = doc.get("serverContent")
        if isinstance(server, dict) and server.get("turnComplete") is True:
            self.turn_complete = True
        if self.turn_complete and current.usage is not None:
            self._finish(None)

    # ---------------------------------------------------------------- records

    def _finish(self, error_type: str | None, status: int = 101) -> None:
        current, self.current, self.turn_complete = self.current, None, False
        if current is None:
            return
        self.count += 1
        usage = Usage(model=current.model or self.model, stream=True)
        if current.usage is not None:
            usage = Usage(usage.model, *websocket_counts(self.api, current.usage), stream=True)
        elif error_type is None:
            error_type = USAGE_MISSING
        now = time.time()
        meta = {**self.meta, "rid": f"{self.meta['rid']}-{self.count}", "ts": f"{now:.3f}",
                "t": f"{max(now - current.started, 0.0):.3f}"}
        self.emit(records._record(meta, self.endpoint, status, usage, error_type, now, self.api,
                                  current.bytes))


def _json(raw: bytes) -> dict | None:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


# ---------------------------------------------------------------- the handler


class Relay:
    """The aiohttp handler for /ws/<provider>/<path>; `lookup(key)` is the allow-list's."""

    def __init__(self, upstreams: dict[str, str], ca_bundle: str, lookup: Callable[[str], Any],
                 emit: Callable[[dict[str, Any]], None], connect_timeout: float) -> None:
        self.upstreams, self.lookup, self.emit = upstreams, lookup, emit
        self.ca_bundle, self.connect_timeout = ca_bundle, connect_timeout
        self._ssl: ssl.SSLContext | None = None
        self._session: aiohttp.ClientSession | None = None

    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=self.ca_bundle)
        return self._ssl

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        provider = request.match_info["provider"]
        raw = request.raw_path[len(PATH_PREFIX) + 1 + len(provider):] or "/"
        path, _, query = raw.partition("?")
        api = provider_answer_format(provider, path)
        endpoint = f"/{provider}{path}"
        meta = {"rid": request.headers.get(REQUEST_ID_HEADER) or f"ws-{uuid.uuid4().hex[:16]}",
                "p": provider, "m": request.method, "id": "", "own": "", "mk": ""}
        if provider not in self.upstreams:
            return web.Response(status=404, text=error_body(api, 404, "LMGate: unknown provider", "lmgate_not_found"),
                                content_type="application/json")
        # The key, checked as /auth checks it (lmgate.app.auth).
        try:
            key = extract_key(request.headers, query)
            entry = self.lookup(key)
            meta["mk"] = mask_key(key)
        except KeyProblem:
            entry = None
        if entry is None:
            self._refused(meta, endpoint, api, 403, "forbidden")
            return web.Response(status=403, content_type="application/json", text=error_body(
                api, 403, "LMGate refused this API key: it is missing or not on the gateway's allow-list.",
                "lmgate_forbidden"))
        meta.update(id=entry.id, own=entry.owner)
        model = _query_model(query)
        upstream_ws, failure = await self._connect(request, provider, api, raw)
        if upstream_ws is None:
            status, body, error = failure
            self._refused(meta, endpoint, api, status, error, model)
            return web.Response(status=status, body=body, content_type="application/json")
        client_ws = web.WebSocketResponse(protocols=(upstream_ws.protocol,) if upstream_ws.protocol else (),
                                          autoping=True, max_msg_size=MAX_MESSAGE_BYTES)
        try:
            await client_ws.prepare(request)
            tracker = Tracker(api, provider, endpoint, meta, self.emit, model)
            await self._relay(client_ws, upstream_ws, tracker)
        finally:
            await upstream_ws.close()
        return client_ws

    async def _connect(self, request: web.Request, provider: str, api: str, raw: str):
        """(the provider's WebSocket, None), or (None, (status, body, error_type)) for the client."""
        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(
                total=None, connect=self.connect_timeout))
        base = self.upstreams[provider].rstrip("/")
        url = urlsplit(base)
        scheme = "wss" if url.scheme == "https" else "ws"
        target = f"{scheme}://{url.netloc}{url.path}{raw}"
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED]
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        try:
            ws = await self._session.ws_connect(
                target, headers=headers, protocols=protocols, autoping=True, max_msg_size=MAX_MESSAGE_BYTES,
                ssl=self.ssl_context() if scheme == "wss" else False,
                timeout=aiohttp.ClientWSTimeout(ws_close=10), compress=0)
            return ws, None
        except aiohttp.WSServerHandshakeError as exc:
            # The provider refused the handshake (its status; aiohttp keeps no body).
            status = exc.status if exc.status >= 400 else 502
            error = "rate_limited" if status == 429 else "upstream_error"
            return None, (status, error_body(api, status, f"the {provider} upstream refused the WebSocket "
                                                          f"handshake ({exc.status})", "lmgate_upstream_refused"),
                          error)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            log.warning("ws: cannot reach the %s upstream: %s", provider, exc.__class__.__name__)
            return None, (502, error_body(api, 502, f"LMGate could not reach the {provider} upstream.",
                                          "lmgate_upstream_unreachable"), "upstream_unreachable")

    async def _relay(self, client_ws: web.WebSocketResponse, upstream_ws: aiohttp.ClientWebSocketResponse,
                     tracker: Tracker) -> None:
        async def pump(source, sink, observe: Callable[[bytes | str], None]) -> None:
            async for msg in source:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    observe(msg.data)
                    await sink.send_str(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    observe(msg.data)
                    await sink.send_bytes(msg.data)
                elif msg.type in _CLOSE:
                    break

        tasks = {asyncio.ensure_future(pump(upstream_ws, client_ws, tracker.from_upstream)): "upstream",
                 asyncio.ensure_future(pump(client_ws, upstream_ws, tracker.from_client)): "client"}
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:   # also when the sidecar stops: the open response is recorded
            for task in tasks:
                task.cancel()
            first = _first_to_end(tasks)
            tracker.closed(by_client=first == "client")
        for task in done:
            if task.exception() is not None and not isinstance(task.exception(), ConnectionError):
                log.warning("ws: relay ended: %s", task.exception().__class__.__name__)
        # Close codes travel on: the side still open gets the other's.
        if first == "client" and not upstream_ws.closed:
            await upstream_ws.close(code=client_ws.close_code or 1000)
        elif first == "upstream" and not client_ws.closed:
            await client_ws.close(code=upstream_ws.close_code or 1000)

    def _refused(self, meta: dict[str, str], endpoint: str, api: str, status: int, error_type: str,
                 model: str | None = None) -> None:
        now = time.time()
        self.emit(records._record({**meta, "ts": f"{now:.3f}", "t": "0"}, endpoint, status,
                                  Usage(model=model, stream=True), error_type, now, api, 0))


def _first_to_end(tasks: dict[asyncio.Future, str]) -> str:
    """Which side ended the relay. Both pumps may be done by the same wake-up: a client that left
    also fails the upstream pump's next write to it (a ConnectionError), so the client counts
    first; with neither done (the sidecar stops), the upstream."""
    ended = {side: task for task, side in tasks.items() if task.done() and not task.cancelled()}
    upstream = ended.get("upstream")
    if "client" in ended or (upstream is not None and isinstance(upstream.exception(), ConnectionError)):
        return "client"
    return "upstream"


def _query_model(query: str) -> str | None:
    """OpenAI Realtime names the model in the query (`?model=gpt-realtime`)."""
    if "model=" not in query:
        return None
    values = [v for k, v in parse_qsl(query) if k == "model" and v]
    return values[0] if values else None


def register(app: web.Application, settings, allowlist_key: web.AppKey, writer_key: web.AppKey) -> None:
    """Adds the relay's route to the sidecar app, with its upstream session closed at shutdown.
    Its records go to the app's stats writer, as the spool's do."""
    relay = Relay({name: p.upstream for name, p in settings.providers.items()}, str(settings.proxy.ca_bundle),
                  lambda key: app[allowlist_key].current.lookup(key), lambda record: app[writer_key].add(record),
                  settings.proxy.upstream_connect_timeout_seconds)

    async def relay_ctx(app: web.Application):
        yield
        await relay.close()

    # aiohttp ends the handlers (open relays add their records) before any cleanup: the writer's
    # final flush comes after them.
    app.cleanup_ctx.append(relay_ctx)
    app.router.add_get(PATH_PREFIX + "/{provider}/{path:.*}", relay.handle)
