"""Parsing a raw HTTP response, for tests that talk to the gate byte for byte."""


def parse_response(received: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, lower-cased headers and body of a raw HTTP/1.1 response."""
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ")[1]), headers, body
