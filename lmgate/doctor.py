"""`lmgate doctor`: does this deployment work, end to end, and if not, what to fix.

Each check gives one line: ok, or problem and the fix. It runs beside a running LMGate (`lmgate up`,
or in Compose `docker compose exec lmgate lmgate doctor`, which reaches nginx by its service name:
--url or LMGATE_GATE_URL) as the user LMGate runs as.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from lmgate.nginx_conf import RenderError, _temp_dir_and_user, find_nginx, render
from lmgate.permissions import current_user, usable, user_named
from lmgate.redact import redact
from lmgate.settings import ConfigError, Settings, load_settings
from lmgate.tls import certificate_status
from lmgate.upstreams import provider_hosts, resolve
from lmgate.writer import STDOUT

CANARY_PATH = "/_lmgate/canary/"
GATE_URL_ENV = "LMGATE_GATE_URL"
TIMEOUT_SECONDS = 5.0


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _ok(name: str, detail: str) -> Check:
    return Check(name, True, detail)


def _problem(name: str, detail: str, fix: str) -> Check:
    return Check(name, False, detail, fix)


# ---- config and nginx's config

def check_config(config: Path | None) -> tuple[Check, Settings | None]:
    """Every problem of the file and of the LMGATE_* variables (lmgate.settings names them all)."""
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        return _problem("config", "; ".join(str(exc).splitlines()), "correct each key named (config/lmgate.yaml "
                        "or its LMGATE_* variable), then run lmgate doctor again"), None
    return _ok("config", f"{settings.source} loads"), settings


def check_nginx_config(settings: Settings) -> Check:
    """Render as `lmgate up` would (to a temporary folder: nothing of the running gate is touched)
    and ask nginx whether it takes it."""
    try:
        binary = find_nginx(settings.proxy.nginx_binary)
    except RenderError as exc:
        return _problem("nginx config", str(exc), "install nginx or set proxy.nginx_binary")
    unresolved = frozenset(n for n, h in provider_hosts(settings).items() if h and not resolve(h))
    with tempfile.TemporaryDirectory(prefix="lmgate-doctor-") as folder:
        runtime = Path(folder)
        try:
            text = render(settings, runtime, unresolved=unresolved)
        except (RenderError, OSError) as exc:
            return _problem("nginx config", f"cannot render it: {exc}", "see the message")
        conf = runtime / "nginx.conf"
        conf.write_text(text)
        temp_dir, _ = _temp_dir_and_user(runtime)
        created = not temp_dir.exists()
        temp_dir.mkdir(mode=0o755, exist_ok=True)
        try:
            result = subprocess.run([str(binary), "-t", "-q", "-p", str(runtime), "-c", str(conf)],
                                    capture_output=True, text=True, timeout=30)
        finally:
            if created:
                shutil.rmtree(temp_dir, ignore_errors=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if "[emerg]" in line]
        reason = redact((lines or result.stderr.strip().splitlines() or ["nginx -t failed"])[0])
        return _problem("nginx config", f"nginx -t rejects the rendered config: {reason}",
                        "correct the setting it names (config/lmgate.yaml) or the templates in nginx/")
    return _ok("nginx config", f"nginx -t accepts the rendered config ({binary})")


# ---- the sidecar and the allow-list

def _get(url: str, timeout: float) -> tuple[int, bytes]:
    # The canary carries no credential, and the certificate has a check of its own ("tls"): a
    # gate reached by an address its certificate does not name must still be checked.
    context = ssl._create_unverified_context() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def check_sidecar(settings: Settings, timeout: float) -> tuple[list[Check], dict | None]:
    base = f"http://{settings.server.reachable_host}:{settings.server.port}"
    host = settings.server.reachable_host
    if ":" in host:
        base = f"http://[{host}]:{settings.server.port}"
    try:
        _get(base + "/livez", timeout)
        status, body = _get(base + "/readyz", timeout)
        ready = json.loads(body)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return [_problem("sidecar", f"no answer from {base}/livez: {reason}",
                         "start LMGate (lmgate up, or docker compose up -d) and see its log"),
                _problem("allow-list", "unknown: the sidecar does not answer", "start the sidecar first")], None
    checks = []
    if status == 200 and ready.get("ready"):
        checks.append(_ok("sidecar", f"{base} is ready (spool backlog {ready.get('spool_backlog_bytes', 0)} "
                          f"bytes, {ready.get('stats_written', 0)} records written)"))
    else:
        problems = "; ".join(ready.get("problems") or [f"/readyz answered {status}"])
        checks.append(_problem("sidecar", f"{base} is not ready: {problems}",
                               "fix what /readyz names (see the sidecar's log)"))
    keys, loaded, error = ready.get("allowlist_keys"), ready.get("allowlist_loaded_at"), ready.get("allowlist_last_error")
    where = settings.auth.allowlist_path
    if error:
        checks.append(_problem("allow-list", f"{keys} keys in force (loaded {loaded}); the last reload was "
                               f"refused: {error}", f"correct {where}; it is read again within "
                               f"{settings.auth.poll_interval_seconds:g} s"))
    elif not keys:
        checks.append(_problem("allow-list", f"{where} has no keys (loaded {loaded}): every call is refused",
                               "add keys (README: The allow-list)"))
    else:
        checks.append(_ok("allow-list", f"{keys} keys from {where}, loaded {loaded}"))
    return checks, ready


# ---- folders: usable by the user that needs them

def check_folders(settings: Settings) -> Check:
    me = current_user()
    _, worker_spec = _temp_dir_and_user(settings.proxy.runtime_dir.resolve())
    if worker_spec:  # run as root: nginx's workers are this user
        name, _, group = worker_spec.partition(" ")
        workers = user_named(name, group or None)
    else:
        workers = me
    to_stdout = settings.stats.output_path == STDOUT
    stats_dir = "standard output" if to_stdout else settings.stats.output_path.resolve().parent
    needs = [
        (workers, settings.stats.spool_dir, "wx", "nginx's workers write the spool"),
        (me, settings.stats.spool_dir, "rwx", "the sidecar reads and deletes spool files"),
        (me, settings.auth.allowlist_path, "r", "the sidecar reads the allow-list"),
    ]
    if not to_stdout:
        needs.insert(2, (me, stats_dir, "wx", "the sidecar writes and rotates the stats"))
    problems = []
    for user, path, want, why in needs:
        reason = usable(user, path, want)
        if reason:
            problems.append(f"{why}: {reason}")
    if problems:
        return _problem("folders", "; ".join(problems),
                        f"give these to the user that needs them (workers: {workers.name}, sidecar: {me.name}), "
                        f"e.g. chown/chmod, or move them (stats.spool_dir, stats.output_path)")
    return _ok("folders", f"spool {settings.stats.spool_dir} (workers: {workers.name}), stats {stats_dir} "
               f"and the allow-list are usable (sidecar: {me.name})")


# ---- the canary: a call through the gate that must come back as a record

def default_gate_url(settings: Settings) -> str:
    if os.environ.get(GATE_URL_ENV):
        return os.environ[GATE_URL_ENV].rstrip("/")
    host = settings.proxy.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    host = f"[{host}]" if ":" in host else host
    if settings.proxy.tls_cert_path:
        return f"https://{host}:{settings.proxy.port}"
    return f"http://{host}:{settings.proxy.port}"


def _stats_position(path: Path) -> tuple[int, int]:
    try:
        info = os.stat(path)
    except OSError:
        return (0, 0)
    return (info.st_ino, info.st_size)


def _find_record(path: Path, start: tuple[int, int], endpoint: str) -> dict | None:
    inode, offset = start
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_ino != inode:
                offset = 0  # rotated since: the record is in the new file
            f.seek(offset)
            for line in f:
                if endpoint.encode() in line:
                    try:
                        return json.loads(line)
                    except ValueError:
                        return None
    except OSError:
        return None
    return None


def check_canary(settings: Settings, gate_url: str, timeout: float) -> Check:
    token = secrets.token_hex(8)
    endpoint = f"{CANARY_PATH}doctor-{token}"
    stats = settings.stats.output_path
    start = _stats_position(stats)
    try:
        status, _ = _get(gate_url + endpoint, timeout)
    except OSError as exc:
        return _problem("canary", f"no answer from the gate at {gate_url}: {getattr(exc, 'reason', exc)}",
                        f"start LMGate, or point doctor at nginx with --url (or {GATE_URL_ENV})")
    if status == 429:
        return _problem("canary", "the gate refused the canary call (rate-limited: many canary calls just now)",
                        "run lmgate doctor again in a few seconds")
    if status != 204:
        return _problem("canary", f"{gate_url}{CANARY_PATH} answered {status}, not 204: is this LMGate's nginx?",
                        "render nginx's config again (restart LMGate) or correct --url")
    if stats == STDOUT:
        # The records go to the sidecar's standard output, which only its log shipper reads.
        return _ok("canary", f"a call through {gate_url} was answered; its record goes to the "
                   "sidecar's standard output (error_type canary in its log)")
    wait = settings.stats.flush_interval_seconds + 10
    deadline = time.monotonic() + wait
    while True:
        record = _find_record(stats, start, endpoint)
        if record is not None:
            break
        if time.monotonic() > deadline:
            return _problem("canary", f"the gate answered, but no record of it reached {stats} within {wait:g} s",
                            "see the sidecar's /readyz problems and log: the spool is not read or the "
                            "stats file not written (or this is not the stats file the sidecar writes)")
        time.sleep(0.2)
    if record.get("error_type") != "canary":
        return _problem("canary", f"the record has error_type {record.get('error_type')!r}, not 'canary'",
                        "restart LMGate so nginx and the sidecar run the same version")
    return _ok("canary", f"a call through {gate_url} came back as a record in {stats}")


# ---- providers: the upstream resolves and answers TLS

def check_provider(settings: Settings, name: str, timeout: float) -> Check:
    url = urlsplit(settings.providers[name].upstream)
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    label = f"provider {name}"
    addresses = resolve(host)
    if not addresses:
        return _problem(label, f"{host} does not resolve: LMGate answers /{name}/ calls with 502 "
                        f"(upstream_unreachable) until it does",
                        f"check this machine's DNS and network (or providers.{name}.upstream)")
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if url.scheme != "https":
                return _ok(label, f"{host}:{port} answers (plain HTTP)")
            context = ssl.create_default_context(cafile=str(settings.proxy.ca_bundle))
            with context.wrap_socket(sock, server_hostname=host) as tls:
                version = tls.version()
    except ssl.SSLCertVerificationError as exc:
        return _problem(label, f"{host}:{port}: its certificate does not verify: {exc.verify_message}",
                        f"check proxy.ca_bundle ({settings.proxy.ca_bundle}) and that nothing intercepts TLS")
    except (OSError, ssl.SSLError) as exc:
        return _problem(label, f"{host}:{port} ({', '.join(sorted(addresses))}) does not answer TLS: "
                        f"{exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}",
                        "check this machine's network and firewall towards it")
    return _ok(label, f"{host}:{port} resolves and answers {version} with a verified certificate")


# ---- TLS on the front door: the certificate nginx serves, and its expiry

def check_tls(settings: Settings) -> Check:
    ok, what, fix = certificate_status(settings)
    return _ok("tls", what) if ok else _problem("tls", what, fix)


# ---- the command

GROUPS = ("nginx", "tls", "sidecar", "folders", "canary", "providers")
SKIP_ENV = "LMGATE_DOCTOR_SKIP"


def run_checks(config: Path | None, gate_url: str | None, timeout: float = TIMEOUT_SECONDS,
               groups: tuple[str, ...] = GROUPS) -> list[Check]:
    """The config always; then the groups asked for."""
    first, settings = check_config(config)
    checks = [first]
    if settings is None:
        return checks
    if "nginx" in groups:
        checks.append(check_nginx_config(settings))
    if "tls" in groups:
        checks.append(check_tls(settings))
    if "sidecar" in groups:
        checks.extend(check_sidecar(settings, timeout)[0])
    if "folders" in groups:
        checks.append(check_folders(settings))
    if "canary" in groups:
        checks.append(check_canary(settings, gate_url or default_gate_url(settings), timeout))
    if "providers" in groups:
        checks.extend(check_provider(settings, name, timeout) for name in settings.providers)
    return checks


def _groups(text: str | None, option: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in (text or "").split(",") if n.strip())
    for name in names:
        if name not in GROUPS:
            raise SystemExit(f"lmgate doctor: {option}: unknown check {name!r} (checks: {', '.join(GROUPS)})")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help=f"the gate (nginx) to send the canary call to (default: ${GATE_URL_ENV}, "
                        "else proxy.host:proxy.port)")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--only", metavar="CHECKS", help=f"comma list of {', '.join(GROUPS)} (the config is "
                        "always checked)")
    parser.add_argument("--skip", metavar="CHECKS", default=os.environ.get(SKIP_ENV),
                        help=f"comma list of checks to leave out (default: ${SKIP_ENV}; Compose's sidecar "
                        "has no route out: it leaves the providers to the nginx container)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_SECONDS,
                        help=f"seconds for each network check (default {TIMEOUT_SECONDS:g})")


def main(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    only = _groups(args.only, "--only") or GROUPS
    skip = _groups(args.skip, "--skip")
    checks = run_checks(args.config, args.url, args.timeout, tuple(g for g in only if g not in skip))
    healthy = all(c.ok for c in checks)
    if args.format == "json":
        json.dump({"ok": healthy, "checks": [{k: redact(v) if isinstance(v, str) else v
                                              for k, v in asdict(c).items()} for c in checks]}, out, indent=2)
        out.write("\n")
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            line = f"{'ok' if c.ok else 'problem':<8} {c.name:<{width}}  {c.detail}"
            out.write(redact(line + ("" if c.ok else f" -> fix: {c.fix}")) + "\n")
    return 0 if healthy else 1
