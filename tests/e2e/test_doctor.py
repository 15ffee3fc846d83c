"""`lmgate doctor` against a running `lmgate up`, and the canary location it calls."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import httpx
import pytest

from tests.support.gate import ALICE_KEY, CONFIG, wait_until
from tests.support.tls_certs import TestCA
from tests.support.tls_upstream import TlsUpstream

pytestmark = pytest.mark.e2e

DOWN = "https://nonexistent.invalid"


def doctor(gate, *args: str, **env: str) -> tuple[int, str]:
    result = subprocess.run([sys.executable, "-m", "lmgate", "doctor", "--config", str(CONFIG), *args],
                            env={**gate.env, **env}, cwd=gate.workdir, capture_output=True, text=True,
                            timeout=90)
    return result.returncode, result.stdout + result.stderr


@pytest.fixture
def tls_upstream(tmp_path):
    ca = TestCA(tmp_path / "ca")
    upstream = TlsUpstream(*ca.issue("localhost", ["localhost"], ["127.0.0.1"])).start()
    yield upstream, ca
    upstream.stop()


def test_doctor_checks_a_running_gate(own_gate, mock_upstream, tls_upstream):
    upstream, ca = tls_upstream
    gate = own_gate(LMGATE_PROXY__CA_BUNDLE=str(ca.ca_file),
                    LMGATE_PROVIDERS__OPENAI__UPSTREAM=upstream.url("localhost"),
                    LMGATE_PROVIDERS__ANTHROPIC__UPSTREAM=DOWN)
    mark = gate.mark()
    seen = len(mock_upstream.seen)

    code, out = doctor(gate, "--format", "json")
    assert code == 1, out  # the anthropic upstream does not resolve
    report = json.loads(out)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] is False
    failing = sorted(name for name, c in checks.items() if not c["ok"])
    assert failing == ["provider anthropic"], out
    assert "nonexistent.invalid does not resolve" in checks["provider anthropic"]["detail"]
    assert checks["provider anthropic"]["fix"]
    assert "TLS" in checks["provider openai"]["detail"] and "verified" in checks["provider openai"]["detail"]
    assert re.search(r"2 keys from .*, loaded 20\d\d-\d\d-\d\dT", checks["allow-list"]["detail"])
    assert upstream.sni, "the TLS check reached the upstream with its name"

    # The canary came back as a record: marked, with no key, and nothing went to a provider.
    [canary] = [r for r in gate.new_records(mark, 1) if r["error_type"] == "canary"]
    assert canary["endpoint"].startswith("/_lmgate/canary/doctor-")
    assert (canary["status"], canary["lmgate_id"], canary["masked_key"]) == (204, None, None)
    assert len(mock_upstream.seen) == seen

    # Pointed at the working upstream, every check passes; one line each in text form.
    code, out = doctor(gate, LMGATE_PROVIDERS__ANTHROPIC__UPSTREAM=mock_upstream.url)
    assert code == 0, out
    lines = out.strip().splitlines()
    assert len(lines) == 6 + 1 + 4 and all(line.startswith("ok ") for line in lines), out


def test_doctor_names_what_is_wrong(own_gate, mock_upstream):
    gate = own_gate()
    gate.allowlist.write_text("id,api_key,owner,added\nalice,,alice@example.com,x\n")
    wait_until(lambda: httpx.get(gate.sidecar_url("/readyz")).json()["allowlist_last_error"], 10,
               "the broken allow-list to be refused")
    code, out = doctor(gate, "--url", f"http://127.0.0.1:{gate.sidecar_port}", "--format", "json")
    assert code == 1
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert not checks["allow-list"]["ok"]
    assert f"{gate.allowlist}:2" in checks["allow-list"]["detail"]
    assert not checks["sidecar"]["ok"]
    # --url pointed at the sidecar, not nginx: the canary says so.
    assert not checks["canary"]["ok"] and "not 204" in checks["canary"]["detail"]

    gate.stop()
    code, out = doctor(gate)
    assert code == 1
    assert "problem  sidecar" in out and "Connection refused" in out
    assert ALICE_KEY not in out
    # What Compose's sidecar container runs: the checks it can make from there (the providers
    # are left to nginx's container).
    code, out = doctor(gate, LMGATE_DOCTOR_SKIP="providers,sidecar,canary")
    assert code == 0, out
    assert [line.split()[1] for line in out.strip().splitlines()] == ["config", "nginx", "tls", "folders"]


def test_doctor_with_a_bad_config_names_it(own_gate, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.read_text().replace("port: 8080", "port: 99999", 1))
    result = subprocess.run([sys.executable, "-m", "lmgate", "doctor", "--config", str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stdout.startswith("problem  config") and "proxy.port" in result.stdout, result.stdout
    # Problems in LMGATE_* variables are all named, with the first one in the file.
    env = {**os.environ, "LMGATE_STATS__FLUSH_INTERVAL_SECONDS": "soon", "LMGATE_AUTH__NOPE": "1"}
    result = subprocess.run([sys.executable, "-m", "lmgate", "doctor", "--config", str(bad)],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1
    [line] = result.stdout.splitlines()
    for named in ("stats.flush_interval_seconds", "LMGATE_AUTH__NOPE", "proxy.port"):
        assert named in line, line


def test_canary_is_rate_limited_and_never_forwarded(own_gate, mock_upstream):
    gate = own_gate()
    mark = gate.mark()
    seen = len(mock_upstream.seen)
    with httpx.Client() as client:
        statuses = [client.post(f"{gate.url}/_lmgate/canary/flood", headers={"Authorization": f"Bearer {ALICE_KEY}"},
                                content=b"{}").status_code for _ in range(40)]
    assert set(statuses) == {204, 429}
    accepted = statuses.count(204)
    records = gate.new_records(mark, accepted)
    assert len(records) == accepted  # refused canary calls leave no record
    assert {r["error_type"] for r in records} == {"canary"}
    assert {r["lmgate_id"] for r in records} == {None}  # no key is checked, none is named
    assert len(mock_upstream.seen) == seen
