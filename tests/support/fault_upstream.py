"""A misbehaving provider on 127.0.0.1, written on raw sockets so every fault is exact.

The behaviour is chosen by the last segment of the request path (or the part of it after a ':'):

- ``/ok``          200 JSON with a Content-Length;
- ``/reset-early`` reads the request, then resets the connection (RST) before any answer;
- ``/close-early`` reads the request, then closes the connection (FIN) before any answer;
- ``/silent``      reads the request and never answers;
- ``/reset-mid``   sends the headers and the first SSE event of a chunked stream, then RST;
- ``/stall-mid``   sends the headers and the first SSE event, then never sends more;
- ``/slow-stream`` 50 SSE events, 0.1 s apart (a client can hang up half way).

Every wait is bounded (``MAX_HOLD`` seconds, or until ``stop()``), so a test run cannot hang here.
``closed_port()`` gives a port nothing listens on (connection refused).
"""

from __future__ import annotations

import socket
import struct
import threading
import time

from tests.support.ports import free_port

MAX_HOLD = 30.0
FIRST_EVENT = b'data: {"id":"evt-1","model":"gpt-4o-mini","choices":[{"delta":{"content":"Hel"}}]}\n\n'
OK_BODY = b'{"ok":true}'


def closed_port() -> int:
    """A TCP port on 127.0.0.1 with no listener (bound once, then released)."""
    return free_port()


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


_STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                b"Connection: close\r\n\r\n")


class FaultUpstream:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.paths: list[str] = []          # request targets seen, in order
        self.events_sent: dict[str, int] = {}  # /slow-stream: events written per request
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    # ---- lifecycle
    def start(self) -> "FaultUpstream":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        sock.settimeout(0.2)
        self._sock = sock
        t = threading.Thread(target=self._accept_loop, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in list(self._threads):
            t.join(3)
        if self._sock is not None:
            self._sock.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (socket.timeout, OSError):
                continue
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            with self._lock:
                self._threads = [x for x in self._threads if x.is_alive()]
                self._threads.append(t)

    # ---- one connection
    def _read_request(self, conn: socket.socket) -> str | None:
        conn.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            data += chunk
            if len(data) > 1 << 20:
                return None
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        while len(rest) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            rest += chunk
        target = lines[0].split(" ")[1]
        with self._lock:
            self.paths.append(target)
        return target

    def _hold(self) -> None:
        self._stop.wait(MAX_HOLD)

    @staticmethod
    def _reset(conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            target = self._read_request(conn)
            if target is None:
                conn.close()
                return
            # The last path segment, or what follows its last ':' (Google's .../models/m:method).
            mode = target.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
            if mode == "reset-early":
                self._reset(conn)
                return
            if mode == "close-early":
                conn.close()
                return
            if mode == "silent":
                self._hold()
                conn.close()
                return
            if mode in ("reset-mid", "stall-mid"):
                conn.sendall(_STREAM_HEAD + _chunk(FIRST_EVENT))
                if mode == "reset-mid":
                    time.sleep(0.05)  # let the first event reach the client before the reset
                    self._reset(conn)
                else:
                    self._hold()
                    conn.close()
                return
            if mode == "slow-stream":
                conn.sendall(_STREAM_HEAD)
                sent = 0
                try:
                    for i in range(50):
                        if self._stop.is_set():
                            break
                        conn.sendall(_chunk(f'data: {{"n":{i}}}\n\n'.encode()))
                        sent += 1
                        time.sleep(0.1)
                    conn.sendall(b"0\r\n\r\n")
                except OSError:
                    pass
                finally:
                    self.events_sent[target] = sent
                conn.close()
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                         + f"Content-Length: {len(OK_BODY)}\r\n\r\n".encode() + OK_BODY)
            conn.close()
        except OSError:
            try:
                conn.close()
            except OSError:
                pass
