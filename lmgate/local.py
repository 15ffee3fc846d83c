"""Running the processes: nginx in the foreground (with its log lines redacted), and `lmgate up`,
which supervises the sidecar and nginx together on one machine.

The container runs the same pieces: its nginx service runs `lmgate nginx` (NginxProcess below)
and its sidecar service runs `lmgate serve`.
"""

from __future__ import annotations

import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from lmgate.allowlist import AllowListError, load_allowlist
from lmgate.nginx_conf import RenderError, find_nginx, write_config
from lmgate.redact import redact
from lmgate.settings import Settings

log = logging.getLogger("lmgate.up")

SIDECAR_START_SECONDS = 15
# nginx resolves host names only when it (re)loads its config; this often the supervisor checks
# whether the sidecar's or a provider's address changed (a restarted container, DNS) and reloads.
RESOLVE_INTERVAL_SECONDS = 10
RESTART_BACKOFF_SECONDS = (0.2, 0.5, 1, 2, 5)


def client_url(host: str, port: int, scheme: str = "http") -> str:
    """A URL a user can open: a wildcard listen address is not one, so say loopback and, for
    other machines, the host's name."""
    if host in ("0.0.0.0", "", "::", "[::]"):
        return (f"{scheme}://127.0.0.1:{port}/<provider>/... (from other machines: "
                f"{scheme}://{socket.gethostname()}:{port}/<provider>/...)")
    where = f"[{host}]" if ":" in host else host
    return f"{scheme}://{where}:{port}/<provider>/..."


class StartError(Exception):
    """LMGate cannot start; one line with the reason (and a hint)."""


def _pump(stream, prefix: str) -> None:
    for raw in iter(stream.readline, b""):
        sys.stderr.write(prefix + redact(raw.decode("utf-8", "replace")))
        sys.stderr.flush()


_EMERG = re.compile(r"\[emerg\] \d+#\d+: (.*)")


