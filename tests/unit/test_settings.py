"""lmgate.settings: the shipped YAML loads; every problem is a one-line ConfigError naming file and key."""

from __future__ import annotations

import dataclasses
import re

from pathlib import Path
from typing import Any

import pytest
import yaml

from lmgate.providers import PROVIDERS
from lmgate.settings import ConfigError, ProxySettings, Settings, _resolve_paths, defaults, load_settings

pytestmark = pytest.mark.unit

SHIPPED = Path(__file__).resolve().parents[2] / "config" / "lmgate.yaml"


def _paths(node: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of the shipped file, sections included."""
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            out.append(prefix + (key,))
            out.extend(_paths(value, prefix + (key,)))
    return out


SHIPPED_RAW = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
ALL_KEYS = _paths(SHIPPED_RAW)


def _at(raw: dict, path: tuple[str, ...]) -> dict:
    """The mapping that holds the last key of `path`."""
    for key in path[:-1]:
        raw = raw[key]
    return raw


LEAF_KEYS = [p for p in ALL_KEYS if not isinstance(_at(SHIPPED_RAW, p)[p[-1]], dict)]


def _error(path: Path, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={} if environ is None else environ)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, f"multi-line error: {message!r}"
    return message


# ---------------------------------------------------------------- the shipped file

def test_shipped_config_loads_with_documented_defaults():
    s = load_settings(SHIPPED, environ={})
    assert isinstance(s, Settings)
    assert s.source == SHIPPED
    assert s.proxy.port == 8080 and type(s.proxy.port) is int
    assert s.server.port == 8081
    assert s.proxy.upstream_connect_timeout_seconds == 10.0
    assert type(s.proxy.upstream_read_timeout_seconds) is float
    repo = SHIPPED.parents[1]           # relative paths: against config/, so ../data is data/
    assert s.auth.allowlist_path == repo / "data" / "allowlist.csv"
    assert s.stats.output_path == repo / "data" / "stats.jsonl"
    assert s.stats.rotate_bytes == 100_000_000
    assert s.stats.spool_dir == repo / "data" / "spool"
    assert s.report.prices_path == repo / "config" / "prices.yaml"
    assert s.proxy.runtime_dir == repo / "run"
    assert set(s.providers) == set(PROVIDERS)
    assert s.providers["openai"].upstream == "https://api.openai.com"
    assert s.providers["gemini"].upstream == "https://generativelanguage.googleapis.com"
    assert s.logging.level == "info"
    assert s.server.reachable_host == "127.0.0.1"


def test_shipped_config_ignores_non_lmgate_environment():
    env = {"PATH": "/usr/bin", "HOME": "/root", "LMGATEX__PROXY__PORT": "1", "LMGATE_PROXYPORT": "1",
           "lmgate_proxy__port": "1", "LMGATE_CONFIG": "/nonexistent.yaml", "XLMGATE_PROXY__PORT": "2"}
    assert load_settings(SHIPPED, environ=env) == load_settings(SHIPPED, environ={})


def test_reachable_host_follows_advertise_host_and_host(write_config):
    s = load_settings(write_config(lambda r: r["server"].update(advertise_host="sidecar")), environ={})
    assert s.server.reachable_host == "sidecar"
    s = load_settings(write_config(lambda r: r["server"].update(host="10.1.2.3")), environ={})
    assert s.server.reachable_host == "10.1.2.3"


# ---------------------------------------------------------------- required / unknown keys

def test_shipped_config_equals_the_defaults():
    """config/lmgate.yaml documents the defaults: the same keys, the same values."""
    assert SHIPPED_RAW == defaults()
    assert load_settings(SHIPPED, environ={}) == dataclasses.replace(
        _resolve_paths(Settings(), SHIPPED.parent), source=SHIPPED)


@pytest.fixture
def partial(tmp_path):
    """partial(text) -> a config file holding only `text`, in tmp_path/config/."""
    def write(text: str) -> Path:
        folder = tmp_path / "config"
        folder.mkdir(exist_ok=True)
        path = folder / "mine.yaml"
        path.write_text(text, encoding="utf-8")
        return path
    return write


@pytest.mark.parametrize("path", ALL_KEYS, ids=[".".join(p) for p in ALL_KEYS])
def test_every_key_is_optional(write_config, path):
    config = write_config(lambda raw: _at(raw, path).pop(path[-1]))
    assert load_settings(config, environ={}) == dataclasses.replace(
        load_settings(write_config(), environ={}), source=config)


def test_a_file_holds_only_what_it_changes(partial, tmp_path):
    s = load_settings(partial("proxy:\n  port: 9090\nstats:\n"), environ={"LMGATE_SERVER__PORT": "9091"})
    assert (s.proxy.port, s.server.port, s.proxy.host) == (9090, 9091, "0.0.0.0")
    assert s.stats.output_path == tmp_path / "data" / "stats.jsonl"     # default, beside config/
    assert load_settings(partial(""), environ={}).auth.cache_seconds == 1
    # env overrides work for keys the file does not hold
    s = load_settings(partial("logging:\n  level: debug\n"), environ={"LMGATE_STATS__ROTATE_BYTES": "7"})
    assert (s.logging.level, s.stats.rotate_bytes) == ("debug", 7)


def test_relative_paths_follow_the_config_file_not_the_working_directory(partial, tmp_path, monkeypatch):
    config = partial("auth:\n  allowlist_path: keys.csv\nstats:\n  spool_dir: /srv/spool\n")
    monkeypatch.chdir("/")
    s = load_settings(config, environ={"LMGATE_STATS__OUTPUT_PATH": "../out/stats.jsonl"})
    assert s.auth.allowlist_path == tmp_path / "config" / "keys.csv"
    assert s.stats.output_path == tmp_path / "out" / "stats.jsonl"
    assert s.stats.spool_dir == Path("/srv/spool")


def test_every_error_of_a_file_is_reported_at_once(partial):
    config = partial("proxy:\n  port: 0\n  colour: blue\nstats:\n  rotate_bytes: many\n"
                     "logging:\n  level: loud\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config, environ={"LMGATE_SERVER__PORT": "x", "LMGATE_NOPE__KEY": "1"})
    lines = str(info.value).splitlines()
    assert len(lines) == 6, lines
    assert all(ln.startswith((f"{config}: ", "LMGATE_")) for ln in lines)
    for key in ("proxy.colour", "proxy.port", "stats.rotate_bytes", "logging.level", "server.port", "nope.key"):
        assert sum(key in ln for ln in lines) == 1, key


def test_sections_check_only_what_a_command_reads(partial):
    config = partial("proxy:\n  port: 0\n  colour: blue\nstats:\n  rotate_bytes: 5\n")
    with pytest.raises(ConfigError):
        load_settings(config, environ={})
    s = load_settings(config, environ={"LMGATE_PROXY__PORT": "x"}, sections=("stats", "report"))
    assert s.stats.rotate_bytes == 5
    with pytest.raises(ConfigError, match="stats.rotate_bytes"):
        load_settings(partial("stats:\n  rotate_bytes: -1\n"), environ={}, sections=("stats", "report"))


@pytest.mark.parametrize("section", [(), ("proxy",), ("stats",), ("providers", "openai")],
                         ids=["top", "proxy", "stats", "providers.openai"])
def test_unknown_key_in_file_is_named(write_config, section):
    def add(raw):
        node = raw
        for key in section:
            node = node[key]
        node["colour"] = "blue"
    config = write_config(add)
    message = _error(config)
    assert "unknown config key " + ".".join(section + ("colour",)) in message
    assert str(config) in message


def test_unknown_keys_of_mixed_types_give_config_error(write_config):
    def add(raw):
        raw[1] = "a"
        raw["colour"] = "blue"
    with pytest.raises(ConfigError) as info:
        load_settings(write_config(add), environ={})
    assert [ln.rsplit(" ", 1)[-1] for ln in str(info.value).splitlines()] == ["1", "colour"]


def test_unknown_provider_is_named(write_config):
    message = _error(write_config(lambda r: r["providers"].update(mistral={"upstream": "https://x.ai"})))
    assert "unknown provider providers.mistral" in message


# ---------------------------------------------------------------- types

@pytest.mark.parametrize("path", LEAF_KEYS, ids=[".".join(p) for p in LEAF_KEYS])
def test_every_key_rejects_a_mapping_value(write_config, path):
    config = write_config(lambda raw: _at(raw, path).__setitem__(path[-1], {"wrong": 1}))
    message = _error(config)
    assert ".".join(path) in message
    assert "wrong" in message


@pytest.mark.parametrize("key,value,expected", [
    (("proxy", "port"), "8080", "proxy.port must be an integer, got '8080'"),
    (("proxy", "port"), True, "proxy.port must be an integer, got 'True'"),
    (("proxy", "port"), 80.5, "proxy.port must be an integer, got '80.5'"),
    (("stats", "rotate_bytes"), "lots", "stats.rotate_bytes must be an integer, got 'lots'"),
    (("stats", "flush_interval_seconds"), "soon", "stats.flush_interval_seconds must be a number, got 'soon'"),
    (("proxy", "host"), True, "proxy.host must be a string, got 'True'"),
    (("proxy", "host"), [1, 2], "proxy.host must be a string, got '[1, 2]'"),
    (("auth", "allowlist_path"), "", "auth.allowlist_path must be a non-empty path, got ''"),
    (("auth", "allowlist_path"), 5, "auth.allowlist_path must be a non-empty path, got '5'"),
    (("providers", "openai", "upstream"), None, "providers.openai.upstream must be a string, got 'None'"),
])
def test_wrong_type_names_key_and_value(write_config, key, value, expected):
    message = _error(write_config(lambda raw: _at(raw, key).__setitem__(key[-1], value)))
    assert expected in message


def test_section_that_is_not_a_mapping(write_config):
    assert "proxy must be a mapping" in _error(write_config(lambda r: r.__setitem__("proxy", 5)))
    assert "providers must be a mapping" in _error(write_config(lambda r: r.__setitem__("providers", [])))


def test_int_where_str_expected_is_accepted(write_config):
    s = load_settings(write_config(lambda r: r["proxy"].update(worker_processes=4)), environ={})
    assert s.proxy.worker_processes == "4"


def test_int_where_float_expected_becomes_float(write_config):
    s = load_settings(write_config(lambda r: r["stats"].update(flush_interval_seconds=2)), environ={})
    assert s.stats.flush_interval_seconds == 2.0 and type(s.stats.flush_interval_seconds) is float


# ---------------------------------------------------------------- values

@pytest.mark.parametrize("key", ["proxy.port", "server.port"])
@pytest.mark.parametrize("port", [0, -1, 65536, 100000])
def test_port_out_of_range(write_config, key, port):
    section, name = key.split(".")
    message = _error(write_config(lambda r: r[section].update({name: port})))
    assert f"{key} must be between 1 and 65535, got {port}" in message


@pytest.mark.parametrize("port", [1, 65535])
def test_port_limits_accepted(write_config, port):
    assert load_settings(write_config(lambda r: r["proxy"].update(port=port)), environ={}).proxy.port == port


@pytest.mark.parametrize("key", ["stats.rotate_bytes", "stats.flush_interval_seconds",
                                 "auth.poll_interval_seconds", "server.auth_timeout_ms",
                                 "stats.capture_head_bytes", "proxy.upstream_read_timeout_seconds"])
@pytest.mark.parametrize("value", [0, -5])
def test_non_positive_values_rejected(write_config, key, value):
    section, name = key.split(".")
    message = _error(write_config(lambda r: r[section].update({name: value})))
    assert f"{key} must be greater than 0" in message


@pytest.mark.parametrize("value", ["nan", "NaN"])
def test_nan_interval_rejected(value):
    with pytest.raises(ConfigError, match="stats.flush_interval_seconds"):
        load_settings(SHIPPED, environ={"LMGATE_STATS__FLUSH_INTERVAL_SECONDS": value})


def test_bad_logging_level(write_config):
    assert "logging.level" in _error(write_config(lambda r: r["logging"].update(level="verbose")))


@pytest.mark.parametrize("url", ["ftp://api.openai.com", "api.openai.com", "https://", "https://x.com/?a=1",
                                 "https://x.com/#frag", "", "http:///path"])
def test_bad_upstream_url(write_config, url):
    message = _error(write_config(lambda r: r["providers"]["openai"].update(upstream=url)))
    assert "providers.openai.upstream must be an http(s) URL" in message
    assert repr(url.split("?")[0]) .rstrip("'") in message  # a query is hidden: it may hold a key


@pytest.mark.parametrize("url", ["http://127.0.0.1:9000", "https://proxy.internal/base/path", "http://[::1]:81"])
def test_good_upstream_url(write_config, url):
    s = load_settings(write_config(lambda r: r["providers"]["anthropic"].update(upstream=url)), environ={})
    assert s.providers["anthropic"].upstream == url


# ---------------------------------------------------------------- environment overrides

def test_env_port_is_coerced_to_int():
    s = load_settings(SHIPPED, environ={"LMGATE_PROXY__PORT": "9090"})
    assert s.proxy.port == 9090 and type(s.proxy.port) is int


def test_env_value_whitespace_is_stripped_for_numbers():
    assert load_settings(SHIPPED, environ={"LMGATE_SERVER__PORT": " 9191 "}).server.port == 9191


def test_env_provider_upstream():
    s = load_settings(SHIPPED, environ={"LMGATE_PROVIDERS__OPENAI__UPSTREAM": "http://127.0.0.1:9000"})
    assert s.providers["openai"].upstream == "http://127.0.0.1:9000"
    assert s.providers["anthropic"].upstream == "https://api.anthropic.com"


def test_env_float_keys():
    s = load_settings(SHIPPED, environ={"LMGATE_STATS__FLUSH_INTERVAL_SECONDS": "0.25",
                                       "LMGATE_PROXY__UPSTREAM_CONNECT_TIMEOUT_SECONDS": "3"})
    assert s.stats.flush_interval_seconds == 0.25
    assert s.proxy.upstream_connect_timeout_seconds == 3.0
    assert type(s.proxy.upstream_connect_timeout_seconds) is float


def test_env_path_and_string_keys():
    s = load_settings(SHIPPED, environ={"LMGATE_AUTH__ALLOWLIST_PATH": "/etc/lmgate/keys.csv",
                                       "LMGATE_PROXY__WORKER_PROCESSES": "4",
                                       "LMGATE_SERVER__ADVERTISE_HOST": "sidecar"})
    assert s.auth.allowlist_path == Path("/etc/lmgate/keys.csv")
    assert s.proxy.worker_processes == "4"
    assert s.server.reachable_host == "sidecar"


def test_env_overrides_file_value(write_config):
    config = write_config(lambda r: r["stats"].update(capture_tail_bytes=7))
    assert load_settings(config, environ={}).stats.capture_tail_bytes == 7
    assert load_settings(config, environ={"LMGATE_STATS__CAPTURE_TAIL_BYTES": "9"}).stats.capture_tail_bytes == 9


def test_env_spool_dir():
    s = load_settings(SHIPPED, environ={"LMGATE_STATS__SPOOL_DIR": "/var/spool/lmgate"})
    assert s.stats.spool_dir == Path("/var/spool/lmgate")
    assert load_settings(SHIPPED, environ={}).stats.spool_dir == SHIPPED.parents[1] / "data" / "spool"


def test_spool_dir_in_file(write_config):
    s = load_settings(write_config(lambda r: r["stats"].update(spool_dir="/srv/spool")), environ={})
    assert s.stats.spool_dir == Path("/srv/spool")


@pytest.mark.parametrize("value", ["", 5, None])
def test_spool_dir_must_be_a_path(write_config, value):
    message = _error(write_config(lambda r: r["stats"].update(spool_dir=value)))
    assert "stats.spool_dir must be a non-empty path" in message


def test_empty_spool_dir_from_env_is_rejected():
    message = _error(SHIPPED, {"LMGATE_STATS__SPOOL_DIR": ""})
    assert "stats.spool_dir must be a non-empty path" in message


@pytest.mark.parametrize("name,value,key", [
    ("LMGATE_PROXY__PORT", "http", "proxy.port"),
    ("LMGATE_PROXY__PORT", "80.5", "proxy.port"),
    ("LMGATE_PROXY__PORT", "", "proxy.port"),
    ("LMGATE_STATS__FLUSH_INTERVAL_SECONDS", "ten", "stats.flush_interval_seconds"),
    ("LMGATE_STATS__ROTATE_BYTES", "100MB", "stats.rotate_bytes"),
    ("LMGATE_AUTH__ALLOWLIST_PATH", "", "auth.allowlist_path"),
])
def test_bad_env_value_names_key_and_value(name, value, key):
    message = _error(SHIPPED, {name: value})
    assert key in message or name in message
    assert repr(value) in message


def test_env_value_is_range_checked():
    assert "proxy.port must be between 1 and 65535, got 70000" in _error(SHIPPED, {"LMGATE_PROXY__PORT": "70000"})


def test_env_bad_upstream_rejected():
    message = _error(SHIPPED, {"LMGATE_PROVIDERS__GEMINI__UPSTREAM": "generativelanguage.googleapis.com"})
    assert "providers.gemini.upstream" in message


@pytest.mark.parametrize("name", ["LMGATE_PROXY__COLOUR", "LMGATE_NOPE__PORT", "LMGATE_PROVIDERS__MISTRAL__UPSTREAM",
                                  "LMGATE_PROXY__PORT__EXTRA", "LMGATE_PROVIDERS__OPENAI__URL"])
def test_unknown_env_key_is_an_error(name):
    message = _error(SHIPPED, {name: "1"})
    assert name in message
    assert "unknown config key" in message


def test_env_replacing_a_section_with_a_string_is_an_error():
    message = _error(SHIPPED, {"LMGATE_PROVIDERS__OPENAI": "https://x.com"})
    assert "providers.openai" in message


def test_env_does_not_leak_between_loads():
    load_settings(SHIPPED, environ={"LMGATE_PROXY__PORT": "9090"})
    assert load_settings(SHIPPED, environ={}).proxy.port == 8080


def test_config_path_from_lmgate_config_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LMGATE_CONFIG", str(SHIPPED))
    assert load_settings(None, environ={}).source == SHIPPED


# ---------------------------------------------------------------- unreadable files

def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.yaml"
    message = _error(path)
    assert str(path) in message and "not found" in message


@pytest.mark.parametrize("text,line", [
    ("proxy:\n  host: a\nserver: b\n  port: 3\n", 4),
    ("a: 1\nb: 2\nc: [1, 2\nd: 4\n", 4),
    ("proxy:\n  host: @x\n", 2),
    ("proxy: 1\n\tserver: 2\n", 2),
])
def test_invalid_yaml_names_file_and_line(tmp_path, text, line):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    message = _error(path)
    assert message.startswith(f"{path}: line {line} invalid YAML")


def test_control_character_in_yaml_is_a_one_line_error(tmp_path):
    path = tmp_path / "ctl.yaml"
    path.write_text("proxy:\n  host: a\x01b\n", encoding="utf-8")
    message = _error(path)
    assert str(path) in message and "line 2" in message


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_an_empty_file_is_the_defaults(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    assert load_settings(path, environ={}).proxy.port == 8080


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    message = _error(path)
    assert str(path) in message


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("proxy:\n  host: caf\xe9\n".encode("latin-1"))
    message = _error(path)
    assert str(path) in message


def test_directory_instead_of_file(tmp_path):
    message = _error(tmp_path)
    assert str(tmp_path) in message and "cannot read" in message


def test_up_prints_a_url_a_user_can_open(monkeypatch):
    import lmgate.supervisor as supervisor
    monkeypatch.setattr(supervisor.socket, "gethostname", lambda: "gatehost")
    assert supervisor.client_url("0.0.0.0", 8080) == ("http://127.0.0.1:8080/<provider>/... (from other "
                                                 "machines: http://gatehost:8080/<provider>/...)")
    assert supervisor.client_url("10.1.2.3", 9090) == "http://10.1.2.3:9090/<provider>/..."
    assert supervisor.client_url("::1", 9090) == "http://[::1]:9090/<provider>/..."
    assert supervisor.client_url("gate.example.com", 443, "https") == "https://gate.example.com:443/<provider>/..."


def test_cli_version_and_every_command_has_a_description_and_an_example(capsys):
    from lmgate import cli
    with pytest.raises(SystemExit) as done:
        cli.run(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("lmgate ")
    for name in cli._COMMANDS:
        with pytest.raises(SystemExit):
            cli.run([name, "--help"])
        out = capsys.readouterr().out
        description, example = cli._COMMANDS[name][1:]
        assert " ".join(description.split()[:4]) in " ".join(out.split())
        assert "example:\n  lmgate" in out or "example:\n  LMGATE_" in out or "example:\n  echo" in out


@dataclasses.dataclass(frozen=True)
class _ProxyWithKey(ProxySettings):
    client_ca_path: Path | None = None


@dataclasses.dataclass(frozen=True)
class _SettingsWithKey(Settings):
    proxy: _ProxyWithKey = _ProxyWithKey()


def test_an_optional_path_key_is_one_field_away(monkeypatch, partial, tmp_path):
    """What DEVELOPMENT.md promises a new key costs: a field with its default (the shipped YAML line
    is the other half, checked by test_shipped_config_equals_the_defaults)."""
    import lmgate.settings as settings_mod
    monkeypatch.setattr(settings_mod, "Settings", _SettingsWithKey)
    assert load_settings(partial(""), environ={}).proxy.client_ca_path is None
    s = load_settings(partial("proxy:\n  client_ca_path: certs/ca.pem\n"), environ={})
    assert s.proxy.client_ca_path == tmp_path / "config" / "certs" / "ca.pem"
    s = load_settings(partial("proxy:\n  client_ca_path: x.pem\n"), environ={"LMGATE_PROXY__CLIENT_CA_PATH": ""})
    assert s.proxy.client_ca_path is None
    with pytest.raises(ConfigError, match="proxy.client_ca_path must be a non-empty path"):
        load_settings(partial("proxy:\n  client_ca_path: 5\n"), environ={})


@pytest.mark.parametrize("text, message", [
    ("proxy:\n  tls_cert_path: /c.pem\n", "proxy.tls_cert_path and proxy.tls_key_path must be set together"),
    ("proxy:\n  http_port: 8000\n", "proxy.http_port is a plain-HTTP port beside TLS"),
    ("proxy:\n  tls_cert_path: /c\n  tls_key_path: /k\n  http_port: 8080\n", "proxy.http_port must be 0 (off) or"),
])
def test_tls_keys_default_to_off_and_are_checked_together(partial, text, message):
    s = load_settings(partial(""), environ={})
    assert (s.proxy.tls_cert_path, s.proxy.tls_key_path, s.proxy.http_port) == ("", "", 0)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(partial(text), environ={})


@pytest.mark.parametrize("port", ["8081", "8080", "70000", "-1"])
def test_a_metrics_port_must_be_a_free_port_of_its_own(partial, port):
    assert load_settings(partial(""), environ={}).metrics.port == 0
    assert load_settings(partial("metrics:\n  port: 9464\n"), environ={}).metrics.port == 9464
    with pytest.raises(ConfigError, match=re.escape(f"metrics.port must be 0 (none) or a port between 1 and "
                                                    f"65535 other than proxy.port and server.port, got {port}")):
        load_settings(partial(""), environ={"LMGATE_METRICS__PORT": port})


def test_cli_prints_every_config_error_on_its_own_line(partial, capsys):
    from lmgate import cli
    config = partial("proxy:\n  port: 0\nlogging:\n  level: loud\n")
    with pytest.raises(SystemExit) as done:
        cli.main(["render-nginx", "--config", str(config), "--out", "/dev/null"])
    lines = capsys.readouterr().err.splitlines()
    assert done.value.code == 2 and len(lines) == 2
    assert all(ln.startswith(f"lmgate: {config}: ") for ln in lines), lines


@pytest.mark.parametrize("url", ["https://api.openai.com:99999", "https://api.openai.com:abc", "https://[::1",
                                 "https://user:secret@api.openai.com",
                                 "https://api.openai.com/?key=sk-lmgate-test-settings-0123456789"])
def test_a_bad_upstream_url_is_one_line_naming_the_key_and_never_echoes_a_key(tmp_path, url):
    config = tmp_path / "lmgate.yaml"
    config.write_text(yaml.safe_dump({"providers": {"openai": {"upstream": url}}}))
    with pytest.raises(ConfigError) as info:
        load_settings(config, environ={})
    [line] = str(info.value).splitlines()
    assert "providers.openai.upstream" in line and "0123456789" not in line


def test_report_runs_from_a_config_of_ones_own_without_a_price_overrides_file(partial, tmp_path, capsys):
    """The overrides file is optional at its default place (next to the config); one named by the
    config or --prices must exist."""
    from lmgate import cli
    stats = tmp_path / "stats.jsonl"
    stats.write_text("")
    config = partial(f"stats:\n  output_path: {stats}\n")
    with pytest.raises(SystemExit) as done:
        cli.main(["report", "--config", str(config), "--format", "json"])
    assert done.value.code == 0, capsys.readouterr().err
    named = partial(f"stats:\n  output_path: {stats}\nreport:\n  prices_path: {tmp_path / 'typo.yaml'}\n")
    with pytest.raises(SystemExit) as done:
        cli.main(["report", "--config", str(named)])
    assert done.value.code == 2 and "typo.yaml: cannot read price file" in capsys.readouterr().err


def test_stats_output_path_dash_is_standard_output_not_a_file_beside_the_config():
    s = load_settings(SHIPPED, environ={"LMGATE_STATS__OUTPUT_PATH": "-", "LMGATE_STATS__SPOOL_DIR": "spool"})
    assert s.stats.output_path == Path("-")
    assert s.stats.spool_dir == SHIPPED.parent / "spool"      # other relative paths still resolve
