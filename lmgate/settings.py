"""The one settings object: defaults (below), then the YAML file, then LMGATE_<SECTION>__<KEY>.

The defaults live here, as the dataclasses' field defaults; config/lmgate.yaml shows the same values
with a comment each (a test keeps the two equal). A config file holds only what it changes. Unknown
keys and wrong types are errors, all reported at once, one line each naming the file and key.

Relative paths resolve against the folder of the config file in use, wherever they come from
(defaults, the file, the environment) and whatever the working directory: the shipped
config/lmgate.yaml says `../data/allowlist.csv`, i.e. data/ beside config/.

Adding a key: a field with its default in the section's dataclass below, plus the same line with a
comment in config/lmgate.yaml (DEVELOPMENT.md, "Adding a setting").
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
from lmgate.redact import redact

ENV_PREFIX = "LMGATE_"
DEFAULT_CONFIG = Path("config/lmgate.yaml")


class ConfigError(Exception):
    """Bad configuration; the message is one line that names the file and key."""


@dataclasses.dataclass(frozen=True)
class ProxySettings:
    host: str = "0.0.0.0"
    port: int = 8080
    max_body_size: str = "100m"
    max_header_size: str = "32k"
    upstream_connect_timeout_seconds: float = 10.0
    upstream_read_timeout_seconds: float = 600.0
    shutdown_timeout_seconds: float = 10.0
    ca_bundle: Path = Path("/etc/ssl/certs/ca-certificates.crt")
    njs_module: str = "auto"
    nginx_binary: str = "auto"
    worker_processes: str = "auto"
    runtime_dir: Path = Path("../run")
    # "" = TLS off (a path is a string here because empty means off).
    tls_cert_path: str = ""
    tls_key_path: str = ""
    # 0 = no plain-HTTP port beside TLS.
    http_port: int = 0


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8081
    advertise_host: str = ""
    auth_timeout_ms: int = 1000

    @property
    def reachable_host(self) -> str:
        """Host nginx dials to reach the sidecar."""
        if self.advertise_host:
            return self.advertise_host
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host


@dataclasses.dataclass(frozen=True)
class AuthSettings:
    allowlist_path: Path = Path("../data/allowlist.csv")
    poll_interval_seconds: float = 30.0
    cache_seconds: int = 1
    # "" = no owners file (a path is a string here because empty means none).
    owners_path: str = ""


@dataclasses.dataclass(frozen=True)
class StatsSettings:
    output_path: Path = Path("../data/stats.jsonl")
    flush_interval_seconds: float = 10.0
    rotate_bytes: int = 100_000_000
    capture_head_bytes: int = 16384
    capture_tail_bytes: int = 65536
    spool_dir: Path = Path("../data/spool")
    ensure_stream_usage: bool = True
    refusal_records_per_window: int = 10


@dataclasses.dataclass(frozen=True)
class ProviderSettings:
    upstream: str


# The providers' upstreams by default (the set of providers itself is lmgate/providers.py's).
DEFAULT_UPSTREAMS = {
    "openai": "https://api.openai.com",
    "anthropic": "https://api.anthropic.com",
    "google": "https://aiplatform.googleapis.com",
    "gemini": "https://generativelanguage.googleapis.com",
}


def _default_providers() -> dict[str, ProviderSettings]:
    return {name: ProviderSettings(url) for name, url in DEFAULT_UPSTREAMS.items()}


@dataclasses.dataclass(frozen=True)
class ReportSettings:
    prices_path: Path = Path("prices.yaml")


@dataclasses.dataclass(frozen=True)
class MetricsSettings:
    # owner and lmgate_id labels on the per-call metrics: one series per key (cardinality).
    per_key_labels: bool = False
    # 0 = /metrics on server.port only; else also on host:port, which answers /metrics alone.
    port: int = 0
    host: str = "127.0.0.1"


@dataclasses.dataclass(frozen=True)
class PolicySettings:
    # "" = counters in this sidecar's memory; redis://host:port/db = shared by every gate using it.
    redis_url: str = ""


@dataclasses.dataclass(frozen=True)
class LoggingSettings:
    level: str = "info"


@dataclasses.dataclass(frozen=True)
class Settings:
    proxy: ProxySettings = ProxySettings()
    server: ServerSettings = ServerSettings()
    auth: AuthSettings = AuthSettings()
    stats: StatsSettings = StatsSettings()
    providers: dict[str, ProviderSettings] = dataclasses.field(default_factory=_default_providers)
    report: ReportSettings = ReportSettings()
    metrics: MetricsSettings = MetricsSettings()
    policy: PolicySettings = PolicySettings()
    logging: LoggingSettings = LoggingSettings()
    source: Path = Path("<defaults>")


def size_bytes(text: str) -> int:
    """An nginx size ("32k", "100m", "512") in bytes."""
    text = text.strip().lower()
    factor = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:], 1)
    return int(text[:-1] if factor != 1 else text) * factor


def defaults() -> dict[str, Any]:
    """The defaults as the nested mapping a config file holds."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value
    raw = dataclasses.asdict(Settings())
    raw.pop("source")
    return plain(raw)