class NginxProcess:
    """nginx with LMGate's rendered config, in the foreground, its stderr redacted onto ours."""

    def __init__(self, settings: Settings, runtime_dir: Path | None = None) -> None:
        self.settings = settings
        self.runtime_dir = (runtime_dir or settings.proxy.runtime_dir).resolve()
        self.binary = find_nginx(settings.proxy.nginx_binary)
        self.conf = write_config(settings, self.runtime_dir / "nginx.conf", self.runtime_dir)
        self.proc: subprocess.Popen | None = None
        hosts = {urlsplit(p.upstream).hostname for p in settings.providers.values()}
        hosts.add(settings.server.reachable_host)
        self._hosts = sorted(h for h in hosts if h)
        self._addresses = self._resolve()
        self._next_resolve = time.monotonic() + RESOLVE_INTERVAL_SECONDS

    def _resolve(self) -> dict[str, frozenset[str]]:
        addresses = {}
        for host in self._hosts:
            try:
                addresses[host] = frozenset(info[4][0] for info in socket.getaddrinfo(host, None))
            except OSError:
                addresses[host] = frozenset()  # unresolvable now: keep what nginx has
        return addresses

    def reload_if_addresses_changed(self) -> None:
        """Reload nginx (SIGHUP: graceful) when a host it dials now resolves elsewhere."""
        if time.monotonic() < self._next_resolve or self.proc is None or self.proc.poll() is not None:
            return
        self._next_resolve = time.monotonic() + RESOLVE_INTERVAL_SECONDS
        fresh = self._resolve()
        changed = [h for h in self._hosts if fresh[h] and fresh[h] != self._addresses.get(h)]
        if changed:
            log.info("address of %s changed; reloading nginx", ", ".join(changed))
            self._addresses.update({h: fresh[h] for h in changed})
            # Rendered again first: the reload restarts nginx's connection serial numbers, and a
            # new instance id keeps request ids unique (nginx.conf.template, lmgate_spool).
            try:
                write_config(self.settings, self.conf, self.runtime_dir)
            except (OSError, RenderError) as exc:
                log.error("cannot render nginx's config again (%s); reloading the one it has", exc)
            self.proc.send_signal(signal.SIGHUP)

    def _cmd(self, *extra: str) -> list[str]:
        return [str(self.binary), "-p", str(self.runtime_dir), "-c", str(self.conf), *extra]

    def check(self) -> None:
        result = subprocess.run(self._cmd("-t", "-q"), capture_output=True, text=True)
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines() or [""]
            # nginx's reason is its [emerg] line; its last line only says "test failed".
            reason = next((m.group(1) for m in map(_EMERG.search, lines) if m), lines[-1])
            raise StartError(f"nginx rejected the rendered config {self.conf}: {redact(reason)}")

    def start(self) -> None:
        # Own process group: a terminal's Ctrl-C reaches only the supervisor, which stops nginx
        # gracefully (nginx takes SIGINT as "stop now").
        self.proc = subprocess.Popen(self._cmd(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        threading.Thread(target=_pump, args=(self.proc.stdout, "nginx: "), daemon=True).start()

    def stop(self, timeout: float = 10) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: finish in-flight requests
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_nginx(settings: Settings) -> int:
    """`lmgate nginx`: render, check and run nginx until SIGTERM/SIGINT/SIGQUIT."""
    nginx = NginxProcess(settings)
    nginx.check()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, lambda *_: stop.set())
    nginx.start()
    log.info("nginx listening on %s:%d", settings.proxy.host, settings.proxy.port)
    while not stop.wait(0.5):
        if nginx.proc.poll() is not None:
            log.error("nginx exited with code %s", nginx.proc.returncode)
            return 1
        nginx.reload_if_addresses_changed()
    nginx.stop()
    return 0


def http_ok(url: str) -> bool:
    """A GET of `url` answers 200 within a second (a health check)."""
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def port_in_use(host: str, port: int, kind: int = socket.SOCK_STREAM) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


class Up:
    """`lmgate up`: the sidecar and nginx together, in the foreground."""

    def __init__(self, settings: Settings, config_path: Path) -> None:
        self.settings = settings
        self.config_path = config_path
        self.sidecar: subprocess.Popen | None = None
        self.nginx: NginxProcess | None = None
        self.stopping = threading.Event()

    def preflight(self) -> None:
        s = self.settings
        try:
            load_allowlist(s.auth.allowlist_path)
        except AllowListError as exc:
            raise StartError(str(exc)) from None
        for what, host, port in (("proxy.port", s.proxy.host, s.proxy.port),
                                 ("server.port", s.server.host, s.server.port)):
            if port_in_use(host, port, socket.SOCK_STREAM):
                raise StartError(f"port {port} on {host} ({what}) is already in use; stop what uses it "
                                 f"or set LMGATE_{what.upper().replace('.', '__')}")
        try:
            self.nginx = NginxProcess(s)
        except RenderError as exc:
            raise StartError(str(exc)) from None
        self.nginx.check()

    def _start_sidecar(self) -> None:
        cmd = [sys.executable, "-m", "lmgate", "serve", "--config", str(self.config_path)]
        self.sidecar = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        threading.Thread(target=_pump, args=(self.sidecar.stdout, ""), daemon=True).start()
        url = f"http://{self.settings.server.reachable_host}:{self.settings.server.port}/livez"
        deadline = time.monotonic() + SIDECAR_START_SECONDS
        while time.monotonic() < deadline:
            if self.sidecar.poll() is not None:
                raise StartError(f"the sidecar exited with code {self.sidecar.returncode} while starting "
                                 f"(see its message above)")
            if http_ok(url):
                return
            time.sleep(0.05)
        raise StartError(f"the sidecar did not answer on {url} within {SIDECAR_START_SECONDS}s")

    def run(self) -> int:
        self.preflight()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        try:
            self._start_sidecar()
            self.nginx.start()
            log.info("LMGate is up: clients use %s; sidecar %s:%d",
                     client_url(self.settings.proxy.host, self.settings.proxy.port,
                                "https" if self.settings.proxy.tls_cert_path else "http"),
                     self.settings.server.host, self.settings.server.port)
            return self._supervise()
        finally:
            self._stop()

    def _supervise(self) -> int:
        restarts = 0
        while not self.stopping.wait(0.2):
            if self.nginx.proc.poll() is not None:
                log.error("nginx exited with code %s; stopping", self.nginx.proc.returncode)
                return 1
            self.nginx.reload_if_addresses_changed()
            if self.sidecar.poll() is not None:
                # nginx fails closed (403) meanwhile; bring the sidecar back.
                delay = RESTART_BACKOFF_SECONDS[min(restarts, len(RESTART_BACKOFF_SECONDS) - 1)]
                log.error("the sidecar exited with code %s; restarting it in %gs",
                          self.sidecar.returncode, delay)
                if self.stopping.wait(delay):
                    break
                try:
                    self._start_sidecar()
                    log.info("the sidecar is back")
                    restarts = 0
                except StartError as exc:
                    log.error("%s", exc)
                    restarts += 1
        return 0

    def _stop(self) -> None:
        if self.nginx is not None:
            self.nginx.stop()
        if self.sidecar is not None and self.sidecar.poll() is None:
            self.sidecar.send_signal(signal.SIGTERM)  # flushes buffered stats
            try:
                self.sidecar.wait(15)
            except subprocess.TimeoutExpired:
                self.sidecar.kill()
                self.sidecar.wait()
        log.info("LMGate stopped")

