"""The one settings object: config/lmgate.yaml, then LMGATE_<SECTION>__<KEY> environment overrides.

Every key must be present in the file and have the declared type; unknown keys are errors. The YAML
file is the single place defaults live, so the dataclasses below declare types only.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

import yaml

from lmgate.providers import PROVIDERS

ENV_PREFIX = "LMGATE_"
DEFAULT_CONFIG = Path("config/lmgate.yaml")


class ConfigError(Exception):
    """Bad configuration; the message is one line that names the file and key."""


@dataclasses.dataclass(frozen=True)
class ProxySettings:
    host: str
    port: int
    max_body_size: str
    max_header_size: str
    upstream_connect_timeout_seconds: float
    upstream_read_timeout_seconds: float
    ca_bundle: Path
    njs_module: str
    nginx_binary: str
    worker_processes: str
    runtime_dir: Path
    # "" = TLS off (a path is a string here because empty means off).
    tls_cert_path: str
    tls_key_path: str
    # 0 = no plain-HTTP port beside TLS.
    http_port: int


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    host: str
    port: int
    advertise_host: str
    auth_timeout_ms: int

    @property
    def reachable_host(self) -> str:
        """Host nginx dials to reach the sidecar."""
        if self.advertise_host:
            return self.advertise_host
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host


@dataclasses.dataclass(frozen=True)
class AuthSettings:
    allowlist_path: Path
    poll_interval_seconds: float
    cache_seconds: int


@dataclasses.dataclass(frozen=True)
class StatsSettings:
    output_path: Path
    flush_interval_seconds: float
    rotate_bytes: int
    capture_head_bytes: int
    capture_tail_bytes: int
    spool_dir: Path
    ensure_stream_usage: bool


@dataclasses.dataclass(frozen=True)
class ProviderSettings:
    upstream: str


@dataclasses.dataclass(frozen=True)
class ReportSettings:
    prices_path: Path


@dataclasses.dataclass(frozen=True)
class LoggingSettings:
    level: str


@dataclasses.dataclass(frozen=True)
class Settings:
    proxy: ProxySettings
    server: ServerSettings
    auth: AuthSettings
    stats: StatsSettings
    providers: dict[str, ProviderSettings]
    report: ReportSettings
    logging: LoggingSettings
    source: Path = Path("<defaults>")


def size_bytes(text: str) -> int:
    """An nginx size ("32k", "100m", "512") in bytes."""
    text = text.strip().lower()
    factor = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:], 1)
    return int(text[:-1] if factor != 1 else text) * factor


def load_settings(path: Path | str | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the YAML file, apply environment overrides, validate; raise ConfigError on any problem."""
    path = Path(path) if path else Path(os.environ.get("LMGATE_CONFIG", DEFAULT_CONFIG))
    environ = os.environ if environ is None else environ
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found (pass --config PATH)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" line {mark.line + 1}"
        elif isinstance(getattr(exc, "position", None), int):  # a reader error: a bad character
            where = f" line {text[:exc.position].count(chr(10)) + 1}"
        else:
            where = ""
        reason = getattr(exc, "problem", None) or getattr(exc, "reason", None) or str(exc)
        raise ConfigError(f"{path}:{where} invalid YAML: {' '.join(str(reason).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    _apply_env(raw, environ, path)
    settings = _build(Settings, raw, path, "")
    _validate(settings, path)
    return dataclasses.replace(settings, source=path)


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str], path: Path) -> None:
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name or name == "LMGATE_CONFIG":
            continue
        keys = name[len(ENV_PREFIX):].lower().split("__")
        node = raw
        for key in keys[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                raise ConfigError(f"{name}: unknown config key {'.'.join(keys)} (not in {path})")
            node = child
        if keys[-1] not in node:
            raise ConfigError(f"{name}: unknown config key {'.'.join(keys)} (not in {path})")
        # Strings from the environment are coerced later against the declared type.
        node[keys[-1]] = _EnvString(value)


class _EnvString(str):
    """A value that came from the environment: coerced to the key's type instead of type-checked."""


def _build(cls: type, raw: Any, path: Path, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: {prefix.rstrip('.') or 'top level'} must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.name != "source"]
    unknown = set(raw) - {f.name for f in fields}
    if unknown:
        raise ConfigError(f"{path}: unknown config key {prefix}{sorted(map(str, unknown))[0]}")
    values = {}
    for field in fields:
        key = prefix + field.name
        if field.name not in raw:
            raise ConfigError(f"{path}: missing config key {key}")
        values[field.name] = _convert(hints[field.name], raw[field.name], path, key)
    return cls(**values)


def _convert(hint: Any, value: Any, path: Path, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path, key + ".")
    if typing.get_origin(hint) is dict:
        _, item_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {key} must be a mapping")
        return {str(k): _convert(item_type, v, path, f"{key}.{k}") for k, v in value.items()}
    from_env = isinstance(value, _EnvString)
    try:
        if hint is bool:
            if from_env:
                lowered = value.strip().lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return lowered in ("true", "1", "yes")
            if isinstance(value, bool):
                return value
            raise ValueError
        if hint is int:
            if from_env:
                return int(value.strip())
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            raise ValueError
        if hint is float:
            if from_env:
                return float(value.strip())
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            raise ValueError
        if hint is str:
            if isinstance(value, (str, int)) and not isinstance(value, bool):
                return str(value)
            raise ValueError
        if hint is Path:
            if isinstance(value, str) and value:
                return Path(value)
            raise ValueError
    except ValueError:
        raise ConfigError(f"{path}: {key} must be {_type_name(hint)}, got {str(value)!r}") from None
    raise ConfigError(f"{path}: {key} has an unsupported type {hint}")  # a bug in this module


def _type_name(hint: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            Path: "a non-empty path"}.get(hint, str(hint))


def _validate(s: Settings, path: Path) -> None:
    for key, port in (("proxy.port", s.proxy.port), ("server.port", s.server.port)):
        if not 1 <= port <= 65535:
            raise ConfigError(f"{path}: {key} must be between 1 and 65535, got {port}")
    positive = {
        "auth.poll_interval_seconds": s.auth.poll_interval_seconds,
        "stats.flush_interval_seconds": s.stats.flush_interval_seconds,
        "stats.rotate_bytes": s.stats.rotate_bytes,
        "stats.capture_head_bytes": s.stats.capture_head_bytes,
        "stats.capture_tail_bytes": s.stats.capture_tail_bytes,
        "server.auth_timeout_ms": s.server.auth_timeout_ms,
        "proxy.upstream_connect_timeout_seconds": s.proxy.upstream_connect_timeout_seconds,
        "proxy.upstream_read_timeout_seconds": s.proxy.upstream_read_timeout_seconds,
    }
    if bool(s.proxy.tls_cert_path) != bool(s.proxy.tls_key_path):
        raise ConfigError(f"{path}: proxy.tls_cert_path and proxy.tls_key_path must be set together "
                          f"(both empty = TLS off)")
    if s.proxy.http_port:
        if not s.proxy.tls_cert_path:
            raise ConfigError(f"{path}: proxy.http_port is a plain-HTTP port beside TLS; set proxy.tls_cert_path "
                              f"and proxy.tls_key_path, or set it to 0 (proxy.port already speaks plain HTTP)")
        if not 1 <= s.proxy.http_port <= 65535 or s.proxy.http_port in (s.proxy.port, s.server.port):
            raise ConfigError(f"{path}: proxy.http_port must be 0 (off) or a port between 1 and 65535 other than "
                              f"proxy.port and server.port, got {s.proxy.http_port}")
    for key, value in positive.items():
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{path}: {key} must be greater than 0, got {value}")
    if s.auth.cache_seconds < 0:
        raise ConfigError(f"{path}: auth.cache_seconds must be 0 or more, got {s.auth.cache_seconds}")
    for key, size in (("proxy.max_body_size", s.proxy.max_body_size),
                      ("proxy.max_header_size", s.proxy.max_header_size)):
        try:
            size_bytes(size)
        except ValueError:
            raise ConfigError(f"{path}: {key} must be an nginx size like 512, 32k or 100m, got {size!r}") from None
    if s.logging.level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{path}: logging.level must be debug, info, warning or error, got {s.logging.level!r}")
    for name, provider in s.providers.items():
        if name not in PROVIDERS:
            raise ConfigError(f"{path}: unknown provider providers.{name} (known: {', '.join(PROVIDERS)})")
        url = urlsplit(provider.upstream)
        if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
            raise ConfigError(f"{path}: providers.{name}.upstream must be an http(s) URL without query, "
                              f"got {provider.upstream!r}")
    missing = [name for name in PROVIDERS if name not in s.providers]
    if missing:
        raise ConfigError(f"{path}: missing config key providers.{missing[0]}")

