"""Start-up problems, end to end: `lmgate up` refuses to start with one line that names the cause
and the fix, instead of starting and then failing every call."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import httpx
import pytest

from tests.support.gate import ALICE_KEY, CONFIG, Gate, bearer

pytestmark = pytest.mark.e2e


def run_up(g: Gate, **env: str) -> subprocess.CompletedProcess:
    """`lmgate up` for a gate that must not start: its exit code and output."""
    return subprocess.run([sys.executable, "-m", "lmgate", "up", "--config", str(CONFIG)],
                          env={**g.env, **env}, cwd=g.workdir, capture_output=True, text=True, timeout=60)


def test_a_second_gate_on_the_same_runtime_folder_is_refused_and_the_first_keeps_its_config(
        own_gate, mock_upstream, tmp_path):
    first = own_gate()
    conf = first.workdir / "run" / "nginx.conf"
    before = conf.read_text()
    second = Gate(tmp_path / "second", mock_upstream.url, LMGATE_PROXY__RUNTIME_DIR=str(first.workdir / "run"))
    result = run_up(second)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("lmgate: another LMGate (pid ") and str(first.workdir / "run") in line
    assert "LMGATE_PROXY__RUNTIME_DIR" in line
    assert conf.read_text() == before
    mock_upstream.reply("/v1/startup-first", body=b'{"ok":true}')
    assert httpx.post(first.base("openai") + "/v1/startup-first", headers=bearer(ALICE_KEY)).status_code == 200


@pytest.mark.skipif(os.geteuid() != 0, reason="nginx's workers change user only when started as root")
def test_root_with_a_private_tmpdir_is_refused_at_start_naming_the_folder(mock_upstream, tmp_path):
    private = tempfile.mkdtemp(prefix="lmgate-private-")  # 0700, as `mktemp -d` makes
    try:
        g = Gate(tmp_path / "gate", mock_upstream.url)
        result = run_up(g, TMPDIR=private)
        assert result.returncode == 2
        [line] = result.stderr.strip().splitlines()
        assert private in line and "TMPDIR" in line and "nobody" in line and "closed to" in line
        assert "unreachable" not in result.stderr and "is up" not in result.stderr
    finally:
        shutil.rmtree(private)
