"""The Docker Compose packaging, checked without a Docker engine: docker-compose.yaml and the
Dockerfile are parsed and their wiring asserted (published ports, an internal sidecar, mounts,
health checks, entrypoints that exist in the repo, the same install script as the local path).

tests/e2e/test_container_entrypoints.py runs the entrypoint scripts themselves."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path, PurePosixPath

import pytest
import yaml

from lmgate.settings import load_settings

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yaml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
SETUP = REPO / "scripts" / "setup.sh"
APP = PurePosixPath("/app")  # where the Dockerfile puts the repository


# ---- parsing helpers ---------------------------------------------------------------------------

def interpolate(value, environ: dict[str, str] | None = None):
    """Compose's variable interpolation for ${VAR}, ${VAR:-default}, ${VAR-default} and $$,
    with an empty environment by default (what a user gets without an .env file)."""
    environ = environ or {}
    if isinstance(value, dict):
        return {k: interpolate(v, environ) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, environ) for v in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, default = match.group("name"), match.group("op"), match.group("default") or ""
        if name in environ and (environ[name] or op != ":-"):
            return environ[name]
        return default if op else ""
    return re.sub(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>[^}]*))?\}",
                  replace, value)


def load_compose(environ: dict[str, str] | None = None) -> dict:
    # yaml.safe_load resolves the `<<: *common` merge keys, as Compose does.
    return interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), environ)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        instructions.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends with a line continuation"
    return instructions


def args_of(name: str) -> list[str]:
    return [rest for word, rest in dockerfile_instructions() if word == name]


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def parse_volume(spec) -> tuple[str, str, bool]:
    """(source, target, read_only) of a short- or long-syntax volume."""
    if isinstance(spec, dict):
        return spec["source"], spec["target"], bool(spec.get("read_only"))
    parts = spec.split(":")
    source, target = parts[0], parts[1]
    options = parts[2].split(",") if len(parts) > 2 else []
    return source, target, "ro" in options


def container_port(spec) -> str:
    """The container side of a `ports:` entry (short or long syntax), without the protocol."""
    if isinstance(spec, dict):
        return str(spec["target"])
    return str(spec).rsplit(":", 1)[-1].split("/")[0]


def host_port(spec) -> str:
    if isinstance(spec, dict):
        return str(spec["published"])
    parts = str(spec).split(":")
    assert len(parts) >= 2, f"ports entry {spec!r} lets Docker pick a random host port"
    return parts[-2]


def repo_path(container_path: str) -> Path:
    """The repository file that the image has at `container_path` (the repo is copied to /app)."""
    relative = PurePosixPath(container_path).relative_to(APP)
    return REPO / relative


def entrypoint_argv(service: dict) -> list[str]:
    entrypoint = service["entrypoint"]
    assert isinstance(entrypoint, list), "entrypoint must be in exec form (a list), so no shell " \
                                         "stands between Docker's stop signal and the process"
    return entrypoint


def healthcheck_code(service: dict) -> str:
    test = service["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] == "CMD", "healthcheck must be exec form ['CMD', ...]"
    assert test[1:3] == ["python", "-c"], "healthcheck: the venv's python (slim images have no curl)"
    return test[3]


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


# ---- docker-compose.yaml -----------------------------------------------------------------------

def test_two_services(services):
    assert set(services) == {"lmgate", "nginx"}


def test_one_image_built_from_the_dockerfile(services):
    build = services["lmgate"]["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    assert (REPO / context).resolve() == REPO
    if isinstance(build, dict) and "dockerfile" in build:
        assert (REPO / context / build["dockerfile"]).resolve() == DOCKERFILE
    assert services["nginx"]["image"] == services["lmgate"]["image"]
    # The nginx service runs the image the lmgate service builds: it is never pulled.
    assert "build" not in services["nginx"]
    assert services["nginx"].get("pull_policy") == "never"


def test_nginx_publishes_8080(services):
    ports = services["nginx"]["ports"]
    assert [container_port(p) for p in ports] == ["8080"]
    assert [host_port(p) for p in ports] == ["8080"]  # the default, without an .env
    # The host port follows LMGATE_PORT.
    moved = load_compose({"LMGATE_PORT": "9090"})["services"]["nginx"]["ports"]
    assert [host_port(p) for p in moved] == ["9090"]


def test_sidecar_is_internal_only(compose, services):
    sidecar = services["lmgate"]
    assert "ports" not in sidecar, "the sidecar's /auth must never be published"
    assert sidecar.get("network_mode") is None
    assert {str(p) for p in sidecar["expose"]} == {"8081"}
    networks = sidecar["networks"]
    assert networks, "the sidecar must be on an explicit network"
    for name in networks:
        assert compose["networks"][name].get("internal") is True, \
            f"the sidecar's network {name} must be internal (no route in or out)"
    # nginx shares a network with the sidecar, and has a non-internal one for its published
    # port and the way out to the providers.
    nginx_networks = services["nginx"]["networks"]
    assert set(networks) & set(nginx_networks)
    assert any(not (compose["networks"][n] or {}).get("internal") for n in nginx_networks)


def test_sidecar_listens_on_the_compose_network_and_nginx_dials_it_by_name(services):
    sidecar_env, nginx_env = env_of(services["lmgate"]), env_of(services["nginx"])
    assert sidecar_env["LMGATE_SERVER__HOST"] == "0.0.0.0"
    assert nginx_env["LMGATE_SERVER__ADVERTISE_HOST"] == "lmgate"
    # The sidecar's ports are the defaults on both sides (nginx renders them into its config).
    for env in (sidecar_env, nginx_env):
        assert "LMGATE_SERVER__PORT" not in env


def test_compose_environment_is_valid_config():
    """Every LMGATE_* variable the services set names a real key with a value of the right type."""
    for name, service in load_compose()["services"].items():
        env = env_of(service)
        settings = load_settings(REPO / "config" / "lmgate.yaml", environ=env)
        if name == "lmgate":
            assert settings.server.host == "0.0.0.0"
            assert PurePosixPath(str(settings.auth.allowlist_path)).parent == APP / "data"
            assert PurePosixPath(str(settings.stats.output_path)).parent == APP / "data"
        else:
            assert settings.server.reachable_host == "lmgate"
            assert PurePosixPath(str(settings.proxy.runtime_dir)).is_relative_to("/tmp")
        # Both containers read /app/config/lmgate.yaml: the spool is /app/data/spool on either side
        # (relative paths resolve against the config file's folder).
        assert settings.stats.spool_dir == REPO / "data" / "spool"


def test_mounts(services):
    sidecar = [parse_volume(v) for v in services["lmgate"]["volumes"]]
    nginx = [parse_volume(v) for v in services["nginx"]["volumes"]]
    for mounts in (sidecar, nginx):
        assert ("./config", "/app/config", True) in mounts, "./config must be mounted read-only"
    assert ("./data", "/app/data", False) in sidecar, "./data must be mounted read-write"
    # The whole folder, not the file: a replaced allowlist.csv (new inode) must show inside.
    assert not any(source.startswith("./data/") for source, _, _ in sidecar)
    # nginx writes the spool the sidecar reads (the same host folder, at the same path), and
    # sees nothing else of ./data: not the allow-list, not the stats.
    data_mounts = [m for m in nginx if m[0].startswith("./data")]
    assert data_mounts == [("./data/spool", "/app/data/spool", False)], data_mounts
    # Every mount source is in the repo (a missing one would be created by Docker, owned by root).
    assert (REPO / "config" / "lmgate.yaml").is_file()
    assert (REPO / "data" / "allowlist.csv").is_file()
    assert (REPO / "data" / "spool").is_dir()
    tracked = subprocess.run(["git", "ls-files", "data/spool"], cwd=REPO, capture_output=True, text=True)
    assert tracked.stdout.split() == ["data/spool/.gitkeep"], "data/spool must exist in a fresh clone"


def test_runtime_dir_is_writable_tmpfs(services):
    nginx = services["nginx"]
    runtime = PurePosixPath(env_of(nginx)["LMGATE_PROXY__RUNTIME_DIR"])
    tmpfs = nginx.get("tmpfs") or []
    tmpfs = [tmpfs] if isinstance(tmpfs, str) else tmpfs
    assert any(runtime.is_relative_to(t.split(":")[0]) for t in tmpfs), \
        f"{runtime} must be on a tmpfs (the root filesystem is read-only, the user is not root)"


def test_healthchecks(services):
    sidecar_code = healthcheck_code(services["lmgate"])
    nginx_code = healthcheck_code(services["nginx"])
    assert "http://127.0.0.1:8081/readyz" in sidecar_code
    assert "http://127.0.0.1:8080/healthz" in nginx_code
    for service, code in ((services["lmgate"], sidecar_code), (services["nginx"], nginx_code)):
        compile(code, "healthcheck", "exec")  # the e2e test runs them for real
        check = service["healthcheck"]
        for key in ("interval", "timeout", "retries"):
            assert key in check


def test_nginx_starts_after_the_sidecar_is_healthy(services):
    depends = services["nginx"]["depends_on"]
    assert depends["lmgate"]["condition"] == "service_healthy"
    assert "depends_on" not in services["lmgate"]


def test_restart_and_stop(services):
    for name, service in services.items():
        assert service["restart"] == "unless-stopped", name
        assert service.get("stop_signal", "SIGTERM") == "SIGTERM", name
        grace = service["stop_grace_period"]
        seconds = int(re.fullmatch(r"(\d+)s", grace).group(1))
        # The sidecar needs up to its 5 s shutdown timeout plus the flush; `lmgate nginx` gives
        # nginx 10 s to finish in-flight calls.
        assert seconds >= 15, f"{name}: stop_grace_period {grace} is too short for a clean stop"


def test_non_root(services):
    for name, service in services.items():
        user = service.get("user")
        if user is not None:
            assert user.split(":")[0] not in ("0", "root", ""), name
        assert service.get("privileged") is not True, name
    assert services["lmgate"]["user"] == "10001:10001"  # the default, without an .env
    moved = load_compose({"LMGATE_UID": "1000", "LMGATE_GID": "1001"})["services"]
    assert {s["user"] for s in moved.values()} == {"1000:1001"}


def test_entrypoints_exist_in_the_repo(services):
    expected = {"lmgate": "scripts/entrypoint-sidecar.sh", "nginx": "scripts/entrypoint-nginx.sh"}
    for name, service in services.items():
        argv = entrypoint_argv(service)
        script = repo_path(argv[0])
        assert script == REPO / expected[name], f"{name} runs {argv[0]}"
        assert script.is_file() and os.access(script, os.X_OK), f"{script} must be executable"
        assert "command" not in service or isinstance(service["command"], list)


@pytest.mark.parametrize("script, subcommand", [("scripts/entrypoint-sidecar.sh", "serve"),
                                                ("scripts/entrypoint-nginx.sh", "nginx")])
def test_entrypoint_scripts_exec(script, subcommand):
    text = (REPO / script).read_text()
    lines = [line.strip() for line in text.splitlines()]
    assert lines[0] in ("#!/bin/sh", "#!/usr/bin/env sh", "#!/bin/bash", "#!/usr/bin/env bash")
    flags = [line.split()[1] for line in lines if re.match(r"set -[a-z]+", line)]
    assert any("e" in f and "u" in f for f in flags), f"{script}: needs set -eu"
    code = [line for line in lines if line and not line.startswith("#")]
    # The last thing the script does is replace itself with the process, passing its arguments on.
    assert shlex.split(code[-1]) == ["exec", "lmgate", subcommand, "$@"]


# ---- Dockerfile --------------------------------------------------------------------------------

def test_from_debian_bookworm():
    froms = args_of("FROM")
    assert len(froms) == 1, "one stage: the image is what setup.sh makes of Debian"
    image = froms[0].split()[0]
    assert re.fullmatch(r"(docker\.io/)?(library/)?debian:bookworm(-slim)?(@sha256:[0-9a-f]{64})?", image), image


def test_installs_with_the_local_setup_script():
    runs = args_of("RUN")
    setup_runs = [r for r in runs if re.search(r"(^|[\s/])scripts/setup\.sh(\s|$)", r)]
    assert len(setup_runs) == 1, "the Dockerfile must RUN scripts/setup.sh, the local install path"
    assert "--dev" not in setup_runs[0], "no dev extras in the image"
    venv = re.search(r"LMGATE_VENV=(\S+)", setup_runs[0]).group(1)
    # Nothing else installs packages: nginx, njs and Python come only from setup.sh.
    for run in runs:
        assert not re.search(r"apt-get\s+(-\S+\s+)*install|apt\s+install|dpkg\s+-i", run), run
        assert "nginx" not in run.replace("/app/", ""), f"nginx set up outside setup.sh: {run}"
        assert not re.search(r"pip3?\s+install", run), f"pip install outside setup.sh: {run}"
    # The venv's bin is on PATH, so `lmgate` (entrypoints) and `python` (health checks) are found.
    path = " ".join(args_of("ENV"))
    assert re.search(rf"PATH={re.escape(venv)}/bin:", path), "the venv's bin must be first on PATH"


def test_setup_script_installs_lean():
    text = SETUP.read_text()
    assert "--no-install-recommends" in text
    assert "nginx-light" in text and "libnginx-mod-http-js" in text
    assert "rm -rf /var/lib/apt/lists/*" in text


def test_repo_layout_and_user():
    assert "/app" in args_of("WORKDIR")
    assert any(re.fullmatch(r"\.\s+/app/?", c) for c in args_of("COPY")), "the repo goes to /app"
    users = args_of("USER")
    assert users, "the image must switch to a non-root USER"
    user = users[-1].split(":")[0]
    assert user not in ("0", "root")
    assert user == "10001"
    assert not any("/app/data" in v for v in args_of("VOLUME")), \
        "no VOLUME for /app/data: compose bind-mounts ./data there"


def test_stop_signal_and_exec_form_entrypoint():
    assert args_of("STOPSIGNAL") == ["SIGTERM"]
    entrypoints = args_of("ENTRYPOINT")
    assert len(entrypoints) == 1
    argv = json.loads(entrypoints[0])  # exec form: a JSON array, no `sh -c`
    script = repo_path(argv[0])
    assert script.is_file() and os.access(script, os.X_OK)
    for cmd in args_of("CMD"):
        json.loads(cmd)


def dockerignore_patterns() -> list[str]:
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            patterns.append(line)
    return patterns


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over root-relative paths."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether `path` is left out of the build context: a pattern matching it or a folder above
    it excludes it; a later `!pattern` includes it again."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!").strip().strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            result = not negate
    return result


def test_dockerignore():
    patterns = dockerignore_patterns()
    for path in ("data", "data/allowlist.csv", "data/stats.jsonl", ".venv", ".git", "run",
                 "lmgate/__pycache__", ".pytest_cache", ".env"):
        assert ignored(path, patterns), f"{path} must not go into the image"
    for path in ("lmgate/cli.py", "nginx/nginx.conf.template", "nginx/lmgate.js", "config/lmgate.yaml",
                 "scripts/setup.sh", "scripts/entrypoint-sidecar.sh", "scripts/entrypoint-nginx.sh",
                 "pyproject.toml", "README.md"):
        assert not ignored(path, patterns), f"{path} is needed in the image"
