"""A mock of the providers' WebSocket APIs, written from their documentation, on 127.0.0.1:

- OpenAI Responses WebSocket mode, GET /v1/responses: the client sends `response.create` events; each
  is answered with the Responses stream events (`response.created` ... `response.completed`, whose
  `response.usage` has the counts).
- OpenAI Realtime, GET /v1/realtime?model=...: `session.created` first; each `response.create` is
  answered with `response.created`, deltas and `response.done` (`response.usage`, Realtime's
  `input_token_details`).
- Gemini Live, GET /ws/...BidiGenerateContent: `setup` is answered with `setupComplete`; each
  `clientContent` turn with `serverContent` messages, the last with `turnComplete` and
  `usageMetadata` (Live says `responseTokenCount`). Sent as binary frames, as the service does.

The model name steers faults: "...-fail" (response.failed / Realtime status failed), "...-error"
(an `error` event), "...-cut" (the mock closes the connection mid-response), "...-hang" (the answer
stops mid-response and waits for the client to go).
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import WSMsgType, web

from tests.support.threaded_server import ThreadedServer

RESPONSES_USAGE = {"input_tokens": 36, "input_tokens_details": {"cached_tokens": 8}, "output_tokens": 12,
                   "output_tokens_details": {"reasoning_tokens": 4}, "total_tokens": 48}
REALTIME_USAGE = {"total_tokens": 253, "input_tokens": 132, "output_tokens": 121,
                  "input_token_details": {"text_tokens": 119, "audio_tokens": 13, "image_tokens": 0,
                                          "cached_tokens": 64,
                                          "cached_tokens_details": {"text_tokens": 64, "audio_tokens": 0,
                                                                    "image_tokens": 0}},
                  "output_token_details": {"text_tokens": 30, "audio_tokens": 91}}
LIVE_USAGE = {"promptTokenCount": 21, "responseTokenCount": 9, "totalTokenCount": 30,
              "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 21}],
              "responseTokensDetails": [{"modality": "TEXT", "tokenCount": 9}]}


class WSUpstream(ThreadedServer):
    def __init__(self) -> None:
        super().__init__()
        self.url = f"http://127.0.0.1:{self.port}"
        self.handshakes: list[dict] = []        # headers and path of each handshake
        self.received: list[bytes | str] = []   # every message from clients, as received
        self.sent: list[bytes | str] = []       # every message to clients, as sent
        self.http_requests: list[str] = []     # plain HTTP requests (a client that fell back)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            self.http_requests.append(f"{request.method} {request.path}")
            return web.json_response({"error": {"message": "mock: WebSocket only"}}, status=400)
        path = request.path
        kind = ("responses" if path == "/v1/responses" else "realtime" if path == "/v1/realtime"
                else "live" if path.endswith("BidiGenerateContent") else None)
        if kind is None:
            return web.json_response({"error": {"message": f"mock: no WebSocket at {path}"}}, status=404)
        self.handshakes.append({"path_qs": request.path_qs, "headers": dict(request.headers)})
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        ws = web.WebSocketResponse(protocols=protocols[:1])
        await ws.prepare(request)
        send = self._sender(ws, binary=kind == "live")
        if kind == "realtime":
            await send({"type": "session.created", "event_id": "ev_1", "session": {
                "type": "realtime", "object": "realtime.session", "id": "sess_1",
                "model": request.query.get("model", "gpt-realtime")}})
        async for msg in ws:
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                break
            self.received.append(msg.data)
            event = json.loads(msg.data)
            if kind == "responses" and event.get("type") == "response.create":
                await self._responses(ws, send, event.get("model", "gpt-5"))
            elif kind == "realtime" and event.get("type") == "response.create":
                await self._realtime(ws, send, request.query.get("model", "gpt-realtime"))
            elif kind == "live" and "setup" in event:
                await send({"setupComplete": {}})
            elif kind == "live" and "clientContent" in event:
                await self._live(ws, send, self._live_model)
            if ws.closed:
                break
        return ws

    _live_model = "gemini-live-2.5-flash"

    def _sender(self, ws: web.WebSocketResponse, binary: bool):
        async def send(doc: dict) -> None:
            data = json.dumps(doc, separators=(",", ":"))
            self.sent.append(data.encode() if binary else data)
            if binary:
                await ws.send_bytes(data.encode())
            else:
                await ws.send_str(data)
        return send

    async def _fault(self, ws: web.WebSocketResponse, model: str) -> bool:
        """After the first deltas: True when the answer must stop here."""
        if model.endswith("-cut"):
            await ws.close(code=1011, message=b"mock: cut")
            return True
        if model.endswith("-hang"):   # until the other side closes (at most 30 s)
            try:
                while (await ws.receive(timeout=30)).type not in (WSMsgType.CLOSE, WSMsgType.CLOSED,
                                                                   WSMsgType.ERROR):
                    pass
            except asyncio.TimeoutError:
                pass
            return True
        return False

    async def _responses(self, ws, send, model: str) -> None:
        resolved = model if model.endswith(("-cut", "-hang", "-fail", "-error")) else f"{model}-2025-08-07"
        if model.endswith("-error"):
            await send({"type": "error", "sequence_number": 0, "code": "server_error",
                        "message": "The server had an error", "param": None})
            return

        def response(status: str, usage: dict | None) -> dict:
            return {"id": "resp_1", "object": "response", "created_at": 1764000000, "status": status,
                    "model": resolved, "output": [], "error": None, "incomplete_details": None,
                    "instructions": None, "metadata": {}, "parallel_tool_calls": True, "temperature": 1.0,
                    "tool_choice": "auto", "tools": [], "top_p": 1.0, "usage": usage}

        item = {"id": "msg_1", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
        await send({"type": "response.created", "sequence_number": 0, "response": response("in_progress", None)})
        await send({"type": "response.output_item.added", "sequence_number": 1, "output_index": 0, "item": item})
        for i, word in enumerate(("Hello", " there")):
            await send({"type": "response.output_text.delta", "sequence_number": i + 2, "item_id": "msg_1",
                        "output_index": 0, "content_index": 0, "delta": word, "logprobs": []})
        if await self._fault(ws, model):
            return
        done = {**item, "status": "completed",
                "content": [{"type": "output_text", "text": "Hello there", "annotations": [], "logprobs": []}]}
        await send({"type": "response.output_item.done", "sequence_number": 4, "output_index": 0, "item": done})
        if model.endswith("-fail"):
            failed = response("failed", RESPONSES_USAGE)
            failed["error"] = {"code": "server_error", "message": "The model failed"}
            await send({"type": "response.failed", "sequence_number": 5, "response": failed})
            return
        completed = response("completed", RESPONSES_USAGE)
        completed["output"] = [done]
        await send({"type": "response.completed", "sequence_number": 5, "response": completed})

    async def _realtime(self, ws, send, model: str) -> None:
        def response(status: str, usage: dict | None) -> dict:
            return {"object": "realtime.response", "id": "resp_rt1", "status": status, "status_details": None,
                    "output": [], "conversation_id": "conv_1", "output_modalities": ["text"],
                    "max_output_tokens": "inf", "audio": None, "usage": usage, "metadata": None}

        await send({"type": "response.created", "event_id": "ev_2", "response": response("in_progress", None)})
        await send({"type": "response.output_text.delta", "event_id": "ev_3", "response_id": "resp_rt1",
                    "item_id": "item_1", "output_index": 0, "content_index": 0, "delta": "Hi"})
        if await self._fault(ws, model):
            return
        status = "failed" if model.endswith("-fail") else "completed"
        await send({"type": "response.done", "event_id": "ev_4", "response": response(status, REALTIME_USAGE)})

    async def _live(self, ws, send, model: str) -> None:
        await send({"serverContent": {"modelTurn": {"role": "model", "parts": [{"text": "Hel"}]}}})
        await send({"serverContent": {"modelTurn": {"role": "model", "parts": [{"text": "lo"}]}}})
        await send({"serverContent": {"generationComplete": True}})
        await send({"serverContent": {"turnComplete": True}, "usageMetadata": LIVE_USAGE})
