"""Supervising the processes: nginx in the foreground (its config rendered, its log lines
redacted, reloaded when a provider's address or the TLS certificate changes), and `lmgate up`,
which supervises the sidecar and nginx together on one machine.

The container runs the same pieces: its nginx service runs `lmgate nginx` (NginxProcess below)
and its sidecar service runs `lmgate serve`.
"""

from __future__ import annotations

import fcntl
import logging
import os
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
from lmgate.nginx_conf import HTTP_PORT_HOST, RenderError, find_nginx, remove_stale_socket, write_config
from lmgate.redact import redact
from lmgate.settings import Settings
from lmgate.spool import NGINX_STOPPED_NAME
from lmgate.tls import CertWatcher
from lmgate.upstreams import provider_hosts, resolve, unresolved_providers
from lmgate.writer import STDOUT

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
        self._lock = lock_runtime_dir(self.runtime_dir)
        self.proc: subprocess.Popen | None = None
        hosts = {urlsplit(p.upstream).hostname for p in settings.providers.values()}
        hosts.add(settings.server.reachable_host)
        self._hosts = sorted(h for h in hosts if h)
        self._addresses = self._resolve()
        self._next_resolve = time.monotonic() + RESOLVE_INTERVAL_SECONDS
        # Providers whose host did not resolve: rendered to answer 502 until it does (upstreams.py).
        self.unresolved = unresolved_providers(settings, self._addresses)
        self._warn_unresolved(self.unresolved)
        self.conf = write_config(settings, self.runtime_dir / "nginx.conf", self.runtime_dir, self.unresolved)
        # TLS: the certificate and key are checked now, then watched for renewal (lmgate/tls.py).
        self.certs = CertWatcher(settings)

    def _resolve(self) -> dict[str, frozenset[str]]:
        # Unresolvable now: an empty set, and nginx keeps what it has.
        return {host: resolve(host) for host in self._hosts}

    def _warn_unresolved(self, names: frozenset[str]) -> None:
        hosts = provider_hosts(self.settings)
        for name in sorted(names):
            log.warning("provider %s: its upstream host %s does not resolve; its calls get a 502 "
                        "(upstream_unreachable) until it does (checked every %d s)",
                        name, hosts[name], RESOLVE_INTERVAL_SECONDS)

    def reload_if_addresses_changed(self) -> None:
        """Reload nginx (SIGHUP: graceful) when a host it dials now resolves elsewhere."""
        if time.monotonic() < self._next_resolve or self.proc is None or self.proc.poll() is not None:
            return
        self._next_resolve = time.monotonic() + RESOLVE_INTERVAL_SECONDS
        fresh = self._resolve()
        # A host rendered down (it did not resolve) is back when it resolves, even to its old address.
        down = {provider_hosts(self.settings)[name] for name in self.unresolved}
        changed = [h for h in self._hosts if fresh[h] and (fresh[h] != self._addresses.get(h) or h in down)]
        if changed:
            log.info("address of %s changed; reloading nginx", ", ".join(changed))
            self._addresses.update({h: fresh[h] for h in changed})
            # What does not resolve now would fail the reload: rendered to answer 502 instead.
            unresolved = unresolved_providers(self.settings, fresh)
            for name in sorted(self.unresolved - unresolved):
                log.info("provider %s: its upstream host resolves now; it is served again", name)
            self._warn_unresolved(unresolved - self.unresolved)
            self.unresolved = unresolved
            self.reload()

    def reload(self) -> None:
        """Reload nginx (SIGHUP: graceful, calls in flight finish on the old workers)."""
        # Rendered again first: the reload restarts nginx's connection serial numbers, and a
        # new instance id keeps request ids unique (nginx.conf.template, lmgate_spool); what does
        # not resolve now would fail the reload, so it is rendered to answer 502.
        try:
            write_config(self.settings, self.conf, self.runtime_dir, self.unresolved)
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
        remove_stale_socket(self.settings)
        try:
            self._stopped_marker().unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot remove %s: %s", self._stopped_marker(), exc.strerror or exc)
        # Own process group: a terminal's Ctrl-C reaches only the supervisor, which stops nginx
        # gracefully (nginx takes SIGINT as "stop now").
        self.proc = subprocess.Popen(self._cmd(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        threading.Thread(target=_pump, args=(self.proc.stdout, "nginx: "), daemon=True).start()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: finish in-flight requests
            try:
                self.proc.wait(self.settings.proxy.shutdown_timeout_seconds)
            except subprocess.TimeoutExpired:
                log.warning("calls still running %g s after the stop are cut now "
                            "(proxy.shutdown_timeout_seconds); they leave no record",
                            self.settings.proxy.shutdown_timeout_seconds)
                # The workers too (nginx's process group): a worker holding a WebSocket or a long
                # stream would outlive its master for up to the upstream read timeout.
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc:
            try:
                self._stopped_marker().touch()
            except OSError as exc:
                log.warning("cannot write %s: %s", self._stopped_marker(), exc.strerror or exc)

    def _stopped_marker(self) -> Path:
        return self.settings.stats.spool_dir / NGINX_STOPPED_NAME


def lock_runtime_dir(runtime_dir: Path) -> int:
    """Hold the runtime folder for this process's life (the descriptor returned), or raise
    StartError: two gates writing one nginx.conf and pid file would reload each other's config."""
    try:
        runtime_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(runtime_dir / "lmgate.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StartError(f"proxy.runtime_dir: cannot use {runtime_dir}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        raise StartError(f"another LMGate (pid {holder}) is running with the runtime folder {runtime_dir}; "
                         f"stop it, or give this one its own with proxy.runtime_dir "
                         f"(LMGATE_PROXY__RUNTIME_DIR)") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


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
        nginx.certs.poll(nginx.reload)
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
                                 ("proxy.http_port", HTTP_PORT_HOST, s.proxy.http_port),
                                 ("server.port", s.server.host, s.server.port)):
            if port and port_in_use(host, port, socket.SOCK_STREAM):
                raise StartError(f"port {port} on {host} ({what}) is already in use; stop what uses it "
                                 f"or set LMGATE_{what.upper().replace('.', '__')}")
        try:
            self.nginx = NginxProcess(s)
        except RenderError as exc:
            raise StartError(str(exc)) from None
        self.nginx.check()

    def _start_sidecar(self) -> None:
        cmd = [sys.executable, "-m", "lmgate", "serve", "--config", str(self.config_path)]
        # With stats.output_path "-" the sidecar's stdout is the records: ours, as they are.
        records_out = self.settings.stats.output_path == STDOUT
        self.sidecar = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                        stdout=None if records_out else subprocess.PIPE,
                                        stderr=subprocess.PIPE if records_out else subprocess.STDOUT,
                                        start_new_session=True)
        logs = self.sidecar.stderr if records_out else self.sidecar.stdout
        threading.Thread(target=_pump, args=(logs, ""), daemon=True).start()
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
            self.nginx.certs.poll(self.nginx.reload)
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

