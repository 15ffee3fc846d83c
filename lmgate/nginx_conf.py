"""Render nginx.conf from the settings: nginx/nginx.conf.template + one provider block per provider.

The same function renders the config for `lmgate up`, the container's nginx entrypoint and the
tests, so what is tested is what ships.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import re
import secrets
import shutil
import stat
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from lmgate.readiness import PATH_PREFIX as READINESS_PATH
from lmgate.readiness import SOCKET_NAME as READINESS_SOCKET_NAME
from lmgate.readiness import STUB_STATUS_PATH
from lmgate.permissions import User, usable, user_named
from lmgate.records import POLICY_ERRORS
from lmgate.providers import KEY_HEADERS, KEY_PARAMS, KEY_SUBPROTOCOLS, SUBPROTOCOL_HEADER, PROVIDERS, STREAM_USAGE_PATHS, error_body
from lmgate.settings import Settings
from lmgate.spool import NGINX_CLOSE_SECONDS, SPOOL_PREFIX, SPOOL_SUFFIX

NGINX_DIR = Path(__file__).resolve().parent.parent / "nginx"
# nginx's njs module, where Debian, the nginx.org packages and source builds put it.
NJS_MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/share/nginx/modules", "/etc/nginx/modules",
                   "/usr/local/nginx/modules", "/usr/lib64/nginx/modules")
NJS_MODULE_NAME = "ngx_http_js_module.so"
NGINX_BINARY_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin")

INSTALL_HINT = "install it with: sudo apt-get install nginx-light libnginx-mod-http-js (or run scripts/setup.sh)"
# Headers that only LMGate may set; a client's copies are dropped before the provider sees them.
LMGATE_HEADERS = ("X-LMGate-ID", "X-LMGate-Owner", "X-LMGate-Key", "X-LMGate-Query", "X-LMGate-Reason",
                  "X-LMGate-Policy")
# Policy refusals that say how long to wait: `<word> <seconds>` in X-LMGate-Policy (lmgate/app.py).
_RETRY_AFTER = "(?<lmgate_retry_after>[0-9]+)"


def _policy_refusals(name: str, api: str) -> str:
    """The denied location's answers to the sidecar's X-LMGate-Policy (records.POLICY_ERRORS), in
    the provider's error shape; with a 429 a Retry-After, and for a spent budget x-should-retry:
    false, which the OpenAI and Anthropic SDKs obey instead of retrying in vain until the next day."""
    blocks = []
    for word, (status, message) in POLICY_ERRORS.items():
        body = _nginx_string(error_body(api, status, message, "lmgate_" + word))
        if status == 429:
            lines = [f'if ($lmgate_policy ~ "^{word} {_RETRY_AFTER}$") {{',
                     f"    set $lmgate_error {word};",
                     "    add_header Retry-After $lmgate_retry_after always;"]
            if word == "budget_exceeded":
                lines.append("    add_header x-should-retry false always;")
        else:
            lines = [f"if ($lmgate_policy = {word}) {{", f"    set $lmgate_error {word};"]
        blocks += [*lines, f"    return {status} '{body}';", "}"]
    blocks += ['if ($lmgate_policy ~ "^check_model ") {', f"    rewrite ^ /_lmgate_model/{name} last;", "}"]
    return "\n".join(" " * 12 + line for line in blocks)


class RenderError(Exception):
    """The config cannot be rendered; one line with the reason and a hint."""


def find_nginx(setting: str) -> Path:
    if setting != "auto":
        path = Path(setting)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise RenderError(f"proxy.nginx_binary: {setting} is not an executable file")
        return path
    found = shutil.which("nginx")
    if found:
        return Path(found)
    for folder in NGINX_BINARY_DIRS:
        candidate = Path(folder) / "nginx"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise RenderError(f"nginx not found; {INSTALL_HINT}")


def find_njs_module(setting: str) -> Path | None:
    """The njs module to load, or None when nginx has it built in (setting "builtin")."""
    if setting == "builtin":
        return None
    if setting != "auto":
        path = Path(setting)
        if not path.is_file():
            raise RenderError(f"proxy.njs_module: {setting} does not exist")
        return path
    for folder in NJS_MODULE_DIRS:
        candidate = Path(folder) / NJS_MODULE_NAME
        if candidate.is_file():
            return candidate
    raise RenderError(f"the nginx njs module ({NJS_MODULE_NAME}) was not found; {INSTALL_HINT}")


def _fill(template: str, values: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise RenderError(f"template placeholder @@{name}@@ has no value")  # a bug here
        return values[name]
    return re.sub(r"@@([A-Z_]+)@@", replace, template)


def _nginx_string(text: str) -> str:
    """Quote-safe text for a single-quoted nginx string."""
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _seconds(value: float) -> str:
    return f"{int(value * 1000)}ms"


# proxy.http_port's plain HTTP is for local development: never reachable from another machine.
HTTP_PORT_HOST = "127.0.0.1"


def _tls(settings: Settings) -> str:
    proxy = settings.proxy
    if not proxy.tls_cert_path:
        return "        # TLS is off (proxy.tls_cert_path and proxy.tls_key_path are empty)"
    http_listen = ("        # No plain-HTTP port (proxy.http_port is 0)." if not proxy.http_port else
                   f"        # proxy.http_port: the same API over plain HTTP, on loopback only (keys in clear).\n"
                   f"        listen {_address(HTTP_PORT_HOST, proxy.http_port)} reuseport backlog=4096;")
    return _fill((NGINX_DIR / "tls.conf.template").read_text().rstrip("\n"), {
        "HTTP_LISTEN": http_listen,
        "CERT": _nginx_path(proxy.tls_cert_path, "proxy.tls_cert_path"),
        "KEY": _nginx_path(proxy.tls_key_path, "proxy.tls_key_path"),
    })


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _nginx_path(path: str, setting: str) -> str:
    """An absolute path as one nginx token (quoted: a path may hold spaces or ';')."""
    if "$" in path:  # nginx would read it as a variable
        raise RenderError(f"{setting}: nginx cannot take a path with '$': {path}")
    return '"' + str(Path(path).absolute()).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _snippet(name: str, values: dict[str, str], indent: str = "") -> str:
    """A small template of nginx/ (its comment lines dropped), filled, its lines after the first
    indented to stand where its placeholder stands."""
    lines = [line for line in (NGINX_DIR / name).read_text().splitlines() if not line.startswith("#")]
    return _fill(("\n" + indent).join(lines), values)


def _spool_access_log(settings: Settings) -> str:
    """The access_log lines of every location that writes a spool line."""
    path = f"{settings.stats.spool_dir.resolve()}/{SPOOL_PREFIX}$lmgate_spool_slot{SPOOL_SUFFIX}"
    return _snippet("spool_access_log.conf.template", {"SPOOL_LOG": path}, " " * 12)


def _provider_block(template: str, name: str, upstream: str, settings: Settings) -> str:
    api = PROVIDERS[name].api
    url = urlsplit(upstream)
    default_port = 443 if url.scheme == "https" else 80
    port = url.port or default_port
    host_header = url.hostname if port == default_port else f"{url.hostname}:{port}"
    messages = {
        "DENIED_BODY": (403, "LMGate refused this API key: it is missing or not on the gateway's allow-list.",
                        "lmgate_forbidden"),
        "UNAVAILABLE_BODY": (403, "LMGate could not check this API key (its auth sidecar is unreachable); "
                                  "the call was refused.", "lmgate_gate_unavailable"),
        "BAD_GATEWAY_BODY": (502, f"LMGate could not reach the {name} upstream.", "lmgate_upstream_unreachable"),
        "TIMEOUT_BODY": (504, f"LMGate timed out waiting for the {name} upstream.", "lmgate_upstream_timeout"),
        "TOO_LARGE_BODY": (413, f"LMGate refused the request: the body is larger than "
                                f"{settings.proxy.max_body_size}.", "lmgate_request_too_large"),
        "BAD_PATH_BODY": (400, "LMGate refused the request: the path must start with /<provider>/ as sent, "
                               "without '.' or '..' segments (encoded or not) or '//' tricks.", "lmgate_bad_path"),
    }
    values = {key: _nginx_string(error_body(api, status, message, kind))
              for key, (status, message, kind) in messages.items()}
    values["POLICY_MODEL_BODY"] = _nginx_string(error_body(api, 403, POLICY_ERRORS["policy_model"][1],
                                                           "lmgate_policy_model"))
    values.update({
        "NAME": name,
        "POLICY_REFUSALS": _policy_refusals(name, api),
        "UPSTREAM_URL": upstream.rstrip("/"),
        "UPSTREAM_SCHEME": url.scheme,
        "UPSTREAM_PATH": url.path.rstrip("/"),
        "UPSTREAM_HOST": url.hostname or "",
        "UPSTREAM_HOST_HEADER": host_header,
        "CA_BUNDLE": str(settings.proxy.ca_bundle),
        "UPSTREAM_CONNECT_TIMEOUT": _seconds(settings.proxy.upstream_connect_timeout_seconds),
        "UPSTREAM_READ_TIMEOUT": _seconds(settings.proxy.upstream_read_timeout_seconds),
        "SPOOL_ACCESS_LOG": _spool_access_log(settings),
        "DROP_HEADERS": "\n".join(f'            proxy_set_header {h} "";' for h in LMGATE_HEADERS),
    })
    values["PROXY"] = _fill((NGINX_DIR / "provider_proxy.conf.template").read_text(), values)
    values["STREAM_USAGE_LOCATIONS"], values["STREAM_USAGE_NAMED_LOCATIONS"] = \
        _stream_usage_locations(name, settings, values)
    values["WEBSOCKET_LOCATION"] = _fill((NGINX_DIR / "websocket.conf.template").read_text(), values)
    return _fill(template, values)


# The longest path a Unix socket address holds (sun_path, less its final NUL).
_SOCKET_PATH_MAX = 107


def readiness_socket(settings: Settings) -> Path:
    path = settings.stats.spool_dir.resolve() / READINESS_SOCKET_NAME
    if len(str(path).encode()) > _SOCKET_PATH_MAX:
        raise RenderError(f"stats.spool_dir: {path.parent} is too long a path for the socket nginx serves "
                          f"the readiness probe on ({len(str(path).encode())} > {_SOCKET_PATH_MAX} bytes "
                          f"with /{READINESS_SOCKET_NAME}); choose a shorter one")
    return path


def _stream_usage_locations(name: str, settings: Settings, values: dict[str, str]) -> tuple[str, str]:
    """stats.ensure_stream_usage: the locations nested in the provider's for its stream endpoints,
    and the named ones that take larger bodies (at server level)."""
    paths = STREAM_USAGE_PATHS.get(name, ())
    if not (settings.stats.ensure_stream_usage and paths):
        return "            # no stream request is rewritten here (stats.ensure_stream_usage)", ""
    nested = (NGINX_DIR / "openai_stream_usage.conf.template").read_text()
    read = (NGINX_DIR / "openai_stream_usage_read.conf.template").read_text()
    named = (NGINX_DIR / "openai_stream_usage_named.conf.template").read_text()
    return ("".join(_fill(nested, {**values, "PATH": path}) for path in paths) + _fill(read, values),
            _fill(named, values))


def _auth_cache_zone(settings: Settings, temp_dir: Path) -> str:
    if settings.auth.cache_seconds <= 0:
        return "# auth.cache_seconds is 0: every call asks the sidecar"
    # In the workers' temp folder (they write it); files hold the sidecar's answer headers (id,
    # owner, masked key) under a hash of the key material.
    return (f"proxy_cache_path {temp_dir}/auth_cache levels=1:2 keys_zone=lmgate_auth:1m max_size=16m "
            f"inactive=60s use_temp_path=off;")


def _auth_cache(settings: Settings) -> str:
    if settings.auth.cache_seconds <= 0:
        return "            # no /auth cache (auth.cache_seconds is 0)"
    return "\n".join([
        "            # A \"yes\" is reused for auth.cache_seconds, keyed by a hash of the key material",
        "            # ($lmgate_auth_key, set in the provider locations); refusals are never cached.",
        "            proxy_cache lmgate_auth;",
        "            # With the provider prefix: a key's policy may allow one provider and not another.",
        "            proxy_cache_key $lmgate_auth_key$lmgate_raw_prefix;",
        "            proxy_no_cache $lmgate_auth_nocache;",
        "            proxy_cache_bypass $lmgate_auth_nocache;",
        f"            proxy_cache_valid 200 {settings.auth.cache_seconds}s;",
        "            # A hit reads the cached answer's file: keep its descriptor open instead of",
        "            # opening it on every call. An entry's expiry is in the file's header, so a kept",
        "            # descriptor never stretches a \"yes\" past its expiry.",
        "            open_file_cache max=4096 inactive=10s;",
        "            open_file_cache_valid 1s;",
        "            # The sidecar's yes says `Cache-Control: stale-while-revalidate=<s>` (lmgate/app.py",
        "            # AUTH_REFRESH_SECONDS): that long past cache_seconds nginx still uses it, and asks",
        "            # again in the background (not the calls that keep coming). Refused or unanswered,",
        "            # the entry ends then.",
        "            proxy_cache_background_update on;",
        "            proxy_ignore_headers Expires Set-Cookie Vary X-Accel-Expires;",
    ])


def _upstream_block(name: str, upstream: str, unresolved: bool = False) -> str:
    url = urlsplit(upstream)
    port = url.port or (443 if url.scheme == "https" else 80)
    host = f"[{url.hostname}]" if ":" in (url.hostname or "") else url.hostname
    if unresolved:
        # The host does not resolve (lmgate/upstreams.py): nginx would refuse the whole config. A
        # server marked down is never dialled: calls get a 502, answered by the provider location's
        # @lmgate_bad_gateway_<name>, until the name resolves and the config is rendered again.
        return (f"    # {url.hostname} did not resolve when this was rendered\n"
                f"    upstream lmgate_up_{name} {{\n"
                f"        server 127.0.0.1:{port} down;\n"
                f"    }}\n")
    return (f"    upstream lmgate_up_{name} {{\n"
            f"        server {host}:{port};\n"
            f"        keepalive 128;\n"
            f"    }}\n")


def render(settings: Settings, runtime_dir: Path | None = None, njs_module: Path | None | str = "auto",
           unresolved: frozenset[str] = frozenset()) -> str:
    """The complete nginx.conf text. `njs_module` "auto" resolves the proxy.njs_module setting;
    the providers named in `unresolved` get an upstream that answers 502 (their host does not resolve)."""
    runtime_dir = (runtime_dir or settings.proxy.runtime_dir).resolve()
    temp_dir, user = _temp_dir_and_user(runtime_dir)
    module = find_njs_module(settings.proxy.njs_module) if njs_module == "auto" else njs_module
    provider_template = (NGINX_DIR / "provider.conf.template").read_text()
    host = settings.proxy.host
    listen = _address(host, settings.proxy.port) + (" ssl http2" if settings.proxy.tls_cert_path else "")
    sidecar = settings.server.reachable_host
    sidecar = f"[{sidecar}]" if ":" in sidecar else sidecar
    values = {
        "LOAD_MODULE": f"load_module {module};" if module else "# njs is built into this nginx",
        "WORKER_PROCESSES": settings.proxy.worker_processes,
        "RUNTIME_DIR": str(runtime_dir),
        # New at each rendering: request ids stay unique across nginx's restarts and reloads, which
        # start its connection serial numbers from 1 again, and across LMGate instances.
        "INSTANCE_ID": secrets.token_hex(8),
        "TEMP_DIR": str(temp_dir),
        "USER": f"user {user};" if user else "# workers run as the user that starts nginx",
        "ERROR_LOG_LEVEL": "info" if settings.logging.level.lower() == "debug" else "warn",
        "MAX_BODY_SIZE": settings.proxy.max_body_size,
        "MAX_HEADER_SIZE": settings.proxy.max_header_size,
        "NJS_SCRIPT": str(NGINX_DIR / "lmgate.js"),
        "CAPTURE_HEAD_BYTES": str(settings.stats.capture_head_bytes),
        "CAPTURE_TAIL_BYTES": str(settings.stats.capture_tail_bytes),
        "KEY_HEADERS": ",".join((*KEY_HEADERS, SUBPROTOCOL_HEADER)),
        "KEY_SUBPROTOCOLS": ",".join(KEY_SUBPROTOCOLS),
        "KEY_PARAMS": ",".join(sorted(KEY_PARAMS)),
        "SIDECAR_ADDRESS": f"{sidecar}:{settings.server.port}",
        "SPOOL_DIR": str(settings.stats.spool_dir.resolve()),
        "STUB_STATUS_PATH": STUB_STATUS_PATH,
        "READINESS_SOCKET": str(readiness_socket(settings)),
        "READINESS_PATH": READINESS_PATH,
        "SPOOL_ACCESS_LOG": _spool_access_log(settings),  # the canary and readiness locations'
        "SPOOL_LINE": _snippet("spool_line.conf.template", {}, " " * 8),
        "SPOOL_CLOSE_SECONDS": str(NGINX_CLOSE_SECONDS),
        "AUTH_TIMEOUT": f"{settings.server.auth_timeout_ms}ms",
        "AUTH_CACHE_ZONE": _auth_cache_zone(settings, temp_dir),
        "AUTH_CACHE": _auth_cache(settings),
        "LISTEN": listen,
        "TLS": _tls(settings),
        "PROVIDER_LIST": ", ".join(settings.providers),
        "UPSTREAMS": "".join(_upstream_block(n, p.upstream, n in unresolved)
                             for n, p in settings.providers.items()),
        "PROVIDER_LOCATIONS": "".join(_provider_block(provider_template, n, p.upstream, settings)
                                      for n, p in settings.providers.items()),
    }
    return _fill((NGINX_DIR / "nginx.conf.template").read_text(), values)


def _temp_dir_and_user(runtime_dir: Path) -> tuple[Path, str | None]:
    """Where nginx spools large request bodies, and the user its workers run as.

    Started as root, nginx runs its workers as an unprivileged user, who must be able to reach the
    temp folders: the runtime folder may sit under a private home (/root), so they go under /tmp.
    """
    if os.geteuid() != 0:
        return runtime_dir, None
    user = "nobody nogroup" if _group_exists("nogroup") else "nobody"
    return Path(tempfile.gettempdir()) / f"lmgate-nginx-{_short_hash(str(runtime_dir))}", user


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def write_config(settings: Settings, out: Path, runtime_dir: Path | None = None,
                 unresolved: frozenset[str] = frozenset()) -> Path:
    """Render to `out` (atomically) and create the runtime folders nginx needs."""
    runtime_dir = (runtime_dir or settings.proxy.runtime_dir).resolve()
    runtime_dir.mkdir(parents=True, exist_ok=True)
    temp_dir, user = _temp_dir_and_user(runtime_dir)
    temp_dir.mkdir(mode=0o755, exist_ok=True)
    info = os.lstat(temp_dir)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise RenderError(f"{temp_dir} exists but is not a folder owned by this user; remove it")
    if user is not None:
        # nginx's master makes the folders inside and gives them to the workers; the workers must
        # still get through every folder above (a private TMPDIR, as `mktemp -d` makes, is not).
        _workers_can(user, temp_dir, "x", "their temp folder",
                     "set TMPDIR to a folder they can enter (e.g. /tmp), or run LMGate as a regular user")
    _prepare_spool(settings.stats.spool_dir.resolve(), user)
    text = render(settings, runtime_dir, unresolved=unresolved)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    return out


def remove_stale_socket(settings: Settings) -> None:
    """Before nginx starts: a socket left by an nginx that was killed would make it fail to listen.
    Never while an nginx of this gate runs (lmgate.supervisor.lock_runtime_dir)."""
    path = readiness_socket(settings)
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise RenderError(f"stats.spool_dir: cannot remove the old socket {path}: {exc.strerror or exc}") from None


def _prepare_spool(folder: Path, user: str | None) -> None:
    """Create the spool folder; nginx's workers create its files, so they must be able to write it.

    Started as root, the workers run as `user` (nobody): the folder is given to them, and every
    folder above it must let them through.
    """
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The lines hold response heads and tails: no one else may read them.
        if os.stat(folder).st_uid == os.geteuid():
            os.chmod(folder, 0o700)
        if user is not None:
            name, _, group = user.partition(" ")
            worker = pwd.getpwnam(name)
            os.chown(folder, worker.pw_uid, grp.getgrnam(group).gr_gid if group else worker.pw_gid)
    except OSError as exc:
        raise RenderError(f"stats.spool_dir: cannot prepare {folder}: {exc.strerror or exc}") from None
    if user is None:
        return
    _workers_can(user, folder, "wx", "stats.spool_dir",
                 "run LMGate as a regular user, or set stats.spool_dir (LMGATE_STATS__SPOOL_DIR) to a "
                 "folder under /var/spool or /tmp")


def _workers_can(user: str, folder: Path, want: str, what: str, fix: str) -> None:
    """Raise RenderError (naming `what`, the folder and `fix`) unless nginx's workers, running as
    `user`, can `want` ("x", "wx") `folder` and get through every folder above it."""
    closed = usable(_worker(user), folder, want)
    if closed is not None:
        raise RenderError(f"{what}: nginx's workers (user {user.split()[0]}, as LMGate runs as root) "
                          f"cannot use {folder}: {closed}; {fix}")


def _worker(user: str) -> User:
    """nginx's `user` directive ("name [group]") as a User."""
    name, _, group = user.partition(" ")
    return user_named(name, group or None)
