"""The container entrypoints, run natively (there is no Docker engine in CI): the real
scripts/entrypoint-sidecar.sh and scripts/entrypoint-nginx.sh, configured the way
docker-compose.yaml configures them (shipped config/lmgate.yaml + LMGATE_* variables), with every
path in a temp folder, free loopback ports and the providers' upstreams on 127.0.0.1.

Checked: the config nginx renders at start passes `nginx -t`; both services come up and answer
the compose health checks (run as written in docker-compose.yaml); a call goes through nginx to
the sidecar and out to an upstream; SIGTERM, as `docker compose down` sends it, reaches the
process itself (the scripts `exec`), which exits 0 within seconds, the sidecar having written
the stats it still held.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.support.gate import spool_dir
from tests.support.http import http_status
from tests.support.wait import wait_until
from tests.support.ports import free_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SIDECAR_SCRIPT = REPO / "scripts" / "entrypoint-sidecar.sh"
NGINX_SCRIPT = REPO / "scripts" / "entrypoint-nginx.sh"
COMPOSE_FILE = REPO / "docker-compose.yaml"
PROVIDERS = ("openai", "anthropic", "google", "gemini")
ALLOWED_KEY = "sk-lmgate-docker-test-0123456789abcdef"
UNLISTED_KEY = "sk-lmgate-docker-test-unlisted-000000"
START_SECONDS = 20
STOP_SECONDS = 15  # well under compose's stop_grace_period


class Upstream:
    """A provider on 127.0.0.1 that answers every POST with a small OpenAI-style completion
    (after SLOW_SECONDS for a path under /slow/)."""

    SLOW_SECONDS = 3

    BODY = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-test",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}).encode()

    def __init__(self) -> None:
        body, upstream = self.BODY, self
        self.slow_calls = 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 (http.server's naming)
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if "/slow/" in self.path:
                    upstream.slow_calls += 1
                    time.sleep(Upstream.SLOW_SECONDS)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Service:
    """One entrypoint script started as a real process, its output in a log file."""

    def __init__(self, script: Path, env: dict[str, str], log: Path, *args: str) -> None:
        self.log_path = log
        self._log = open(log, "wb")
        # Started from another folder: the script itself must find the repository.
        self.proc = subprocess.Popen([str(script), *args], env=env, cwd=log.parent, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cmdline(self) -> list[str]:
        return Path(f"/proc/{self.proc.pid}/cmdline").read_bytes().decode().split("\0")[:-1]

    def terminate(self, timeout: float = STOP_SECONDS) -> int:
        """SIGTERM, as `docker compose stop` sends it; the exit code, within `timeout`."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.proc.args[0]} did not stop within {timeout}s of SIGTERM:\n"
                                 f"{self.log()}") from None

    def kill(self) -> None:
        """Cleanup: the script's whole process group (its own session), whatever is left of it."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            self.proc.wait(5)
        finally:
            self._log.close()


def kill_group(proc: subprocess.Popen) -> None:
    """Cleanup: a process started with start_new_session, and its group, if it still runs."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def kill_pidfile(pidfile: Path) -> None:
    """Stop an nginx left behind (only if a test failed half-way): `lmgate nginx` starts nginx in
    a session of its own, so its master's process group holds the master and its workers."""
    try:
        os.killpg(int(pidfile.read_text().strip()), signal.SIGKILL)
    except (OSError, ValueError):
        pass


@pytest.fixture
def upstream():
    up = Upstream()
    yield up
    up.stop()


