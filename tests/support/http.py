"""Requests the tests send: through an SDK-free client, or byte for byte when a client would
normalise what is being tested (paths, repeated headers)."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

from lmgate.supervisor import http_ok  # noqa: F401 - the health check the tests share with `lmgate up`


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def http_status(url: str, timeout: float = 1) -> int | None:
    """The status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def raw_request(port: int, data: bytes, timeout: float = 10) -> tuple[int | None, dict[str, str], bytes]:
    """Send bytes as they are to 127.0.0.1:port; return status, headers, body (None: no answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # nginx may answer and close before it has read everything (413)
        received = b""
        while not _complete(received):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    if not received.partition(b"\r\n\r\n")[0]:
        return None, {}, b""
    return parse_response(received)


def _complete(received: bytes) -> bool:
    """A whole response with a Content-Length has arrived (nginx may linger before closing)."""
    head, sep, body = received.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def parse_response(received: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, lower-cased headers and body of a raw HTTP/1.1 response."""
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ")[1]), headers, body
