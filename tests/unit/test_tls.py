"""TLS on the front door without nginx: the settings, the rendered listen/ssl part, the check of a
certificate and key pair (lmgate/tls.py) and the renewal watcher's decisions."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import re
import shutil

import pytest

from lmgate import tls
from lmgate.nginx_conf import render
from lmgate.settings import ConfigError, load_settings
from lmgate.tls import CertWatcher, TLSError, certificate_expiry, certificate_status, check_pair
from tests.support.tls_certs import TestCA, fingerprint
from tests.unit.conftest import SHIPPED_CONFIG

pytestmark = pytest.mark.unit

@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> TestCA:
    if not shutil.which("openssl"):
        pytest.skip("the openssl command is not installed")
    return TestCA(tmp_path_factory.mktemp("pki"), intermediate=True)


def _settings(**env):
    return load_settings(SHIPPED_CONFIG, environ={f"LMGATE_PROXY__{k.upper()}": str(v) for k, v in env.items()})


# ---------------------------------------------------------------- settings

def test_tls_is_off_by_default():
    s = load_settings(SHIPPED_CONFIG, environ={})
    assert (s.proxy.tls_cert_path, s.proxy.tls_key_path, s.proxy.http_port) == ("", "", 0)


@pytest.mark.parametrize("env,expected", [
    ({"tls_cert_path": "/c.pem"}, "proxy.tls_cert_path and proxy.tls_key_path must be set together"),
    ({"tls_key_path": "/k.pem"}, "proxy.tls_cert_path and proxy.tls_key_path must be set together"),
    ({"http_port": "8000"}, "proxy.http_port is a plain-HTTP port beside TLS"),
    ({"tls_cert_path": "/c", "tls_key_path": "/k", "http_port": "8080"}, "proxy.http_port must be 0 (off) or"),
    ({"tls_cert_path": "/c", "tls_key_path": "/k", "http_port": "8081"}, "proxy.http_port must be 0 (off) or"),
    ({"tls_cert_path": "/c", "tls_key_path": "/k", "http_port": "70000"}, "proxy.http_port must be 0 (off) or"),
])
def test_tls_settings_errors_name_the_key(env, expected, one_line):
    with pytest.raises(ConfigError) as info:
        _settings(**env)
    assert expected in one_line(info.value)
    assert str(SHIPPED_CONFIG) in str(info.value)


# ---------------------------------------------------------------- the rendered config

def test_render_without_tls_has_no_ssl(tmp_path):
    text = render(load_settings(SHIPPED_CONFIG, environ={}), tmp_path, njs_module=None)
    assert "listen 0.0.0.0:8080 reuseport backlog=4096;" in text
    assert not re.search(r"^\s*(ssl_|listen .*ssl|error_page 497)", text, re.M)


def test_render_with_tls_listens_with_ssl_and_http2(tmp_path):
    s = _settings(tls_cert_path="/etc/tls dir/fullchain.pem", tls_key_path="rel/key.pem")
    text = render(s, tmp_path, njs_module=None)
    assert "listen 0.0.0.0:8080 ssl http2 reuseport backlog=4096;" in text
    assert 'ssl_certificate "/etc/tls dir/fullchain.pem";' in text
    assert f'ssl_certificate_key "{os.getcwd()}/rel/key.pem";' in text  # as the checks resolve it
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in text
    assert "error_page 497 = @lmgate_https_required;" in text
    assert len(re.findall(r"^\s*listen (?!unix:)", text, re.M)) == 1, "no plain-HTTP port unless asked"


def test_render_with_http_port_adds_a_plain_listener(tmp_path):
    s = _settings(tls_cert_path="/c.pem", tls_key_path="/k.pem", http_port=8000)
    text = render(s, tmp_path, njs_module=None)
    assert "listen 0.0.0.0:8080 ssl http2 reuseport backlog=4096;" in text
    assert "listen 127.0.0.1:8000 reuseport backlog=4096;" in text


# ---------------------------------------------------------------- the pair's check

def test_a_good_pair_with_its_chain_checks_out(ca, tmp_path):
    crt, key = ca.issue("good", ["localhost"], ["127.0.0.1"])
    info = check_pair(crt, key)
    assert info.sha256 == fingerprint(crt)
    assert info.subject == "CN=localhost"
    assert certificate_expiry(crt) == info.not_after
    assert info.not_after - datetime.datetime.now(datetime.timezone.utc) < datetime.timedelta(days=1, minutes=1)


def _bad(ca, tmp_path, case):
    crt, key = ca.issue(f"bad-{case}", ["localhost"])
    other_crt, other_key = ca.issue(f"other-{case}", ["localhost"])
    if case == "missing cert":
        crt = tmp_path / "nope.crt"
    elif case == "missing key":
        key = tmp_path / "nope.key"
    elif case == "garbage cert":
        crt.write_text("not a certificate\n")
    elif case == "key only in cert file":
        crt.write_bytes(key.read_bytes())
    elif case == "garbage key":
        key.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    elif case == "key of another cert":
        key = other_key
    elif case == "encrypted key":
        tls_dir = tmp_path / "enc"
        tls_dir.mkdir(exist_ok=True)
        enc = tls_dir / "enc.key"
        from tests.support.tls_certs import openssl
        openssl("pkey", "-in", key, "-out", enc, "-aes256", "-passout", "pass:secret")
        key = enc
    elif case == "expired":
        crt, key = ca.issue("expired", ["localhost"], days=-1)
    return crt, key


@pytest.mark.parametrize("case,setting,words", [
    ("missing cert", "proxy.tls_cert_path", "cannot read"),
    ("missing key", "proxy.tls_key_path", "cannot read"),
    ("garbage cert", "proxy.tls_cert_path", "holds no PEM certificate"),
    ("key only in cert file", "proxy.tls_cert_path", "holds no PEM certificate"),
    ("garbage key", "proxy.tls_key_path", "holds no usable PEM private key"),
    ("key of another cert", "proxy.tls_key_path", "is not the key of the certificate"),
    ("encrypted key", "proxy.tls_key_path", "is encrypted"),
    ("expired", "proxy.tls_cert_path", "expired on"),
])
def test_a_bad_pair_is_one_line_naming_the_setting_and_file(ca, tmp_path, case, setting, words, one_line):
    crt, key = _bad(ca, tmp_path, case)
    with pytest.raises(TLSError) as info:
        check_pair(crt, key)
    message = one_line(info.value)
    assert message.startswith(f"{setting}: "), message
    assert words in message
    named = crt if setting == "proxy.tls_cert_path" else key
    assert str(named) in message


# ---------------------------------------------------------------- the renewal watcher

class Reloads:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
def watched(ca, tmp_path, monkeypatch):
    """A watcher over live/tls.crt and live/tls.key, symlinks into a versioned folder (as a
    Kubernetes Secret volume has them), polled without waiting."""
    monkeypatch.setattr(tls, "SETTLE_SECONDS", 0)
    live = tmp_path / "live"
    live.mkdir()

    def publish(version: str, crt, key) -> None:
        folder = tmp_path / version
        folder.mkdir()
        shutil.copy(crt, folder / "tls.crt")
        shutil.copy(key, folder / "tls.key")
        tmp = tmp_path / "data.tmp"
        tmp.symlink_to(folder)
        os.replace(tmp, tmp_path / "data")  # one atomic swap, as the kubelet does

    publish("v1", *ca.issue("v1", ["localhost"]))
    (live / "tls.crt").symlink_to(tmp_path / "data" / "tls.crt")
    (live / "tls.key").symlink_to(tmp_path / "data" / "tls.key")
    s = _settings(tls_cert_path=live / "tls.crt", tls_key_path=live / "tls.key")
    s = dataclasses.replace(s, auth=dataclasses.replace(s.auth, poll_interval_seconds=0.001))
    watcher = CertWatcher(s)
    watcher.publish = publish
    watcher.live = live
    return watcher


def _poll(watcher, reload):
    watcher._next = 0
    return watcher.poll(reload)


def test_watcher_reloads_once_when_the_symlinked_pair_is_swapped(watched, ca):
    reload = Reloads()
    assert not _poll(watched, reload), "nothing changed yet"
    first = watched.info.sha256
    crt, key = ca.issue("v2", ["localhost"])
    watched.publish("v2", crt, key)
    assert _poll(watched, reload)
    assert reload.count == 1
    assert watched.info.sha256 == fingerprint(crt) != first
    assert not _poll(watched, reload) and reload.count == 1, "no second reload for the same files"


def test_watcher_waits_for_a_half_replaced_pair(watched, ca, caplog):
    """certbot writes the certificate, then the key: the first look sees a mismatch, which is not
    reported; once the key follows, nginx reloads."""
    reload = Reloads()
    crt, key = ca.issue("v2", ["localhost"])
    (watched.live / "tls.crt").resolve().write_bytes(crt.read_bytes())  # the certificate only
    with caplog.at_level(logging.ERROR, logger="lmgate.tls"):
        assert not _poll(watched, reload)
        (watched.live / "tls.key").resolve().write_bytes(key.read_bytes())
        assert _poll(watched, reload)
    assert reload.count == 1
    assert not caplog.records, "a pair caught half-written is not an error"


def test_watcher_refuses_a_bad_pair_once_and_keeps_the_previous(watched, ca, caplog):
    reload = Reloads()
    served = watched.info
    (watched.live / "tls.crt").resolve().write_text("garbage\n")
    with caplog.at_level(logging.ERROR, logger="lmgate.tls"):
        for _ in range(4):
            assert not _poll(watched, reload)
    assert reload.count == 0
    [record] = caplog.records
    message = record.getMessage()
    assert message.startswith(f"proxy.tls_cert_path: {watched.cert} holds no PEM certificate")
    assert f"nginx keeps serving the previous certificate (CN=localhost, serial {served.serial:x}" in message
    assert watched.info == served
    # Fixed: reloaded.
    crt, key = ca.issue("v3", ["localhost"])
    watched.publish("v3", crt, key)
    assert _poll(watched, reload) and reload.count == 1


def test_watcher_is_off_without_tls():
    watcher = CertWatcher(load_settings(SHIPPED_CONFIG, environ={}))
    assert not watcher.poll(lambda: pytest.fail("no reload without TLS"))


def test_a_key_every_user_can_read_is_warned_about(ca, tmp_path, caplog):
    crt, key = ca.issue("open", ["localhost"])
    s = _settings(tls_cert_path=crt, tls_key_path=key)
    for mode, warned in ((0o600, False), (0o640, False), (0o644, True)):
        key.chmod(mode)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lmgate.tls"):
            CertWatcher(s)
        messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert messages == ([f"proxy.tls_key_path: {key} is readable by every user of this machine; make it "
                             "readable by LMGate's user only (chmod o-r)"] if warned else []), oct(mode)


def test_certificate_status_for_doctor(ca, tmp_path):
    crt, key = ca.issue("doctor", ["localhost"])
    s = _settings(tls_cert_path=crt, tls_key_path=key)
    ok, what, fix = certificate_status(s)
    assert not ok and what.startswith(f"{crt}: CN=localhost, serial ") and "(0 days left)" in what
    assert fix.startswith("renew it")
    later = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=20)
    ok, what, fix = certificate_status(s, now=later)  # not valid yet then
    assert not ok and "is not valid before" in what
    far = ca.issue("far", ["localhost"], days=60)
    ok, what, _ = certificate_status(_settings(tls_cert_path=far[0], tls_key_path=far[1]))
    assert ok and "(59 days left)" in what
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=50)
    ok, what, fix = certificate_status(_settings(tls_cert_path=far[0], tls_key_path=far[1]), now=soon)
    assert not ok and "(9 days left)" in what
    ok, what, fix = certificate_status(load_settings(SHIPPED_CONFIG, environ={}))
    assert ok and what.startswith("TLS is off")
