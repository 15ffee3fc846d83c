"""A provider whose host does not resolve is rendered to answer 502, and served again once it does."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from lmgate import supervisor, upstreams
from lmgate.nginx_conf import render
from lmgate.settings import load_settings
from tests.support.gate import spool_dir

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings(tmp_path, monkeypatch):
    monkeypatch.setenv("LMGATE_PROXY__RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("LMGATE_STATS__SPOOL_DIR", str(spool_dir(tmp_path)))
    monkeypatch.setenv("LMGATE_PROVIDERS__OPENAI__UPSTREAM", "https://down.example:8443")
    return load_settings(REPO / "config" / "lmgate.yaml")


def test_unresolved_provider_is_rendered_down(settings):
    text = render(settings, njs_module=None, unresolved=frozenset({"openai"}))
    block = text[text.index("upstream lmgate_up_openai"):]
    block = block[:block.index("}")]
    assert "server 127.0.0.1:8443 down;" in block and "down.example" not in block
    other = text[text.index("upstream lmgate_up_anthropic"):]
    assert "server api.anthropic.com:443;" in other[:other.index("}")]


class FakeNginx:
    def __init__(self):
        self.signals = []

    def poll(self):
        return None

    def send_signal(self, sig):
        self.signals.append(sig)


def test_supervisor_renders_again_when_the_host_resolves(settings, monkeypatch, caplog):
    dns = {"down.example": frozenset()}
    monkeypatch.setattr(supervisor, "resolve", lambda host: dns.get(host, frozenset({"192.0.2.1"})))
    monkeypatch.setattr(supervisor, "find_nginx", lambda setting: Path("/usr/sbin/nginx"))
    caplog.set_level("INFO", "lmgate.up")
    nginx = supervisor.NginxProcess(settings)
    assert nginx.unresolved == {"openai"}
    assert "server 127.0.0.1:8443 down;" in nginx.conf.read_text()
    assert "provider openai: its upstream host down.example does not resolve" in caplog.text
    nginx.proc = FakeNginx()

    nginx._next_resolve = 0
    nginx.reload_if_addresses_changed()
    assert nginx.proc.signals == []  # still unresolvable: nothing to reload

    dns["down.example"] = frozenset({"192.0.2.7"})
    nginx._next_resolve = 0
    nginx.reload_if_addresses_changed()
    assert nginx.proc.signals == [signal.SIGHUP]
    assert nginx.unresolved == frozenset()
    assert "server down.example:8443;" in nginx.conf.read_text()
    assert "provider openai: its upstream host resolves now" in caplog.text


def test_resolve_of_a_bad_name_is_empty():
    assert upstreams.resolve("nonexistent.invalid") == frozenset()
    assert upstreams.resolve("127.0.0.1") == frozenset({"127.0.0.1"})