class _Errors(list):
    """Problems found so far, each one line naming the file (or variable) and key; `sections`
    holds the top-level section each one is about."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []

    def fail(self, message: str, key: str) -> None:
        self.append(message)
        self.sections.append(key.split(".")[0])


def load_settings(path: Path | str | None = None, environ: Mapping[str, str] | None = None,
                  sections: tuple[str, ...] | None = None) -> Settings:
    """Defaults, the YAML file, the environment; validated. A ConfigError lists every problem, one
    line each. With `sections`, only those sections are checked (the others keep their defaults
    when broken): `lmgate report` needs stats and report only."""
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
    if raw is None:
        raw = {}                         # an empty file: the defaults
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    errors = _Errors()
    merged = defaults()
    _merge(merged, raw, path, "", errors)
    _apply_env(merged, environ, errors)
    if sections is not None:
        errors[:] = [e for e, section in zip(errors, errors.sections, strict=True) if section in sections]
        keep = defaults()
        merged = {k: (merged[k] if k in sections else keep[k]) for k in keep}
    settings = _build(Settings, merged, path, "", errors)
    _validate(settings, path, errors, sections)
    if errors:
        raise ConfigError("\n".join(dict.fromkeys(errors)))
    return _resolve_paths(dataclasses.replace(settings, source=path), path.parent)


def _merge(base: dict[str, Any], raw: dict[Any, Any], path: Path, prefix: str, errors: _Errors) -> None:
    """The file's values over the defaults; a key the defaults lack is unknown."""
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if prefix == "providers." and isinstance(key, str) and key not in base and key not in PROVIDERS:
            errors.fail(f"{path}: unknown provider providers.{key} (known: {', '.join(PROVIDERS)})", name)
        elif key not in base:
            errors.fail(f"{path}: unknown config key {name}", name)
        elif isinstance(base[key], dict):
            if isinstance(value, dict):
                _merge(base[key], value, path, name + ".", errors)
            elif value is not None:      # `section:` left empty keeps the defaults
                errors.fail(f"{path}: {name} must be a mapping", name)
        else:
            base[key] = value


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str], errors: _Errors) -> None:
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name or name == "LMGATE_CONFIG":
            continue
        keys = name[len(ENV_PREFIX):].lower().split("__")
        node = raw
        for key in keys[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                node = None
                break
            node = child
        if node is None or keys[-1] not in node or isinstance(node[keys[-1]], dict):
            errors.fail(f"{name}: unknown config key {'.'.join(keys)}", ".".join(keys))
            continue
        # Strings from the environment are coerced later against the declared type.
        node[keys[-1]] = _EnvString(value)


class _EnvString(str):
    """A value that came from the environment: coerced to the key's type instead of type-checked."""


def _build(cls: type, raw: Any, path: Path, prefix: str, errors: _Errors) -> Any:
    """The dataclass from `raw`; a field that fails is noted in `errors` and keeps its default,
    so that the checks after still run and every problem is reported at once."""
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        if field.name == "source":
            continue
        try:
            value = _convert(hints[field.name], raw[field.name], path, prefix + field.name, errors)
        except ConfigError as exc:
            errors.fail(str(exc), prefix + field.name)
            value = None
        if value is None:
            if field.default_factory is not dataclasses.MISSING:
                value = field.default_factory()
            elif field.default is not dataclasses.MISSING:
                value = field.default
            else:
                return None             # no default (a provider's upstream): the caller's
        values[field.name] = value
    return cls(**values)


def _convert(hint: Any, value: Any, path: Path, key: str, errors: _Errors) -> Any:
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {key} must be a mapping")
        return _build(hint, value, path, key + ".", errors)
    if typing.get_origin(hint) is dict:
        _, item_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {key} must be a mapping")
        items = {str(k): _convert(item_type, v, path, f"{key}.{k}", errors) for k, v in value.items()}
        return None if any(v is None for v in items.values()) else items   # None: the default
    args = typing.get_args(hint)
    if type(None) in args and len(args) == 2:      # `X | None`: null (or "" from the environment)
        if value is None or (isinstance(value, _EnvString) and not value.strip()):
            return None
        hint = next(a for a in args if a is not type(None))
    where = path
    from_env = isinstance(value, _EnvString)
    if from_env:
        where = f"{ENV_PREFIX}{key.upper().replace('.', '__')}"
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
        raise ConfigError(f"{where}: {key} must be {_type_name(hint)}, got {str(value)!r}") from None
    raise ConfigError(f"{path}: {key} has an unsupported type {hint}")  # a bug in this module


def _type_name(hint: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            Path: "a non-empty path"}.get(hint, str(hint))


def _resolve_paths(settings: Any, folder: Path) -> Any:
    """Every relative Path field joined to `folder` (normalised: config/../data is data)."""
    if isinstance(settings, Path):
        return settings if settings.is_absolute() else Path(os.path.normpath(folder / settings))
    if isinstance(settings, dict):
        return {k: _resolve_paths(v, folder) for k, v in settings.items()}
    if dataclasses.is_dataclass(settings):
        # stats.output_path "-" is standard output (lmgate/writer.py), not a file beside the config.
        changes = {f.name: _resolve_paths(getattr(settings, f.name), folder)
                   for f in dataclasses.fields(settings) if f.name != "source"
                   and not (f.name == "output_path" and getattr(settings, f.name) == Path("-"))}
        if getattr(settings, "owners_path", ""):  # a path kept as a string ("" = none)
            changes["owners_path"] = str(_resolve_paths(Path(settings.owners_path), folder))
        return dataclasses.replace(settings, **changes)
    return settings


def _validate(s: Settings, path: Path, errors: _Errors, sections: tuple[str, ...] | None) -> None:
    def wanted(key: str) -> bool:
        return sections is None or key.split(".")[0] in sections

    for key, port in (("proxy.port", s.proxy.port), ("server.port", s.server.port)):
        if wanted(key) and not 1 <= port <= 65535:
            errors.fail(f"{path}: {key} must be between 1 and 65535, got {port}", key)
    if wanted("metrics") and s.metrics.port and (
            not 1 <= s.metrics.port <= 65535 or s.metrics.port in (s.proxy.port, s.server.port)):
        errors.fail(f"{path}: metrics.port must be 0 (none) or a port between 1 and 65535 other than "
                    f"proxy.port and server.port, got {s.metrics.port}", "metrics")
    positive = {
        "auth.poll_interval_seconds": s.auth.poll_interval_seconds,
        "stats.flush_interval_seconds": s.stats.flush_interval_seconds,
        "stats.rotate_bytes": s.stats.rotate_bytes,
        "stats.capture_head_bytes": s.stats.capture_head_bytes,
        "stats.capture_tail_bytes": s.stats.capture_tail_bytes,
        "stats.refusal_records_per_window": s.stats.refusal_records_per_window,
        "server.auth_timeout_ms": s.server.auth_timeout_ms,
        "proxy.upstream_connect_timeout_seconds": s.proxy.upstream_connect_timeout_seconds,
        "proxy.upstream_read_timeout_seconds": s.proxy.upstream_read_timeout_seconds,
        "proxy.shutdown_timeout_seconds": s.proxy.shutdown_timeout_seconds,
    }
    if wanted("proxy") and bool(s.proxy.tls_cert_path) != bool(s.proxy.tls_key_path):
        errors.fail(f"{path}: proxy.tls_cert_path and proxy.tls_key_path must be set together "
                    f"(both empty = TLS off)", "proxy")
    if wanted("proxy") and s.proxy.http_port:
        if not s.proxy.tls_cert_path:
            errors.fail(f"{path}: proxy.http_port is a plain-HTTP port beside TLS; set proxy.tls_cert_path "
                        f"and proxy.tls_key_path, or set it to 0 (proxy.port already speaks plain HTTP)", "proxy")
        elif not 1 <= s.proxy.http_port <= 65535 or s.proxy.http_port in (s.proxy.port, s.server.port):
            errors.fail(f"{path}: proxy.http_port must be 0 (off) or a port between 1 and 65535 other than "
                        f"proxy.port and server.port, got {s.proxy.http_port}", "proxy")
    for key, value in positive.items():
        if wanted(key) and (not math.isfinite(value) or value <= 0):
            errors.fail(f"{path}: {key} must be greater than 0, got {value}", key)
    if wanted("auth") and s.auth.cache_seconds < 0:
        errors.fail(f"{path}: auth.cache_seconds must be 0 or more, got {s.auth.cache_seconds}", "auth")
    for key, size in (("proxy.max_body_size", s.proxy.max_body_size),
                      ("proxy.max_header_size", s.proxy.max_header_size)):
        try:
            size_bytes(size)
        except ValueError:
            if wanted(key):
                errors.fail(f"{path}: {key} must be an nginx size like 512, 32k or 100m, got {size!r}", key)
    if wanted("policy") and s.policy.redis_url and urlsplit(s.policy.redis_url).scheme not in (
            "redis", "rediss", "unix"):
        errors.fail(f"{path}: policy.redis_url must be a redis://, rediss:// or unix:// URL, "
                    f"got {s.policy.redis_url.rpartition('@')[2]!r}", "policy")
    if wanted("logging") and s.logging.level.lower() not in ("debug", "info", "warning", "error"):
        errors.fail(f"{path}: logging.level must be debug, info, warning or error, got {s.logging.level!r}",
                    "logging")
    if not wanted("providers"):
        return
    for name, provider in s.providers.items():
        try:
            url = urlsplit(provider.upstream)
            url.port  # noqa: B018 - raises ValueError for a port that is not one
        except ValueError:
            url = None
        if (url is None or url.scheme not in ("http", "https") or not url.hostname or url.query
                or url.fragment or url.username is not None):
            errors.fail(f"{path}: providers.{name}.upstream must be an http(s) URL with a valid port and "
                        f"no user, query or fragment, got {redact(provider.upstream)!r}", "providers")
