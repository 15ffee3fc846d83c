"""The `lmgate` command: up, serve, nginx, render-nginx, hash-key, check-allowlist, report."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lmgate.allowlist import AllowListError, hash_key, load_allowlist
from lmgate.nginx_conf import RenderError, write_config
from lmgate.settings import DEFAULT_CONFIG, ConfigError, Settings, load_settings

log = logging.getLogger("lmgate")


def _setup_logging(level: str) -> None:
    from lmgate.redact import RedactingFormatter
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmgate", description="LMGate: an allow-listing, usage-recording "
                                     "gateway for OpenAI, Anthropic and Google LLM APIs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", type=Path, default=None,
                       help=f"YAML config (default: $LMGATE_CONFIG or {DEFAULT_CONFIG})")
        return p

    with_config(sub.add_parser("up", help="run nginx and the sidecar together in the foreground (local mode)"))
    with_config(sub.add_parser("serve", help="run the sidecar alone (what the container runs)"))
    with_config(sub.add_parser("nginx", help="render the config and run nginx alone in the foreground"))
    render = with_config(sub.add_parser("render-nginx", help="write the nginx config"))
    render.add_argument("--out", type=Path, required=True, help="file to write")
    render.add_argument("--runtime-dir", type=Path, default=None,
                        help="folder for nginx's pid and temp files (default: proxy.runtime_dir)")
    sub.add_parser("hash-key", help="read an API key on stdin, print its sha256: form for the allow-list")
    check = with_config(sub.add_parser("check-allowlist", help="validate the allow-list and print its size"))
    check.add_argument("path", nargs="?", type=Path, help="CSV file (default: auth.allowlist_path)")
    report = with_config(sub.add_parser("report", help="usage and spend per owner, key, model and day"))
    export = with_config(sub.add_parser("export", help="the usage records as a Parquet file, for analysts"))
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
    settings = _settings(args)
    if args.command == "serve":
        from lmgate.app import serve
        serve(settings)
        return 0
    if args.command == "up":
        from lmgate.local import Up
        return Up(settings, settings.source).run()
    if args.command == "nginx":
        from lmgate.local import run_nginx
        return run_nginx(settings)
    if args.command == "render-nginx":
        out = write_config(settings, args.out, args.runtime_dir)
        print(f"wrote {out}", file=sys.stderr)
        return 0
    if args.command == "check-allowlist":
        allowlist = load_allowlist(args.path or settings.auth.allowlist_path)
        print(f"{allowlist.source}: {len(allowlist)} keys")
        return 0
    if args.command == "report":
        from lmgate.report import run_report
        return run_report(args, settings.stats.output_path, settings.report.prices_path)
    if args.command == "export":
        from lmgate.report import run_export
        return run_export(args, settings.stats.output_path)
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> None:
    from lmgate.local import StartError
    try:
        code = run(argv)
    except (ConfigError, AllowListError, RenderError, StartError) as exc:
        print(f"lmgate: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
