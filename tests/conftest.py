"""Shared fixtures. Test layers are pytest markers: unit, integration, e2e (real nginx), slow."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.support.gate import Gate
from tests.support.mock_upstream import MockUpstream

REPO = Path(__file__).resolve().parents[1]
# Real recorded provider responses (read in place, never copied): ../shared/fixtures by default.
FIXTURES_DIR = Path(os.environ.get("LMGATE_FIXTURES_DIR", REPO.parent / "shared" / "fixtures"))


def nginx_available() -> bool:
    return bool(shutil.which("nginx") or Path("/usr/sbin/nginx").exists())


def pytest_collection_modifyitems(config, items):
    if nginx_available():
        return
    skip = pytest.mark.skip(reason="nginx is not installed (scripts/setup.sh installs it)")
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def mock_upstream():
    mock = MockUpstream().start()
    yield mock
    mock.stop()


@pytest.fixture(scope="session")
def gate(mock_upstream, tmp_path_factory):
    """One LMGate (`lmgate up`) shared by the tests that do not disturb it."""
    g = Gate(tmp_path_factory.mktemp("gate"), mock_upstream.url).start()
    yield g
    g.stop()


@pytest.fixture
def own_gate(mock_upstream, tmp_path):
    """A private LMGate for tests that edit its allow-list, kill its sidecar or stop it."""
    gates = []

    def start(**env) -> Gate:
        g = Gate(tmp_path / f"gate{len(gates)}", mock_upstream.url, **env)
        gates.append(g)
        return g.start()

    yield start
    for g in gates:
        g.stop()
