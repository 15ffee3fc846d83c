"""The Kubernetes pod of deploy/kubernetes, run natively: the two containers' entrypoints with the
base's lmgate.yaml (LMGATE_CONFIG) and only what a machine needs changed (ports, folders, the
upstreams), the allow-list in a folder laid out and updated as the kubelet does a Secret's, and
the records on the sidecar's standard output.

Checked: the sidecar's startup and liveness probes, run as the rendered Deployment writes them,
pass; an allow-list update by symlink swap takes effect without a restart; the stop sequence (the
sidecar's preStop waits while nginx runs, then both get SIGTERM) ends with every call on stdout as
one JSON record, and nothing else on stdout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.test_container_entrypoints import (NGINX_SCRIPT, PROVIDERS, SIDECAR_SCRIPT, START_SECONDS,
                                                  Service, Upstream, call, kill_group, kill_pidfile)
from tests.support.gate import ALICE_KEY, CONFIG, UNLISTED_KEY, Gate, spool_dir
from tests.support.http import bearer, http_status
from tests.support.ports import free_port
from tests.support.secret_volume import SecretVolume
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "deploy" / "kubernetes" / "base"
OLD_KEY = "sk-lmgate-k8s-test-old-0123456789abcdef"
NEW_KEY = "sk-lmgate-k8s-test-new-fedcba9876543210"
HEADER = "id,api_key,owner,added\n"
POD_SPOOL = yaml.safe_load((BASE / "lmgate.yaml").read_text())["stats"]["spool_dir"]


def deployment() -> dict:
    docs = yaml.safe_load_all((BASE / "deployment.yaml").read_text())
    return next(d for d in docs if d and d["kind"] == "Deployment")


def container(name: str) -> dict:
    return next(c for c in deployment()["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def exec_command(argv: list[str], ports: dict[str, int], spool: Path) -> list[str]:
    """A probe's or hook's command as the manifest writes it, aimed at this test's ports and spool."""
    assert argv[0] in ("python", "sleep")
    argv = [sys.executable if argv[0] == "python" else argv[0], *argv[1:]]
    return [a.replace("127.0.0.1:8081", f"127.0.0.1:{ports['server']}")
             .replace(POD_SPOOL, str(spool)) for a in argv]


def test_pod_reloads_a_secret_update_and_ships_every_record_on_stdout(tmp_path):
    lmgate = Path(sys.executable).parent / "lmgate"
    assert lmgate.exists(), f"no lmgate next to {sys.executable}"
    upstream = Upstream()
    secret = SecretVolume(tmp_path / "allowlist")
    secret.write({"allowlist.csv": HEADER + f"old,{OLD_KEY},ops@example.com,2026-12-01\n"})
    ports = {"proxy": free_port(), "server": free_port(), "metrics": free_port()}
    spool = spool_dir(tmp_path)
    base = {k: v for k, v in os.environ.items() if not k.startswith("LMGATE_")}
    env = {
        **base,
        "PATH": f"{lmgate.parent}{os.pathsep}{base.get('PATH', '')}",
        "LMGATE_CONFIG": str(BASE / "lmgate.yaml"),
        "LMGATE_PROXY__HOST": "127.0.0.1",
        "LMGATE_PROXY__PORT": str(ports["proxy"]),
        "LMGATE_PROXY__WORKER_PROCESSES": "1",
        "LMGATE_PROXY__RUNTIME_DIR": str(tmp_path / "run"),
        "LMGATE_SERVER__PORT": str(ports["server"]),
        "LMGATE_METRICS__HOST": "127.0.0.1",
        "LMGATE_METRICS__PORT": str(ports["metrics"]),
        "LMGATE_AUTH__ALLOWLIST_PATH": str(secret.mount / "allowlist.csv"),
        "LMGATE_AUTH__POLL_INTERVAL_SECONDS": "0.2",
        "LMGATE_STATS__SPOOL_DIR": str(spool),
        # Longer than the test: the records reach stdout at the shutdown flush at the latest.
        "LMGATE_STATS__FLUSH_INTERVAL_SECONDS": "3600",
        **{f"LMGATE_PROVIDERS__{p.upper()}__UPSTREAM": upstream.url for p in PROVIDERS},
    }
    out_path, err_path = tmp_path / "sidecar.stdout", tmp_path / "sidecar.stderr"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        sidecar = subprocess.Popen([str(SIDECAR_SCRIPT)], env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=err, start_new_session=True)
    nginx = Service(NGINX_SCRIPT, env, tmp_path / "nginx.log")
    try:
        wait_until(lambda: http_status(f"http://127.0.0.1:{ports['proxy']}/healthz") == 200
                   or nginx.proc.poll() is not None, START_SECONDS, "nginx's /healthz")
        # The startup probe as the Deployment writes it: /readyz, which needs a call through
        # nginx to come back as a spool line.
        startup = exec_command(container("sidecar")["startupProbe"]["exec"]["command"], ports, spool)
        wait_until(lambda: subprocess.run(startup, capture_output=True, timeout=10).returncode == 0
                   or sidecar.poll() is not None, START_SECONDS, "the sidecar's startup probe")
        assert sidecar.poll() is None, err_path.read_text()
        assert nginx.alive(), nginx.log()
        liveness = exec_command(container("sidecar")["livenessProbe"]["exec"]["command"], ports, spool)
        assert subprocess.run(liveness, capture_output=True, timeout=10).returncode == 0

        made: list[tuple[str, int]] = []      # every call the client made: (key's id, status)

        def go(key: str) -> int:
            status = call(ports["proxy"], key)[0]
            made.append(("old" if key == OLD_KEY else "new", status))
            return status

        assert [go(OLD_KEY), go(NEW_KEY)] == [200, 403]
        # The Secret is updated: a new timestamped folder, `..data` swapped. No restart.
        secret.write({"allowlist.csv": HEADER + f"new,{NEW_KEY},ops@example.com,2026-12-05\n"})
        wait_until(lambda: go(NEW_KEY) == 200, 10, "the new key to be let in")
        # The old key's "yes" may still be in nginx's auth cache (auth.cache_seconds + 1 s).
        wait_until(lambda: go(OLD_KEY) == 403, 10, "the old key to be refused")
        assert [go(NEW_KEY) for _ in range(5)] == [200] * 5
        # Prometheus's port: /metrics, and not /auth.
        metrics = f"http://127.0.0.1:{ports['metrics']}"
        assert http_status(metrics + "/metrics") == 200 and http_status(metrics + "/auth") == 404

        # The stop sequence as the kubelet runs it: the sidecar's preStop waits while nginx runs.
        hook = subprocess.Popen(exec_command(container("sidecar")["lifecycle"]["preStop"]["exec"]["command"],
                                             ports, spool))
        time.sleep(1.5)
        assert hook.poll() is None, "the sidecar's preStop returned while nginx was running"
        # A call still in flight when nginx gets its SIGTERM; the sidecar gets its own as soon as
        # its hook returns, whatever nginx still does.
        slow_status: list[int] = []
        slow = threading.Thread(target=lambda: slow_status.append(call(ports["proxy"], NEW_KEY, "/slow")[0]))
        slow.start()
        wait_until(lambda: upstream.slow_calls, 5, "the slow call to reach the provider")
        nginx.proc.send_signal(signal.SIGTERM)
        assert hook.wait(20) == 0
        sidecar.send_signal(signal.SIGTERM)
        assert sidecar.wait(15) == 0, err_path.read_text()
        slow.join(10)
        assert slow_status == [200]
        made.append(("new", 200))
        assert nginx.proc.wait(10) == 0, nginx.log()
    finally:
        kill_group(sidecar)
        nginx.kill()
        kill_pidfile(tmp_path / "run" / "nginx.pid")
        upstream.stop()

    stdout = out_path.read_bytes()
    assert stdout.endswith(b"\n")
    records = [json.loads(line) for line in stdout.splitlines()]   # every line is a record
    # The readiness probe's own calls are not records: these are exactly the client's calls.
    assert len({r["request_id"] for r in records}) == len(records)
    # (Past 10 refusals in 10 s from one address, one record stands for the rest: folded_calls.)
    shipped = [(r["lmgate_id"] or "-", r["status"]) for r in records for _ in range(r.get("folded_calls") or 1)]
    assert sorted(shipped) == sorted((key if status == 200 else "-", status) for key, status in made)
    stderr = err_path.read_text()
    assert "sidecar listening" in stderr and "allow-list reloaded" in stderr
    for text in (stdout.decode(), stderr, nginx.log()):
        assert OLD_KEY not in text and NEW_KEY not in text


