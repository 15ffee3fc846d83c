"""LMGate as a user runs it: `python -m lmgate up` in a subprocess, configured only through the
shipped config/lmgate.yaml plus LMGATE_* environment variables, against a mock upstream."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from lmgate.settings import StatsSettings
from tests.support.http import bearer, http_ok  # noqa: F401 - bearer: for tests that import it from here
from tests.support.ports import free_port
from tests.support.wait import wait_until

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config" / "lmgate.yaml"

# Keys used by the tests; every output is grepped for them (they must never appear in full).
ALICE_KEY = "sk-lmgate-test-alice-0123456789abcdef"
BOB_KEY = "sk-lmgate-test-bob-fedcba9876543210"
UNLISTED_KEY = "sk-lmgate-test-unlisted-000000000000"
ALLOWLIST = (
    "id,api_key,owner,added\n"
    f"alice,{ALICE_KEY},alice@example.com,2026-01-01\n"
    # Bob's key is stored hashed, as the README recommends.
    "bob,sha256:{bob_hash},bob@example.com,2026-01-02\n"
)


def spool_dir(workdir: Path) -> Path:
    """The spool folder for a gate in `workdir`. Run as root, nginx's workers (nobody) must reach
    it, and pytest's folders are private to root: it goes under /tmp then, removed at exit."""
    if os.geteuid() != 0:
        return workdir / "spool"
    folder = Path(tempfile.mkdtemp(prefix="lmgate-test-spool-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def https_ok(url: str, context: ssl.SSLContext) -> bool:
    """http_ok over HTTPS, trusting `context`'s CA."""
    try:
        with urllib.request.urlopen(url, timeout=1, context=context) as resp:
            return resp.status == 200
    except OSError:
        return False


# The shipped bound on refusal records, for the tests of it (Gate's default records every one).
FOLDING = {"LMGATE_STATS__REFUSAL_RECORDS_PER_WINDOW": str(StatsSettings().refusal_records_per_window)}


class Gate:
    def __init__(self, workdir: Path, upstream_url: str, tls: ssl.SSLContext | None = None, **env: str) -> None:
        """`tls`: the context a client trusting the gate's certificate uses (with TLS settings in `env`)."""
        import hashlib
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.allowlist = workdir / "allowlist.csv"
        self.allowlist.write_text(ALLOWLIST.format(bob_hash=hashlib.sha256(BOB_KEY.encode()).hexdigest()))
        self.stats = workdir / "stats.jsonl"
        self.log_path = workdir / "lmgate.log"
        self.port = free_port()
        self.sidecar_port = free_port()
        self.spool = spool_dir(workdir)
        self.env = {
            **os.environ,
            "LMGATE_PROXY__HOST": "127.0.0.1",
            "LMGATE_PROXY__PORT": str(self.port),
            "LMGATE_PROXY__RUNTIME_DIR": str(workdir / "run"),
            "LMGATE_PROXY__WORKER_PROCESSES": "1",
            "LMGATE_SERVER__PORT": str(self.sidecar_port),
            "LMGATE_AUTH__ALLOWLIST_PATH": str(self.allowlist),
            "LMGATE_AUTH__POLL_INTERVAL_SECONDS": "0.2",
            # Gates shared by many tests record every refusal at once; the tests of the bound
            # (test_security's floods) ask for the shipped one (FOLDING).
            "LMGATE_STATS__REFUSAL_RECORDS_PER_WINDOW": "1000000",
            # The tests of revocation and of a sidecar outage expect every call to be checked;
            # test_auth_cache_* turn the cache on.
            "LMGATE_AUTH__CACHE_SECONDS": "0",
            "LMGATE_STATS__OUTPUT_PATH": str(self.stats),
            "LMGATE_STATS__FLUSH_INTERVAL_SECONDS": "0.1",
            "LMGATE_STATS__SPOOL_DIR": str(self.spool),
            **{f"LMGATE_PROVIDERS__{p.upper()}__UPSTREAM": upstream_url
               for p in ("openai", "anthropic", "google", "gemini")},
            **env,
        }
        self.proc: subprocess.Popen | None = None
        self.tls = tls
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"

    def add_key(self, id: str, key: str, owner: str) -> str:
        """Append a row to the allow-list; return the text it had before."""
        text = self.allowlist.read_text()
        self.allowlist.write_text(text + f"{id},{key},{owner},2026-02-01\n")
        return text

    def base(self, provider: str) -> str:
        return f"{self.url}/{provider}"

    def start(self, command: str = "up") -> "Gate":
        """`lmgate up` (both processes) or `lmgate nginx` (nginx alone: the sidecar is down)."""
        self.command = command
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "lmgate", command, "--config", str(CONFIG)],
                                     env=self.env, cwd=self.workdir, stdout=self._log, stderr=subprocess.STDOUT)
        wait_until(lambda: self._healthy() or self._died(), 20, f"lmgate {command} to start")
        if self.proc.poll() is not None:
            raise AssertionError(f"lmgate {command} exited {self.proc.returncode}:\n{self.log()}")
        return self

    def _died(self) -> bool:
        return self.proc.poll() is not None

    def _healthy(self) -> bool:
        up = https_ok(self.url + "/healthz", self.tls) if self.tls else http_ok(self.url + "/healthz")
        return up and (self.command == "nginx" or http_ok(self.sidecar_url("/livez")))

    def sidecar_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.sidecar_port}{path}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"lmgate did not stop within {timeout}s:\n{self.log()}") from None
        self._log.close()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ---- stats
    def records(self) -> list[dict]:
        if not self.stats.exists():
            return []
        return [json.loads(line) for line in self.stats.read_text().splitlines() if line.strip()]

    def mark(self) -> int:
        return len(self.records())

    def new_records(self, mark: int, expect: int, timeout: float = 10) -> list[dict]:
        """The records written after `mark`: waits for `expect` of them, then checks no more come."""
        wait_until(lambda: len(self.records()) - mark >= expect, timeout,
                   f"{expect} new stats records (have {len(self.records()) - mark})")
        time.sleep(0.3)  # longer than a flush interval: a doubled record would show up now
        return self.records()[mark:]

    def sidecar_pid(self) -> int:
        out = subprocess.run(["pgrep", "-f", f"lmgate serve --config {CONFIG}", "-P", str(self.proc.pid)],
                             capture_output=True, text=True).stdout.split()
        assert out, "no sidecar process found"
        return int(out[0])