@pytest.fixture
def layout(tmp_path, upstream):
    """The compose services' environment, transposed onto this machine."""
    lmgate = Path(sys.executable).parent / "lmgate"
    if not lmgate.exists():
        pytest.fail(f"no lmgate next to {sys.executable}: run the tests with the venv that scripts/setup.sh made")
    data = tmp_path / "data"
    data.mkdir()
    (data / "allowlist.csv").write_text(f"id,api_key,owner,added\n"
                                        f"docker-test,{ALLOWED_KEY},ops@example.com,2026-01-01\n")
    ports = {"proxy": free_port(), "server": free_port()}
    # Nothing inherited from the caller's LMGATE_* settings: only what is set here applies.
    base = {k: v for k, v in os.environ.items() if not k.startswith("LMGATE_")}
    base["PATH"] = f"{lmgate.parent}{os.pathsep}{base.get('PATH', '')}"
    shared = {
        **base,
        "LMGATE_SERVER__PORT": str(ports["server"]),
        # compose: ./data/spool, mounted into both containers.
        "LMGATE_STATS__SPOOL_DIR": str(spool_dir(tmp_path)),
        **{f"LMGATE_PROVIDERS__{p.upper()}__UPSTREAM": upstream.url for p in PROVIDERS},
    }
    sidecar_env = {
        **shared,
        # compose: 0.0.0.0 inside the container's own network namespace; loopback here.
        "LMGATE_SERVER__HOST": "127.0.0.1",
        "LMGATE_AUTH__ALLOWLIST_PATH": str(data / "allowlist.csv"),
        "LMGATE_AUTH__POLL_INTERVAL_SECONDS": "0.2",
        "LMGATE_STATS__OUTPUT_PATH": str(data / "stats.jsonl"),
        # Longer than the test: whatever is in the stats file was written by the shutdown flush.
        "LMGATE_STATS__FLUSH_INTERVAL_SECONDS": "3600",
    }
    nginx_env = {
        **shared,
        # compose: the sidecar's service name, `lmgate`.
        "LMGATE_SERVER__ADVERTISE_HOST": "127.0.0.1",
        "LMGATE_PROXY__HOST": "127.0.0.1",
        "LMGATE_PROXY__PORT": str(ports["proxy"]),
        "LMGATE_PROXY__RUNTIME_DIR": str(tmp_path / "run"),
        "LMGATE_PROXY__WORKER_PROCESSES": "1",
    }
    return {"tmp": tmp_path, "data": data, "ports": ports, "run": tmp_path / "run",
            "sidecar_env": sidecar_env, "nginx_env": nginx_env}


def compose_healthcheck(service: str, port: int, default_port: int) -> list[str]:
    """The service's health check from docker-compose.yaml, aimed at this test's port."""
    test = yaml.safe_load(COMPOSE_FILE.read_text())["services"][service]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    code = test[3]
    assert f"127.0.0.1:{default_port}/" in code
    return [sys.executable, "-c", code.replace(f"127.0.0.1:{default_port}/", f"127.0.0.1:{port}/")]


def run_healthcheck(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=REPO)