def test_lmgate_up_with_dash_prints_the_records_on_its_stdout_and_doctor_passes(mock_upstream, tmp_path):
    """Off Kubernetes too: `lmgate up` hands the sidecar's records to its own stdout, logs to
    stderr; `lmgate doctor` checks such a gate (its canary's record goes to that stdout)."""
    mock_upstream.reply("/v1/k8s/stdout", body=Upstream.BODY)
    g = Gate(tmp_path, mock_upstream.url, LMGATE_STATS__OUTPUT_PATH="-",
             LMGATE_PROVIDERS__ANTHROPIC__UPSTREAM=mock_upstream.url,
             LMGATE_PROVIDERS__OPENAI__UPSTREAM=mock_upstream.url)
    out_path, err_path = tmp_path / "up.stdout", tmp_path / "up.stderr"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "lmgate", "up", "--config", str(CONFIG)], env=g.env,
                                cwd=tmp_path, stdout=out, stderr=err, start_new_session=True)
    try:
        wait_until(lambda: http_status(g.url + "/healthz") == 200 and http_status(g.sidecar_url("/livez")) == 200
                   or proc.poll() is not None, START_SECONDS, "lmgate up to start")
        assert proc.poll() is None, err_path.read_text()
        with httpx.Client() as client:
            statuses = [client.post(g.base("openai") + "/v1/k8s/stdout", headers=bearer(key), content=b"{}").status_code
                        for key in (ALICE_KEY, UNLISTED_KEY, ALICE_KEY)]
        assert statuses == [200, 403, 200]
        doctor = subprocess.run([sys.executable, "-m", "lmgate", "doctor", "--config", str(CONFIG),
                                 "--format", "json"], env=g.env, cwd=tmp_path, capture_output=True, text=True,
                                timeout=90)
        checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert "standard output" in checks["canary"]["detail"] and "standard output" in checks["folders"]["detail"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, err_path.read_text()
    finally:
        kill_group(proc)
    records = [json.loads(line) for line in out_path.read_bytes().splitlines()]
    calls = [r for r in records if r["error_type"] != "canary"]
    assert [(r["endpoint"], r["status"]) for r in calls] == [("/openai/v1/k8s/stdout", s) for s in statuses]
    assert [r["error_type"] for r in records if r not in calls] == ["canary"]
    assert not (tmp_path / "-").exists() and not g.stats.exists()
    assert "sidecar listening" in err_path.read_text()
