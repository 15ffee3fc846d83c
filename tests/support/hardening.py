"""Helpers for the fault, bad-input and security tests (tests/e2e/test_faults.py,
tests/e2e/test_security.py, tests/integration/test_fuzz_sidecar.py)."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.gate import ALICE_KEY, BOB_KEY, UNLISTED_KEY, Gate


class KnownBug(AssertionError):
    """A failure that a test marks `xfail(strict=True, raises=KnownBug)`: only this assertion is
    expected to fail, so any other broken assertion in the same test still fails the run."""


def known_bug(condition: bool, message: str) -> None:
    if not condition:
        raise KnownBug(message)


# ---- every API key the fault and security tests send (besides gate.py's three); every output
# is grepped for all of them.
CAROL_KEY = "sk-lmgate-test-carol-a1b2c3d4e5f60718"
QUERY_KEY = "AIzaSy-lmgate-test-query-9f8e7d6c5b4a3"  # unlisted; sent in the `key` query parameter
COMMA_KEY = "sk-lmgate-test,comma-0123456789abcd"
QUOTE_KEY = 'sk-lmgate-test"quote-0123456789abcd'
EXTRA_KEYS = (CAROL_KEY, QUERY_KEY, COMMA_KEY, QUOTE_KEY)
SUITE_KEYS = (ALICE_KEY, BOB_KEY, UNLISTED_KEY) + EXTRA_KEYS


def find_leaks(texts: dict[str, str], keys=SUITE_KEYS) -> list[str]:
    """`where: key` for every full key found in any of the texts."""
    return [f"{where}: {key}" for where, text in texts.items() for key in keys if key in text]


def gate_outputs(g: Gate) -> dict[str, str]:
    """Everything a gate wrote: its log (supervisor + sidecar + nginx stderr) and stats files."""
    out = {"log": g.log()}
    for path in sorted(g.stats.parent.glob(g.stats.stem + "*" + g.stats.suffix)):
        out[path.name] = path.read_text(errors="replace")
    return out


# ---- processes
def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def alive(pid: int) -> bool:
    """True while the process runs (a zombie waiting to be reaped counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    state = next((line.split()[1] for line in status.splitlines() if line.startswith("State:")), "?")
    return state not in ("Z", "X")


def nginx_master_pid(g: Gate) -> int:
    return int((g.workdir / "run" / "nginx.pid").read_text().strip())


def log_count(g: Gate, needle: str) -> int:
    return sum(needle in line for line in g.log().splitlines())


def readyz(g: Gate) -> tuple[int, dict]:
    resp = httpx.get(g.sidecar_url("/readyz"), timeout=2)
    return resp.status_code, resp.json()


# ---- background load from threads (for faults injected while calls are in flight)
@dataclass
class Call:
    started: float
    elapsed: float
    status: int | None
    content_type: str
    body: bytes
    error: str | None = None


@dataclass
class Load:
    """`threads` synchronous clients calling `request(client)` until stopped or `max_seconds`."""

    url: str
    headers: dict[str, str]
    threads: int = 4
    max_seconds: float = 20.0
    body: bytes = b"{}"
    calls: list[Call] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set() and time.monotonic() < deadline:
                started = time.monotonic()
                try:
                    resp = client.post(self.url, headers=self.headers, content=self.body)
                    call = Call(started, time.monotonic() - started, resp.status_code,
                                resp.headers.get("content-type", ""), resp.content)
                except httpx.HTTPError as exc:
                    call = Call(started, time.monotonic() - started, None, "", b"", repr(exc))
                with self._lock:
                    self.calls.append(call)

    def start(self) -> "Load":
        for _ in range(self.threads):
            t = threading.Thread(target=self._run, daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def stop(self) -> list[Call]:
        self._stop.set()
        for t in self._workers:
            t.join(15)
        return list(self.calls)

    def count(self) -> int:
        with self._lock:
            return len(self.calls)


def set_mtime_past(path: Path, seconds: float = 5) -> None:
    when = time.time_ns() - int(seconds * 1e9)
    os.utime(path, ns=(when, when))