def call(port: int, key: str, under: str = "") -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/openai{under}/v1/chat/completions", method="POST",
        data=json.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_rendered_nginx_config_passes_nginx_t(layout):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    run = layout["run"]
    service = Service(NGINX_SCRIPT, layout["nginx_env"], layout["tmp"] / "nginx.log")
    try:
        wait_until(lambda: http_status(f"http://127.0.0.1:{layout['ports']['proxy']}/healthz") == 200
                   or not service.alive(), START_SECONDS, "nginx's /healthz")
        assert service.alive(), f"the nginx entrypoint exited {service.proc.returncode}:\n{service.log()}"
        conf = run / "nginx.conf"
        text = conf.read_text()
        assert f"listen 127.0.0.1:{layout['ports']['proxy']} " in text
        assert f"server 127.0.0.1:{layout['ports']['server']};" in text  # the sidecar, advertised
        assert f"pid {run}/nginx.pid;" in text
        result = subprocess.run([nginx, "-t", "-p", str(run), "-c", str(conf)],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert "test is successful" in result.stderr
        assert service.terminate() == 0, service.log()
    finally:
        service.kill()
        kill_pidfile(run / "nginx.pid")


def test_both_services_run_answer_health_checks_and_stop_on_sigterm(layout):
    ports, data = layout["ports"], layout["data"]
    sidecar = Service(SIDECAR_SCRIPT, layout["sidecar_env"], layout["tmp"] / "sidecar.log")
    nginx = None
    try:
        wait_until(lambda: http_status(f"http://127.0.0.1:{ports['server']}/readyz") == 200
                   or not sidecar.alive(), START_SECONDS, "the sidecar's /readyz")
        assert sidecar.alive(), f"the sidecar entrypoint exited {sidecar.proc.returncode}:\n{sidecar.log()}"
        # compose starts nginx once the sidecar's health check passes: run that check as written.
        sidecar_check = compose_healthcheck("lmgate", ports["server"], 8081)
        result = run_healthcheck(sidecar_check)
        assert result.returncode == 0, result.stderr

        nginx = Service(NGINX_SCRIPT, layout["nginx_env"], layout["tmp"] / "nginx.log")
        wait_until(lambda: http_status(f"http://127.0.0.1:{ports['proxy']}/healthz") == 200
                   or not nginx.alive(), START_SECONDS, "nginx's /healthz")
        assert nginx.alive(), f"the nginx entrypoint exited {nginx.proc.returncode}:\n{nginx.log()}"
        nginx_check = compose_healthcheck("nginx", ports["proxy"], 8080)
        result = run_healthcheck(nginx_check)
        assert result.returncode == 0, result.stderr

        # The scripts exec'd: the PIDs started are the Python processes themselves, so Docker's
        # stop signal reaches them and not a shell.
        for service, subcommand in ((sidecar, "serve"), (nginx, "nginx")):
            argv = service.cmdline()
            assert argv[-1] == subcommand and any(Path(a).name == "lmgate" for a in argv), argv
            assert not any(Path(a).name.startswith("entrypoint-") for a in argv), argv

        # Through nginx to the sidecar (auth) and on to the upstream; a key not on the list is refused.
        status, body = call(ports["proxy"], ALLOWED_KEY)
        assert status == 200 and body["usage"]["total_tokens"] == 4, body
        status, body = call(ports["proxy"], UNLISTED_KEY)
        assert status == 403 and body["error"]["code"] == "lmgate_forbidden", body

        # Both calls reached the sidecar through the spool; none is in the stats file yet.
        def reported() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports['server']}/readyz", timeout=1) as resp:
                return json.loads(resp.read())["stats_buffered"] >= 2
        wait_until(reported, 10, "both calls' records in the sidecar's buffer")
        assert not (data / "stats.jsonl").exists()

        # `docker compose down`: SIGTERM to each container's process, nginx (the dependent) first.
        nginx_pid = int((layout["run"] / "nginx.pid").read_text())
        started = time.monotonic()
        assert nginx.terminate() == 0, nginx.log()
        assert not Path(f"/proc/{nginx_pid}").exists() or _is_zombie(nginx_pid), "nginx outlived its entrypoint"
        assert sidecar.terminate() == 0, sidecar.log()
        assert time.monotonic() - started < STOP_SECONDS

        # The sidecar wrote what it held before exiting.
        records = [json.loads(line) for line in (data / "stats.jsonl").read_text().splitlines()]
        assert sorted(r["status"] for r in records) == [200, 403], records
        allowed = next(r for r in records if r["status"] == 200)
        assert allowed["lmgate_id"] == "docker-test" and allowed["total_tokens"] == 4, allowed
        for text in (sidecar.log(), nginx.log(), (data / "stats.jsonl").read_text()):
            assert ALLOWED_KEY not in text and UNLISTED_KEY not in text

        # Health checks fail once the services are gone (compose would report them unhealthy).
        assert run_healthcheck(sidecar_check).returncode != 0
        assert run_healthcheck(nginx_check).returncode != 0
    finally:
        for service in (nginx, sidecar):
            if service is not None:
                service.kill()
        kill_pidfile(layout["run"] / "nginx.pid")


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


def test_entrypoints_pass_their_arguments_on(layout, tmp_path):
    missing = tmp_path / "no-such-config.yaml"
    for script in (SIDECAR_SCRIPT, NGINX_SCRIPT):
        result = subprocess.run([str(script), "--config", str(missing)], env=layout["sidecar_env"],
                                capture_output=True, text=True, timeout=30, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert f"{missing}: config file not found" in result.stderr


def test_entrypoints_say_when_lmgate_is_not_on_path(layout, tmp_path):
    env = {**layout["sidecar_env"], "PATH": "/usr/bin:/bin"}
    if shutil.which("lmgate", path=env["PATH"]):
        pytest.skip("lmgate is installed system-wide")
    for script in (SIDECAR_SCRIPT, NGINX_SCRIPT):
        result = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=30, cwd=tmp_path)
        assert result.returncode == 127
        assert "lmgate is not on PATH" in result.stderr
