"""The `lmgate` command: up, serve, nginx, render-nginx, hash-key, check-allowlist, keys, doctor,
report, export."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lmgate.allowlist import AllowListError, load_allowlist
from lmgate.keys import hash_key
from lmgate.nginx_conf import RenderError, write_config
from lmgate.settings import DEFAULT_CONFIG, ConfigError, Settings, load_settings

log = logging.getLogger("lmgate")


def _setup_logging(level: str) -> None:
    from lmgate.redact import RedactingFormatter
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


# Each command: (one-line help, description, example). --help shows all three.
_COMMANDS = {
    "up": ("run nginx and the sidecar together in the foreground (local mode)",
           "Render nginx's config, start the sidecar and nginx, restart either if it dies, and stop "
           "both on Ctrl-C. Prints the URL to point SDKs at.",
           "lmgate up --config config/lmgate.yaml"),
    "serve": ("run the sidecar alone (what the container runs)",
              "The aiohttp sidecar: /auth for nginx, the allow-list, the spool-to-records pipeline.",
              "LMGATE_SERVER__HOST=0.0.0.0 lmgate serve"),
    "nginx": ("render the config and run nginx alone in the foreground",
              "What the container's nginx service runs; the sidecar must be reachable at "
              "server.advertise_host.",
              "LMGATE_SERVER__ADVERTISE_HOST=lmgate lmgate nginx"),
    "render-nginx": ("write the nginx config",
                     "Render nginx.conf from nginx/*.template and the settings, to read or test it.",
                     "lmgate render-nginx --out /tmp/nginx.conf && nginx -t -p run -c /tmp/nginx.conf"),
    "hash-key": ("read an API key on stdin, print its sha256: form for the allow-list",
                 "The allow-list can hold sha256:<hex> instead of the key itself.",
                 'echo -n "$OPENAI_API_KEY" | lmgate hash-key'),
    "check-allowlist": ("validate the allow-list and print its size",
                        "Parse the allow-list as the sidecar would, without starting anything; a bad "
                        "line is one error naming the file and line.",
                        "lmgate check-allowlist data/allowlist.csv"),
    "keys": ("list the allow-listed keys (masked), their policies and current use",
             "Each key's id, owner and policy, and its use against each limit (last minute, today, "
             "this month), from the running sidecar (else from the stats files, as it says); then the "
             "owners' limits (auth.owners_path).",
             "lmgate keys\n  lmgate keys --format json"),
    "doctor": ("check that this deployment works end to end; one line per check, with the fix",
               "Config, nginx's rendered config, TLS, the sidecar and its allow-list, the folders each "
               "process needs, a canary call that must come back as a record, and each provider's "
               "upstream. Exits 0 only if every check passes.",
               "lmgate doctor\n  docker compose exec lmgate lmgate doctor --format json"),
    "report": ("usage and spend per owner, key, model and day",
               "Requests, tokens and cost from the stats files (current and rotated), grouped; or "
               "any SQL over the records with --sql. See docs/report.md.",
               'lmgate report --since 7d --by owner\n'
               '  lmgate report --format csv --sql "SELECT model, count(*) FROM records GROUP BY model"'),
    "export": ("the usage records as a Parquet file, for analysts",
               "Write the valid records of the stats files (current and rotated) to Parquet.",
               "lmgate export --parquet usage.parquet --since 2026-11-01"),
}


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("lmgate")
    except Exception:       # not installed (run from a source tree)
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmgate", description="LMGate: an allow-listing, usage-recording "
                                     "gateway for OpenAI, Anthropic and Google LLM APIs.",
                                     epilog="example: lmgate up    (then: lmgate COMMAND --help)")
    parser.add_argument("--version", action="version", version=f"lmgate {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, config: bool = True) -> argparse.ArgumentParser:
        help_text, description, example = _COMMANDS[name]
        p = sub.add_parser(name, help=help_text, description=description,
                           epilog=f"example:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if config:
            p.add_argument("--config", type=Path, default=None,
                           help=f"YAML config (default: $LMGATE_CONFIG or {DEFAULT_CONFIG})")
        return p

    command("up")
    command("serve")
    command("nginx")
    render = command("render-nginx")
    render.add_argument("--out", type=Path, required=True, help="file to write")
    render.add_argument("--runtime-dir", type=Path, default=None,
                        help="folder for nginx's pid and temp files (default: proxy.runtime_dir)")
    command("hash-key", config=False)
    check = command("check-allowlist")
    check.add_argument("path", nargs="?", type=Path, help="CSV file (default: auth.allowlist_path)")
    from lmgate.keys_command import add_arguments as add_keys_arguments
    add_keys_arguments(command("keys"))
    from lmgate.doctor import add_arguments as add_doctor_arguments
    add_doctor_arguments(command("doctor"))
    report = command("report")
    export = command("export")
    try:
        from lmgate.report import add_export_arguments, add_report_arguments
    except ImportError:  # the report module is optional for the gate itself
        pass
    else:
        add_report_arguments(report)
        add_export_arguments(export)
    return parser


# What each command reads of the config: a report must not fail on, say, an odd proxy setting.
_SECTIONS = {"report": ("stats", "report", "logging"), "export": ("stats", "logging")}


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config, sections=_SECTIONS.get(args.command))
    _setup_logging(settings.logging.level)
    return settings


def run(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "hash-key":
        key = sys.stdin.readline().strip()
        if not key:
            print("lmgate: no key on standard input", file=sys.stderr)
            return 2
        print(hash_key(key))
        return 0
    if args.command == "doctor":  # loads the config itself: a bad one is one of its checks
        from lmgate.doctor import main as doctor
        return doctor(args)
    settings = _settings(args)
    if args.command == "serve":
        from lmgate.app import serve
        serve(settings)
        return 0
    if args.command == "up":
        from lmgate.supervisor import Up
        return Up(settings, settings.source).run()
    if args.command == "nginx":
        from lmgate.supervisor import run_nginx
        return run_nginx(settings)
    if args.command == "render-nginx":
        out = write_config(settings, args.out, args.runtime_dir)
        print(f"wrote {out}", file=sys.stderr)
        return 0
    if args.command == "check-allowlist":
        allowlist = load_allowlist(args.path or settings.auth.allowlist_path)
        print(f"{allowlist.source}: {len(allowlist)} keys ({len(allowlist.with_policy)} with a policy)")
        if settings.auth.owners_path and args.path is None:
            from lmgate.allowlist import load_owners
            print(f"{settings.auth.owners_path}: {len(load_owners(Path(settings.auth.owners_path)))} owners with limits")
        return 0
    if args.command == "keys":
        from lmgate.keys_command import run as keys
        return keys(settings, args.format, sys.stdout, sys.stderr)
    if args.command == "report":
        from lmgate.report import run_report
        from lmgate.settings import ReportSettings
        # The default overrides file may be absent (a config of one's own elsewhere): no overrides.
        default = (settings.source.parent / ReportSettings().prices_path).resolve()
        return run_report(args, settings.stats.output_path, settings.report.prices_path,
                          prices_optional=settings.report.prices_path.resolve() == default)
    if args.command == "export":
        from lmgate.report import run_export
        return run_export(args, settings.stats.output_path)
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> None:
    from lmgate.supervisor import StartError
    try:
        code = run(argv)
    except (ConfigError, AllowListError, RenderError, StartError) as exc:
        from lmgate.redact import redact
        for line in redact(str(exc)).splitlines():     # a config's errors: one line each
            print(f"lmgate: {line}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
