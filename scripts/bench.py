#!/usr/bin/env python3
"""LMGate's overhead benchmark, on loopback only.

The same POST /openai/v1/chat/completions (a ~1 KB JSON body, `Authorization: Bearer <key>`) is
sent by one load tool (wrk, with scripts/bench/post.lua) to:
  (a) the mock upstream directly     - the physical limit of this machine
  (b) bare nginx `proxy_pass` to it   - the floor of any nginx-based design
  (c) LMGate as shipped (`python -m lmgate up --config config/lmgate.yaml`, providers pointed at
      the mock by LMGATE_* variables), auth and stats on.
The *-tls cases send the same request over HTTPS (TLS 1.3, keep-alive HTTP/1.1 as the SDKs'
clients use by default) to (b) and (c), each given a TLS listener beside its plain one (the plain
cases keep using that), so that (b) tls vs (b) plain is the cost of TLS itself and (c) tls vs
(c) plain what it adds to LMGate. (a) stays plain: it is not run for them.

The mock is a second nginx (the same binary) with the echo module: a static ~1 KB chat completion,
a 50-event SSE stream in one write, and the same stream written one event at a time (echo_flush
after each event, as real providers send). It counts what it served in its access log, so the
stats records LMGate writes can be checked against the requests that really went through it.

CPU split: wrk and the mock on core 0, nginx (and the sidecar) on core 1, for (b) and (c) alike.

    python scripts/bench.py                    # all cases, 1 and 64 connections (~7 minutes)
    python scripts/bench.py --smoke            # a few seconds per run; exit 1 unless records == requests
    python scripts/bench.py --soak 600         # 10 minutes at full load: sidecar RSS start/end
    python scripts/bench.py --json             # JSON on stdout, the tables on stderr

Run it with the interpreter that has lmgate installed (e.g. /tmp/lmv/bin/python or .venv/bin/python).
See docs/performance.md for what the numbers mean.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lmgate.supervisor import http_ok  # run with the interpreter that has LMGate installed

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "config" / "lmgate.yaml"
LUA = REPO / "scripts" / "bench" / "post.lua"
ECHO_MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/share/nginx/modules", "/etc/nginx/modules",
                    "/usr/local/nginx/modules", "/usr/lib64/nginx/modules")
ECHO_MODULE = "ngx_http_echo_module.so"
KEY = "sk-bench-0123456789abcdef0123456789abcdef"
PATH = "/openai/v1/chat/completions"
CASES = ("plain", "stream", "stream-onewrite", "stream-no-usage", "plain-tls", "stream-onewrite-tls")
CASE_TITLES = {
    "plain": "plain: ~1 KB chat completion (JSON)",
    "stream": "stream: 50-event SSE, one write by the mock",
    "stream-onewrite": "stream-onewrite: 50-event SSE, one write per event (as providers send)",
    "stream-no-usage": "stream-no-usage: stream-onewrite asked without include_usage (rewritten by LMGate)",
    "plain-tls": "plain-tls: the plain case over HTTPS to (b) and (c)",
    "stream-onewrite-tls": "stream-onewrite-tls: the stream-onewrite case over HTTPS to (b) and (c)",
}
TLS_SUFFIX = "-tls"


def is_tls(case: str) -> bool:
    return case.endswith(TLS_SUFFIX)


def base_case(case: str) -> str:
    """What the mock answers for `case` (a -tls case is its plain-HTTP twin over HTTPS)."""
    return case.removesuffix(TLS_SUFFIX)
CONFIG_TITLES = {"a": "a mock direct", "b": "b bare nginx", "c": "c LMGate"}
MODEL = "gpt-4o-mini-2024-07-18"
STREAM_EVENTS = 50
FLUSH_INTERVAL = 1.0
DRAIN_SECONDS = 1  # see BENCH_STOP_AFTER in scripts/bench/post.lua
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Targets for (c) from the benchmark's issue, on a 2-core machine split as below.
TARGET_RATIO = 0.2        # (c)/(b) requests/s at the highest connection count
TARGET_ADDED_P50_MS = 0.15  # (c) p50 - (b) p50 at 1 connection
TARGET_P99_MS = 15.0      # (c) p99 at the highest connection count

OUT = sys.stdout  # the human report; stderr when --json takes stdout


def say(text: str = "") -> None:
    print(text, file=OUT, flush=True)


class BenchError(Exception):
    """The benchmark cannot run; one line saying why."""


# ---------------------------------------------------------------- payloads


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def request_body(stream: bool, include_usage: bool = True) -> bytes:
    """A ~1 KB chat completion request, as the openai SDK sends it."""
    system = ("You are a careful assistant for a logistics company. Answer in plain English, keep "
              "answers short, cite the order number when one is given, and never invent data. ")
    user = ("Order 48213 left the Rotterdam warehouse on Monday with 14 pallets of spare parts for "
            "the Lyon plant. The carrier says two pallets were held at customs. Write a three-line "
            "status note for the plant manager: what left, what is held, and what happens next. ")
    body = {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": system * 2},
                                                  {"role": "user", "content": user}],
            "temperature": 0.2, "max_tokens": 256}
    if stream:
        body["stream"] = True
        if include_usage:
            body["stream_options"] = {"include_usage": True}
    return _dumps(body).encode()


USAGE = {"prompt_tokens": 212, "completion_tokens": 160, "total_tokens": 372,
         "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                       "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}


def plain_response() -> str:
    """A ~1 KB chat.completion with `model` and `usage`."""
    content = ("Order 48213: 14 pallets of spare parts left Rotterdam on Monday for Lyon. Two pallets "
               "are held at customs pending the commercial invoice; the carrier expects release within "
               "48 hours once the invoice is filed. The other 12 pallets arrive Thursday morning, and "
               "the held pallets follow on the next truck. No action is needed from the plant today; "
               "we will confirm the customs release and the new delivery slot as soon as we have "
               "them. Contact logistics for questions.")
    return _dumps({"id": "chatcmpl-bench0000000000000000000001", "object": "chat.completion",
                   "created": 1764000000, "model": MODEL,
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": content,
                                                        "refusal": None, "annotations": []},
                                "logprobs": None, "finish_reason": "stop"}],
                   "usage": USAGE, "service_tier": "default", "system_fingerprint": "fp_bench01"})


def stream_events() -> list[str]:
    """50 SSE events (OpenAI include_usage style: the last one carries usage) and `data: [DONE]`."""
    words = ("Order 48213 left Rotterdam on Monday with 14 pallets for Lyon; two are held at customs "
             "until the invoice is filed, the rest arrive Thursday and the held pallets follow on the "
             "next truck once released, so no action is needed from the plant today and we will "
             "confirm the new slot").split()

    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, choices=True) -> str:
        return _dumps({"id": "chatcmpl-bench0000000000000000000002", "object": "chat.completion.chunk",
                       "created": 1764000000, "model": MODEL, "system_fingerprint": "fp_bench01",
                       "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
                       if choices else [], "usage": usage})

    events = [chunk({"role": "assistant", "content": "", "refusal": None})]
    for i in range(STREAM_EVENTS - 3):
        events.append(chunk({"content": words[i % len(words)] + " "}))
    events.append(chunk({}, finish="stop"))
    events.append(chunk({}, usage=USAGE, choices=False))
    assert len(events) == STREAM_EVENTS
    return [f"data: {e}\n\n" for e in events] + ["data: [DONE]\n\n"]


def without_usage(stream: bytes) -> bytes:
    """An include_usage stream as the same request without include_usage gets it."""
    events = [e for e in stream.split(b"\n\n") if e and b'"usage":{' not in e]
    return b"".join(e + b"\n\n" for e in events).replace(b',"usage":null', b"")


def _nginx_literal(text: str) -> str:
    """Text for a single-quoted nginx string (newlines as \\n); refuses what nginx would expand."""
    if any(c in text for c in "'$\\"):
        raise ValueError("mock payloads must not contain ', $ or \\")
    return text.replace("\n", "\\n")


# ---------------------------------------------------------------- nginx configs

COMMON = """worker_processes 1;
pid {dir}/nginx.pid;
error_log stderr warn;
daemon off;

events {{
    worker_connections 4096;
}}
"""
TEMP_PATHS = """    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
"""

MOCK_TEMPLATE = """load_module {echo};
""" + COMMON + """
http {{
""" + TEMP_PATHS + """
    server_tokens off;
    tcp_nodelay on;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    client_max_body_size 10m;
    client_body_buffer_size 1m;
    # One 4-byte line per request served: the count the stats records are checked against.
    log_format bench_count '$status';
    access_log {dir}/served.log bench_count;
    map $http_x_bench_mode $bench_location {{
        default /_bench/plain;
        stream /_bench/stream;
        stream-onewrite /_bench/stream-onewrite;
        # The include_usage stream whatever the request asks: LMGate's rewrite asks for it.
        stream-no-usage /_bench/stream-onewrite;
    }}

    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;

        location / {{
            rewrite ^ $bench_location last;
        }}
        location = /_bench/plain {{
            internal;
            default_type application/json;
            return 200 '{plain}';
        }}
        # The whole stream in one buffer (one write; nginx strings are cut below 4 KB, hence parts).
        location = /_bench/stream {{
            internal;
            default_type text/event-stream;
{stream_parts}
            echo -n '{stream_vars}';
        }}
        # One write per event: echo_flush sends each event on its own before the next.
        location = /_bench/stream-onewrite {{
            internal;
            default_type text/event-stream;
{onewrite}
        }}
    }}
}}
"""

BARE_TEMPLATE = COMMON + """
http {{
""" + TEMP_PATHS + """
    server_tokens off;
    access_log off;
    sendfile on;
    tcp_nodelay on;
    keepalive_timeout 75s;
    keepalive_requests 10000;
    client_max_body_size 100m;
    client_body_buffer_size 1m;

    upstream bench_mock {{
        server 127.0.0.1:{mock_port};
        keepalive 128;
    }}

    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
{tls}
        location /openai/ {{
            proxy_pass http://bench_mock/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


def render_mock(folder: Path, port: int, echo_module: Path) -> str:
    events = stream_events()
    parts, current = [], ""
    for event in events:
        if len(current) + len(event) > 3000:
            parts.append(current)
            current = ""
        current += event
    parts.append(current)
    stream_parts = "\n".join(f"            set $bench_s{i} '{_nginx_literal(p)}';" for i, p in enumerate(parts))
    stream_vars = "".join(f"$bench_s{i}" for i in range(len(parts)))
    onewrite = "\n".join(f"            echo -n '{_nginx_literal(e)}';\n            echo_flush;" for e in events)
    return MOCK_TEMPLATE.format(dir=folder, port=port, echo=echo_module, plain=_nginx_literal(plain_response()),
                                stream_parts=stream_parts, stream_vars=stream_vars, onewrite=onewrite)


# The TLS settings of nginx/tls.conf.template (what LMGate renders), for bare nginx's TLS listener.
BARE_TLS = """        listen 127.0.0.1:{tls_port} ssl http2 reuseport backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305;
        ssl_prefer_server_ciphers off;
        ssl_session_cache shared:bench_tls:10m;
        ssl_session_timeout 1d;
        ssl_session_tickets off;
"""


def render_bare(folder: Path, port: int, mock_port: int, tls: tuple[int, Path, Path] | None = None) -> str:
    """`tls`: (port, certificate, key) for a TLS listener beside the plain one."""
    tls_part = BARE_TLS.format(tls_port=tls[0], cert=tls[1], key=tls[2]) if tls else ""
    return BARE_TEMPLATE.format(dir=folder, port=port, mock_port=mock_port, tls=tls_part)


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed ECDSA P-256 certificate for 127.0.0.1 (the kind certbot issues by default)."""
    cert, key = folder / "tls.crt", folder / "tls.key"
    done = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                           "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                           "-addext", "subjectAltName=IP:127.0.0.1"], capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"openssl could not make the TLS cases' certificate: {done.stderr.strip()[-300:]}")
    return cert, key


# ---------------------------------------------------------------- processes


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry))
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def cpu_ticks(pid: int | None) -> int:
    if pid is None:
        return 0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


def core_ticks() -> dict[str, tuple[int, int]]:
    """(busy, total) jiffies per core from /proc/stat (busy = everything but idle and iowait)."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *vals = line.split()
            nums = [int(x) for x in vals[:8]]
            out[name[3:]] = (sum(nums) - nums[3] - nums[4], sum(nums))
    return out


def rss_kb(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class Cpu:
    """The CPU split: `taskset -c` prefixes, or nothing when taskset is missing."""

    def __init__(self, enabled: bool) -> None:
        self.taskset = shutil.which("taskset") if enabled else None
        self.load_core, self.gate_core = "0", "1"
        if self.taskset and (os.cpu_count() or 1) < 2:
            self.taskset = None

    def on(self, core: str) -> list[str]:
        return [self.taskset, "-c", core] if self.taskset else []

    def describe(self) -> str:
        if not self.taskset:
            return "unpinned (taskset unavailable, fewer than 2 cores, or --no-pin)"
        return (f"core {self.load_core}: wrk + mock nginx (+ this script); "
                f"core {self.gate_core}: nginx under test (b) / LMGate's nginx + sidecar (c)")


class Proc:
    """A process this script started (its own session), stopped by its pid only."""

    def __init__(self, name: str, cmd: list[str], log: Path, **kwargs) -> None:
        self.name = name
        self.log_path = log
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, **kwargs)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def find_echo_module() -> Path | None:
    for folder in ECHO_MODULE_DIRS:
        candidate = Path(folder) / ECHO_MODULE
        if candidate.is_file():
            return candidate
    return None


def find_nginx() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                           if os.access(p, os.X_OK)), None)
    if not found:
        raise BenchError("nginx not found (scripts/setup.sh installs it)")
    return found


class Nginx:
    """An nginx of ours (the mock or the bare proxy), in the foreground, pinned to one core."""

    def __init__(self, name: str, folder: Path, conf_text: str, port: int, cpu: Cpu, core: str) -> None:
        self.name, self.folder, self.port = name, folder, port
        folder.mkdir(parents=True, exist_ok=True)
        conf = folder / "nginx.conf"
        conf.write_text(conf_text)
        cmd = [find_nginx(), "-p", str(folder), "-c", str(conf)]
        check = subprocess.run(cmd + ["-t", "-q"], capture_output=True, text=True)
        if check.returncode != 0:
            raise BenchError(f"nginx rejected the {name} config {conf}: {check.stderr.strip()[-400:]}")
        self.proc = Proc(name, cpu.on(core) + cmd, folder / "nginx.log")
        wait_until(lambda: self._listening() or not self.proc.alive(), 10, f"{name} to listen")
        if not self.proc.alive():
            raise BenchError(f"{name} exited: {self.proc.log_tail()}")

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def worker(self) -> int | None:
        kids = children(self.proc.pid)
        return kids[0] if kids else None

    def stop(self) -> None:
        self.proc.stop(signal.SIGQUIT, 10)


class LineCounter:
    """New lines appended to the files matching a glob (rotation-safe: follows files by inode)."""

    def __init__(self, folder: Path, pattern: str) -> None:
        self.folder, self.pattern = folder, pattern
        self.offsets: dict[int, int] = {}
        self.total = 0

    def read_new(self, keep: bool = False) -> list[bytes]:
        lines: list[bytes] = []
        for path in sorted(self.folder.glob(self.pattern), key=lambda p: p.stat().st_mtime):
            try:
                with open(path, "rb") as f:
                    inode = os.fstat(f.fileno()).st_ino
                    offset = self.offsets.get(inode, 0)
                    f.seek(offset)
                    data = f.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1  # complete lines only
            if end == 0:
                continue
            self.offsets[inode] = offset + end
            chunk = data[:end]
            self.total += chunk.count(b"\n")
            if keep:
                lines.extend(chunk.splitlines())
        return lines

    def count(self) -> int:
        self.read_new()
        return self.total


class RecordTally:
    """The stats records written so far, each parsed once: how many, by status, and how many lack
    the usage or the caller's identity that the mock's answers and the allow-list imply."""

    def __init__(self, folder: Path) -> None:
        self.lines = LineCounter(folder, "stats*.jsonl")
        self.total = 0
        self.by_status: Counter[str] = Counter()
        self.usage_missing = 0
        self.identity_missing = 0

    def update(self) -> int:
        for line in self.lines.read_new(keep=True):
            try:
                rec = json.loads(line)
            except ValueError:
                rec = {"status": "unparsable"}
            self.total += 1
            self.by_status[str(rec.get("status")) + (f"/{rec['error_type']}" if rec.get("error_type") else "")] += 1
            if rec.get("status") == 200 and not rec.get("error_type") and (
                    rec.get("model") != MODEL or rec.get("input_tokens") != USAGE["prompt_tokens"]
                    or rec.get("output_tokens") != USAGE["completion_tokens"]):
                self.usage_missing += 1
            if rec.get("lmgate_id") != "bench" or rec.get("owner") != "bench@example.com":
                self.identity_missing += 1
        return self.total

    def snapshot(self) -> tuple[int, Counter[str], int, int]:
        return self.total, Counter(self.by_status), self.usage_missing, self.identity_missing


class Gate:
    """LMGate as shipped: `python -m lmgate up --config config/lmgate.yaml` with LMGATE_* overrides."""

    def __init__(self, folder: Path, mock_port: int, cpu: Cpu, core: str, config: Path = CONFIG,
                 tls: tuple[Path, Path] | None = None, policy: str = "") -> None:
        """`tls`: (certificate, key): TLS on proxy.port (tls_port), plain HTTP on proxy.http_port (port).
        `policy`: the bench key's policy columns, "rpm=100000000;models=gpt-*" (--policy)."""
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        columns = dict(item.split("=", 1) for item in policy.split(";") if item)
        (folder / "allowlist.csv").write_text(
            "id,api_key,owner,added" + "".join("," + c for c in columns) + "\n"
            f"bench,{KEY},bench@example.com,2026-01-01" + "".join("," + v for v in columns.values()) + "\n")
        self.stats_dir = folder / "stats"
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        self.sidecar_port = free_port()
        upstream = f"http://127.0.0.1:{mock_port}"
        env = {
            **os.environ,
            "LMGATE_PROXY__HOST": "127.0.0.1",
            "LMGATE_PROXY__PORT": str(self.tls_port or self.port),
            "LMGATE_PROXY__RUNTIME_DIR": str(folder / "run"),
            "LMGATE_PROXY__WORKER_PROCESSES": "1",
            "LMGATE_SERVER__HOST": "127.0.0.1",
            "LMGATE_SERVER__PORT": str(self.sidecar_port),
            "LMGATE_AUTH__ALLOWLIST_PATH": str(folder / "allowlist.csv"),
            "LMGATE_STATS__OUTPUT_PATH": str(self.stats_dir / "stats.jsonl"),
            "LMGATE_STATS__FLUSH_INTERVAL_SECONDS": str(FLUSH_INTERVAL),
            "LMGATE_STATS__SPOOL_DIR": str(folder / "spool"),
            **{f"LMGATE_PROVIDERS__{p}__UPSTREAM": upstream for p in ("OPENAI", "ANTHROPIC", "GOOGLE", "GEMINI")},
        }
        if tls:
            env.update({"LMGATE_PROXY__TLS_CERT_PATH": str(tls[0]), "LMGATE_PROXY__TLS_KEY_PATH": str(tls[1]),
                        "LMGATE_PROXY__HTTP_PORT": str(self.port)})
        # Any other port the config declares (a future server.*_port) gets a free one too.
        for key in yaml.safe_load(config.read_text()).get("server") or {}:
            name = f"LMGATE_SERVER__{key.upper()}"
            if key.endswith("_port") and name not in env:
                env[name] = str(free_port())
        env.pop("LMGATE_CONFIG", None)
        self.proc = Proc("lmgate", cpu.on(core) + [sys.executable, "-m", "lmgate", "up", "--config", str(config)],
                         folder / "lmgate.log", env=env, cwd=folder)
        url = f"http://127.0.0.1:{self.port}/healthz"
        wait_until(lambda: (http_ok(url) and http_ok(self.sidecar_url("/livez"))) or not self.proc.alive(),
                   30, "lmgate up to start")
        if not self.proc.alive():
            raise BenchError(f"lmgate up exited {self.proc.proc.returncode}:\n{self.proc.log_tail()}")
        self.records = RecordTally(self.stats_dir)
        self.sidecar = next((p for p in children(self.proc.pid) if " serve " in cmdline(p)), None)
        master = next((p for p in children(self.proc.pid) if "nginx" in cmdline(p)), None)
        kids = children(master) if master else []
        self.nginx_worker = kids[0] if kids else None

    def sidecar_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.sidecar_port}{path}"

    def readyz(self) -> dict:
        try:
            with urllib.request.urlopen(self.sidecar_url("/readyz"), timeout=2) as resp:
                return json.loads(resp.read())
        except (OSError, ValueError):
            return {}
        # 503 raises HTTPError (an OSError) above: {} means "not ready / unknown"

    def stop(self) -> None:
        self.proc.stop(signal.SIGTERM, 30)


# ---------------------------------------------------------------- load


@dataclass
class Run:
    config: str
    case: str
    conns: int
    duration: float
    requests: int = 0
    rps: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    errors: int = 0
    status_errors: int = 0
    mock_served: int | None = None
    # CPU per completed request: each core as a whole (/proc/stat, softirq included) and the
    # processes on it (utime + stime); busy = share of the core in use during the run.
    core_us_per_req: dict[str, float] = field(default_factory=dict)
    core_busy: dict[str, float] = field(default_factory=dict)
    cpu_us_per_req: dict[str, float] = field(default_factory=dict)
    # Share of the two cores used by processes that are not part of the benchmark (another job on
    # the machine): the run's numbers are perturbed when this is more than a few percent.
    other_load: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Load:
    """wrk runs pinned to the load core, reading the numbers from post.lua's done() line."""

    def __init__(self, cpu: Cpu, folder: Path) -> None:
        self.cpu = cpu
        self.bodies = {}
        for case in CASES:
            path = folder / f"body-{case}.json"
            path.write_bytes(request_body(base_case(case) != "plain", include_usage=case != "stream-no-usage"))
            self.bodies[case] = path

    def run(self, config: str, url: str, case: str, conns: int, duration: int, drain: bool) -> Run:
        """wrk for `duration` s; with `drain`, one more second in which connections finish their
        last call and go idle (no call cut off), and the rate counts the `duration` s only."""
        total = duration + (DRAIN_SECONDS if drain else 0)
        cmd = self.cpu.on(self.cpu.load_core) + ["wrk", "-t1", f"-c{conns}", f"-d{total}s", "--timeout", "10s",
                                                 "-s", str(LUA), url]
        env = {**os.environ, "BENCH_BODY_FILE": str(self.bodies[case]), "BENCH_KEY": KEY, "BENCH_MODE": base_case(case),
               "BENCH_STOP_AFTER": str(duration if drain else 0)}
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=total + 60)
        except subprocess.TimeoutExpired:
            raise BenchError(f"wrk did not finish within {total + 60}s ({config} {case} c={conns})") from None
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH ")), None)
        if done.returncode != 0 or line is None:
            raise BenchError(f"wrk failed ({config} {case} c={conns}): {(done.stderr or done.stdout).strip()[-400:]}")
        v = {k: float(x) for k, x in (kv.split("=", 1) for kv in line.split()[1:])}
        seconds = duration if drain else v["duration_us"] / 1e6
        return Run(config=config, case=case, conns=conns, duration=round(seconds, 3),
                   requests=int(v["requests"]), rps=round(v["requests"] / seconds, 1) if seconds else 0.0,
                   p50_ms=v["p50_us"] / 1000, p90_ms=v["p90_us"] / 1000, p99_ms=v["p99_us"] / 1000,
                   max_ms=v["max_us"] / 1000, status_errors=int(v["status_errors"]),
                   errors=int(v["connect_errors"] + v["read_errors"] + v["write_errors"] + v["timeouts"]))


# ---------------------------------------------------------------- the benchmark


@dataclass
class RecordCheck:
    label: str
    mock_served: int
    client_completed: int
    mark: tuple  # RecordTally.snapshot() when the run started
    ended_at: float
    records: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    usage_missing: int = 0
    identity_missing: int = 0
    spool_bad_lines: int | None = None
    ok: bool = False

    def line(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(self.by_status.items()))
        return (f"RECORDS {self.label}: mock_served={self.mock_served} records={self.records} "
                f"client_completed={self.client_completed} [{statuses}] usage_missing={self.usage_missing} "
                f"identity_missing={self.identity_missing} -> {verdict}")

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("mark", "ended_at")}


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cpu = Cpu(not args.no_pin)
        self.folder = Path(tempfile.mkdtemp(prefix="lmgate-bench-"))
        # Run as root, LMGate's nginx workers (nobody) must reach the spool folder inside.
        self.folder.chmod(0o711)
        # Run as root, nginx's workers are `nobody`: they must be able to reach their temp folders.
        self.folder.chmod(0o755)
        self.load = Load(self.cpu, self.folder)
        self.mock: Nginx | None = None
        self.bare: Nginx | None = None
        self.gate: Gate | None = None
        self.served: LineCounter | None = None
        self.tls_context: ssl.SSLContext | None = None
        self.runs: list[Run] = []
        self.checks: list[RecordCheck] = []
        self.rss: dict[str, int | None] = {}

    # -------------------------------------------------------- setup
    def start(self, bare: bool = True) -> None:
        if not shutil.which("wrk"):
            raise BenchError("wrk not found: apt-get install wrk")
        echo = find_echo_module()
        if echo is None:
            raise BenchError(f"the nginx echo module ({ECHO_MODULE}) is missing: apt-get install libnginx-mod-http-echo")
        mock_port = free_port()
        self.mock = Nginx("mock", self.folder / "mock", render_mock(self.folder / "mock", mock_port, echo),
                          mock_port, self.cpu, self.cpu.load_core)
        self.served = LineCounter(self.folder / "mock", "served.log")
        tls = make_certificate(self.folder) if any(map(is_tls, self.args.cases)) else None
        self.tls_context = ssl.create_default_context(cafile=str(tls[0])) if tls else None
        if bare:
            port, tls_port = free_port(), free_port()
            self.bare = Nginx("bare nginx", self.folder / "bare",
                              render_bare(self.folder / "bare", port, mock_port, (tls_port, *tls) if tls else None),
                              port, self.cpu, self.cpu.gate_core)
            self.bare.tls_port = tls_port if tls else None
        self.gate = Gate(self.folder / "gate", mock_port, self.cpu, self.cpu.gate_core, self.args.config, tls,
                         self.args.policy)
        self.rss["sidecar_start_kb"] = rss_kb(self.gate.sidecar)
        self.rss["nginx_worker_start_kb"] = rss_kb(self.gate.nginx_worker)
        self._check_responses()

    def url(self, config: str, case: str) -> str:
        if is_tls(case) and config != "a":
            port = {"b": self.bare.tls_port if self.bare else 0, "c": self.gate.tls_port}[config]
            return f"https://127.0.0.1:{port}{PATH}"
        port = {"a": self.mock.port, "b": self.bare.port if self.bare else 0, "c": self.gate.port}[config]
        return f"http://127.0.0.1:{port}{PATH}"

    def _check_responses(self) -> None:
        """One request per case and configuration: all answer 200 with the same body."""
        for case in self.args.cases:
            bodies = {}
            for config in ("a", "b", "c") if self.bare else ("a", "c"):
                req = urllib.request.Request(self.url(config, case), data=self.load.bodies[case].read_bytes(),
                                             headers={"Authorization": f"Bearer {KEY}", "X-Bench-Mode": base_case(case),
                                                      "Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=5, context=self.tls_context) as resp:
                        bodies[config] = (resp.status, resp.read())
                except OSError as exc:
                    raise BenchError(f"{CONFIG_TITLES[config]} did not answer {case}: {exc}") from None
            if case == "stream-no-usage" and bodies["c"][1] == without_usage(bodies["a"][1]):
                # LMGate asked the mock for the usage the request did not ask for; its client gets
                # the stream without it, as the mock would answer such a request.
                bodies["c"] = bodies["a"]
            if len({b for b in bodies.values()}) != 1 or bodies["a"][0] != 200:
                raise BenchError(f"the configurations answer {case} differently: "
                                 f"{ {k: (s, len(b)) for k, (s, b) in bodies.items()} }")
            if base_case(case) != "plain" and bodies["a"][1].count(b"data: ") != STREAM_EVENTS + 1:
                raise BenchError(f"the mock's {case} stream does not have {STREAM_EVENTS} events")
        # Those requests went through LMGate too: wait for their records so the first run starts clean.
        self._settle_mock()
        n = len(self.args.cases)
        self._finish_check(RecordCheck("responses", n, n, (0, Counter(), 0, 0), time.monotonic()), quiet=True)

    def _settle_mock(self) -> int:
        """The mock's served count once in-flight requests have finished (stable for 0.15 s)."""
        last, stable_since = self.served.count(), time.monotonic()
        deadline = stable_since + 10
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = self.served.count()
            if now != last:
                last, stable_since = now, time.monotonic()
            elif time.monotonic() - stable_since >= 0.15:
                break
        return last

    # -------------------------------------------------------- one run
    def run(self, config: str, case: str, conns: int, duration: int, label: str | None = None,
            record: bool = True) -> Run:
        gated = config == "c"
        if gated:
            self.gate.records.update()
        mark_records = self.gate.records.snapshot() if gated else None
        served_before = self._settle_mock() if gated else self.served.count()
        pids = {"a": {"mock": self.mock.worker()},
                "b": {"mock": self.mock.worker(), "nginx": self.bare.worker() if self.bare else None},
                "c": {"mock": self.mock.worker(), "nginx": self.gate.nginx_worker,
                      "sidecar": self.gate.sidecar}}[config]
        profilers = self._start_profilers(case, conns, duration) if gated and record else []
        ticks = {name: cpu_ticks(pid) for name, pid in pids.items()}
        cores = core_ticks()
        wrk_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = self.load.run(config, self.url(config, case), case, conns, duration, drain=gated)
        wrk_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        for prof in profilers:
            try:
                prof.wait(30)
            except subprocess.TimeoutExpired:
                prof.kill()
                prof.wait()
        cores = {k: (v[0] - cores[k][0], v[1] - cores[k][1]) for k, v in core_ticks().items() if k in cores}
        ticks = {name: cpu_ticks(pid) - ticks[name] for name, pid in pids.items()}
        result.mock_served = (self._settle_mock() if gated else self.served.count()) - served_before
        n = result.requests
        if n:
            us = 1e6 / CLK_TCK / n
            result.cpu_us_per_req = {name: round(t * us, 1) for name, t in ticks.items()}
            result.cpu_us_per_req["wrk"] = round(
                (wrk_after.ru_utime + wrk_after.ru_stime - wrk_before.ru_utime - wrk_before.ru_stime) * 1e6 / n, 1)
            result.core_us_per_req = {f"core{k}": round(busy * us, 1) for k, (busy, _) in cores.items()
                                      if k in (self.cpu.load_core, self.cpu.gate_core)}
            ours = sum(ticks.values()) / CLK_TCK + (wrk_after.ru_utime + wrk_after.ru_stime
                                                     - wrk_before.ru_utime - wrk_before.ru_stime)
            used = sum(busy for k, (busy, _) in cores.items()
                       if k in (self.cpu.load_core, self.cpu.gate_core)) / CLK_TCK
            # Wall time of the whole wrk run (a drained run has one more, idle, second).
            wall = result.duration + (DRAIN_SECONDS if gated else 0)
            result.other_load = round(max(0.0, used - ours) / wall / 2, 3)
            # Busy share over the measured seconds (a drained run's last second is idle).
            result.core_busy = {f"core{k}": round(min(1.0, busy / CLK_TCK / result.duration), 3)
                                for k, (busy, _) in cores.items() if k in (self.cpu.load_core, self.cpu.gate_core)}
        if gated:
            self.pending = RecordCheck(label or f"{case} c={conns}", result.mock_served, result.requests,
                                       mark_records, time.monotonic())
        if record:
            self.runs.append(result)
        return result

    def _start_profilers(self, case: str, conns: int, duration: int) -> list[subprocess.Popen]:
        """--profile DIR: py-spy on the sidecar and perf on the proxy core, during (c) runs at the
        highest connection count. Both run on the load core (they perturb wrk and the mock a little)."""
        folder = self.args.profile
        if folder is None or conns != max(self.args.conns):
            return []
        folder.mkdir(parents=True, exist_ok=True)
        seconds = str(max(1, duration - 1))
        procs = []
        py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
        if py_spy and self.gate.sidecar:
            procs.append(subprocess.Popen(
                self.cpu.on(self.cpu.load_core) + [py_spy, "record", "--pid", str(self.gate.sidecar), "--duration",
                                                   seconds, "--rate", "200", "--format", "raw", "--nonblocking",
                                                   "-o", str(folder / f"sidecar-{case}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if shutil.which("perf") and self.cpu.taskset:
            procs.append(subprocess.Popen(
                self.cpu.on(self.cpu.load_core) + ["perf", "record", "-F", "1999", "-g", "-C", self.cpu.gate_core,
                                                   "-o", str(folder / f"perf-{case}.data"), "--", "sleep", seconds],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if not procs:
            say("  --profile: neither py-spy nor perf found; nothing recorded")
        return procs

    def check_pending(self) -> RecordCheck:
        check, self.pending = self.pending, None
        return self._finish_check(check)

    def _finish_check(self, check: RecordCheck, quiet: bool = False) -> RecordCheck:
        """Wait for the run's records; then, a flush interval later, count them against the mock."""
        gate = self.gate
        timeout = 3 * FLUSH_INTERVAL + 15
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and gate.records.update() - check.mark[0] < check.mock_served:
            time.sleep(0.1)
        # A doubled record would be written by the latest one flush interval after the last one.
        settle = check.ended_at + 2 * FLUSH_INTERVAL + 0.2 - time.monotonic()
        if settle > 0 and not quiet:
            time.sleep(settle)
        gate.records.update()
        total, by_status, usage_missing, identity_missing = gate.records.snapshot()
        check.records = total - check.mark[0]
        check.by_status = dict(by_status - check.mark[1])
        check.usage_missing = usage_missing - check.mark[2]
        check.identity_missing = identity_missing - check.mark[3]
        check.spool_bad_lines = gate.readyz().get("spool_bad_lines")
        check.ok = (check.records == check.mock_served and not check.usage_missing and not check.identity_missing
                    and not check.spool_bad_lines)
        if not quiet or not check.ok:
            say(check.line())
        if not quiet:
            self.checks.append(check)
        return check

    # -------------------------------------------------------- the whole benchmark
    def warm(self, configs: tuple[str, ...], seconds: int) -> None:
        case = self.args.cases[0]
        for config in configs:  # LMGate first: its records flush while the others warm up
            # The mock alone is static nginx with nothing to warm: one second opens the connections.
            self.run(config, case, max(self.args.conns), min(seconds, 1) if config == "a" else seconds,
                     label="warm-up", record=False)
        if "c" in configs:
            self.check_pending()
        self.rss["sidecar_after_warmup_kb"] = rss_kb(self.gate.sidecar)

    def benchmark(self) -> int:
        args = self.args
        say(f"CPU split: {self.cpu.describe()}")
        say(f"runs: {args.duration}s each after a {args.warmup}s warm-up per configuration; "
            f"cases {','.join(args.cases)}; connections {','.join(map(str, args.conns))}; wrk -t1")
        say(f"work folder: {self.folder}")
        self.warm(("c", "a", "b"), args.warmup)
        # Per case and connection count: LMGate first, then the mock alone (core 0 only) while
        # LMGate's last records flush, then bare nginx; then the records check.
        for case in args.cases:
            for conns in args.conns:
                for config in ("c", "b") if is_tls(case) else ("c", "a", "b"):
                    r = self.run(config, case, conns, args.duration)
                    say(f"  {case:16s} c={conns:<3d} {CONFIG_TITLES[config]:14s} {r.rps:9.0f} req/s  "
                        f"p50 {r.p50_ms:6.2f}  p90 {r.p90_ms:6.2f}  p99 {r.p99_ms:6.2f} ms"
                        + (f"  (other load {r.other_load:.0%})" if r.other_load > 0.05 else ""))
                self.check_pending()
        self.rss["sidecar_end_kb"] = rss_kb(self.gate.sidecar)
        self.rss["nginx_worker_end_kb"] = rss_kb(self.gate.nginx_worker)
        return self.report()

    def soak(self, seconds: int) -> int:
        args = self.args
        conns = max(args.conns)
        say(f"CPU split: {self.cpu.describe()}")
        say(f"soak: LMGate at {conns} connections for {seconds}s, cycling {','.join(args.cases)} "
            f"in segments of at most 60s; sidecar RSS after each")
        self.warm(("c",), args.warmup)
        series = [(0, self.rss["sidecar_after_warmup_kb"])]
        self.gate.records.update()
        mark = self.gate.records.snapshot()
        served = completed = 0
        start = time.monotonic()
        i = 0
        while (left := seconds - (time.monotonic() - start)) >= 1:
            case = args.cases[i % len(args.cases)]
            i += 1
            r = self.run("c", case, conns, int(min(60, left)), record=False)
            served += r.mock_served
            completed += r.requests
            elapsed = round(time.monotonic() - start)
            series.append((elapsed, rss_kb(self.gate.sidecar)))
            say(f"  t={elapsed:4d}s {case:16s} {r.rps:8.0f} req/s p99 {r.p99_ms:6.2f} ms  "
                f"sidecar RSS {series[-1][1] / 1024:.1f} MiB")
        self.pending = RecordCheck(f"soak {seconds}s", served, completed, mark, time.monotonic())
        check = self.check_pending()
        self.rss["sidecar_end_kb"] = rss_kb(self.gate.sidecar)
        self.rss["nginx_worker_end_kb"] = rss_kb(self.gate.nginx_worker)
        start_kb, end_kb = series[0][1] or 0, self.rss["sidecar_end_kb"] or 0
        say(f"sidecar RSS: start {start_kb / 1024:.1f} MiB (after warm-up), end {end_kb / 1024:.1f} MiB "
            f"({(end_kb - start_kb) / 1024:+.1f} MiB); nginx worker end {(self.rss['nginx_worker_end_kb'] or 0) / 1024:.1f} MiB")
        if args.json:
            print(json.dumps({"soak_seconds": seconds, "cpu_split": self.cpu.describe(), "rss_series_kb": series,
                              "rss": self.rss, "records": check.as_dict()}, indent=2))
        return 0 if check.ok else 1

    # -------------------------------------------------------- report
    def _get(self, config: str, case: str, conns: int) -> Run | None:
        return next((r for r in self.runs if (r.config, r.case, r.conns) == (config, case, conns)), None)

    def report(self) -> int:
        args = self.args
        lo, hi = min(args.conns), max(args.conns)
        summary: dict = {"cpu_split": self.cpu.describe(), "duration_s": args.duration, "warmup_s": args.warmup,
                         "cases": {}, "rss": self.rss, "targets": {}}
        say()
        say(f"CPU split: {self.cpu.describe()}")
        for case in args.cases:
            say()
            say(f"== {CASE_TITLES[case]}")
            say(f"{'conns':>5}  {'configuration':14s} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
                f"{'errors':>6}  CPU us/request: per core (busy) | per process")
            case_out: dict = {"runs": {}, "ratios": {}}
            for conns in args.conns:
                for config in ("a", "b", "c"):
                    r = self._get(config, case, conns)
                    if r is None:
                        continue
                    cpu = "  ".join(f"{k} {v:.0f} ({r.core_busy.get(k, 0):.0%})" for k, v in r.core_us_per_req.items())
                    cpu += " | " + " ".join(f"{k} {v:.0f}" for k, v in r.cpu_us_per_req.items())
                    say(f"{conns:>5}  {CONFIG_TITLES[config]:14s} {r.rps:9.0f} {r.p50_ms:8.3f} {r.p90_ms:8.3f} "
                        f"{r.p99_ms:8.3f} {r.errors + r.status_errors:6d}  {cpu}")
                    case_out["runs"][f"{config}@{conns}"] = r.as_dict()
            for conns in args.conns:
                a, b, c = (self._get(x, case, conns) for x in "abc")
                if b and c and b.rps:
                    cb = c.rps / b.rps
                    ca = c.rps / a.rps if a and a.rps else None
                    say(f"ratios @{conns}: (c)/(b) = {cb:.3f}" + (f"   (c)/(a) = {ca:.3f}" if ca else ""))
                    case_out["ratios"][str(conns)] = {"c_over_b": round(cb, 4)}
                    if ca:
                        case_out["ratios"][str(conns)]["c_over_a"] = round(ca, 4)
                    core = f"core{self.cpu.gate_core}"
                    b_us, c_us = b.core_us_per_req.get(core), c.core_us_per_req.get(core)
                    if b_us and c_us and self.cpu.taskset:
                        # What each costs on the proxy core: the capacity ratio once that core is the limit.
                        say(f"   proxy-core CPU per request @{conns}: (b) {b_us:.0f} us, (c) {c_us:.0f} us "
                            f"-> (b)/(c) = {b_us / c_us:.3f}")
                        case_out["ratios"][str(conns)]["cpu_b_over_c"] = round(b_us / c_us, 4)
            if is_tls(case):
                self._tls_cost(case, case_out)
            b1, c1 = self._get("b", case, lo), self._get("c", case, lo)
            if b1 and c1:
                added = c1.p50_ms - b1.p50_ms
                say(f"added p50 of (c) over (b) @{lo}: {added * 1000:.0f} us ({added:.3f} ms)")
                case_out["added_p50_ms"] = round(added, 4)
            for check in self.checks:
                if check.label.startswith(case + " "):
                    say(check.line())
                    case_out.setdefault("records", {})[check.label] = check.as_dict()
            summary["cases"][case] = case_out
        say()
        perturbed = [r for r in self.runs if r.other_load > 0.05]
        summary["other_load_max"] = max((r.other_load for r in self.runs), default=0)
        if perturbed:
            say(f"WARNING: other processes used up to {summary['other_load_max']:.0%} of the two cores during "
                f"{len(perturbed)} of {len(self.runs)} runs ("
                + ", ".join(f"{r.config} {r.case} c={r.conns}" for r in perturbed[:6])
                + (", ..." if len(perturbed) > 6 else "") + "): those numbers are perturbed; rerun on a quiet machine")
        summary["mock"] = {}
        for case in args.cases:
            # Per case: the mock's direct rate (wrk on the same core) and its own CPU per request
            # (what it could serve with the load core to itself), against the best proxied rate.
            a = max((r for r in self.runs if r.config == "a" and r.case == case), key=lambda r: r.rps, default=None)
            proxied = max((r.rps for r in self.runs if r.config != "a" and r.case == case), default=0)
            mock_us = a.cpu_us_per_req.get("mock") if a else None
            if a and proxied:
                capacity = 1e6 / mock_us if mock_us else 0
                say(f"mock, {case}: direct {a.rps:.0f} req/s = {a.rps / proxied:.1f}x the best proxied rate "
                    f"({proxied:.0f}); its own CPU {mock_us} us/req, i.e. ~{capacity:.0f} req/s on a core "
                    f"= {capacity / proxied:.1f}x"
                    + ("" if a.rps >= 3 * proxied else "  (wrk + mock share core 0: see docs/performance.md)"))
                summary["mock"][case] = {"direct_rps": a.rps, "best_proxied_rps": proxied, "mock_cpu_us_per_req": mock_us,
                                         "direct_over_proxied": round(a.rps / proxied, 2)}
        say(f"sidecar RSS: start {self._mib('sidecar_start_kb')}, after warm-up {self._mib('sidecar_after_warmup_kb')}, "
            f"end {self._mib('sidecar_end_kb')}; LMGate nginx worker: start {self._mib('nginx_worker_start_kb')}, "
            f"end {self._mib('nginx_worker_end_kb')}")
        records_ok = all(c.ok for c in self.checks) and bool(self.checks)
        say(f"records == requests served by the mock, for every LMGate run: {'PASS' if records_ok else 'FAIL'}")
        summary["records_ok"] = records_ok
        if not args.smoke:
            say()
            say("targets for (c):")
            for case in args.cases:
                ratio = summary["cases"][case]["ratios"].get(str(hi), {}).get("c_over_b")
                c_hi = self._get("c", case, hi)
                added = summary["cases"][case].get("added_p50_ms")
                rows = [(f"{case}: (c)/(b) req/s @{hi} >= {TARGET_RATIO}", ratio, ratio is not None and ratio >= TARGET_RATIO),
                        (f"{case}: p99 @{hi} <= {TARGET_P99_MS} ms", c_hi.p99_ms if c_hi else None,
                         c_hi is not None and c_hi.p99_ms <= TARGET_P99_MS),
                        (f"{case}: added p50 @{lo} <= {TARGET_ADDED_P50_MS} ms", added,
                         added is not None and added <= TARGET_ADDED_P50_MS)]
                for name, value, met in rows:
                    if value is None:
                        continue
                    say(f"  {name:44s} {value:8.3f}  {'met' if met else 'MISSED'}")
                    summary["targets"][name] = {"value": value, "met": met}
            say(f"  {'zero stats records lost or doubled':44s} {'':8s}  {'met' if records_ok else 'MISSED'}")
        if args.json:
            print(json.dumps(summary, indent=2))
        return 0 if records_ok else 1

    def _tls_cost(self, case: str, case_out: dict) -> None:
        """What TLS adds per request: the TLS case against its plain twin, for (b) and (c)."""
        core = f"core{self.cpu.gate_core}"
        for conns in self.args.conns:
            for config in ("b", "c"):
                plain, tls = self._get(config, base_case(case), conns), self._get(config, case, conns)
                if not (plain and tls and plain.rps):
                    continue
                cost = {"rps_plain": plain.rps, "rps_tls": tls.rps, "p50_added_ms": round(tls.p50_ms - plain.p50_ms, 4)}
                line = (f"TLS cost @{conns} {CONFIG_TITLES[config]}: {plain.rps:.0f} -> {tls.rps:.0f} req/s "
                        f"({tls.rps / plain.rps - 1:+.1%}), p50 {cost['p50_added_ms'] * 1000:+.0f} us")
                # The nginx worker's own CPU is the cost of TLS itself; the proxy core's also counts
                # whatever else ran on it (the sidecar; other jobs on a shared machine).
                p_us, t_us = plain.cpu_us_per_req.get("nginx"), tls.cpu_us_per_req.get("nginx")
                if p_us and t_us:
                    cost["nginx_us_added"] = round(t_us - p_us, 1)
                    line += f", nginx worker CPU {p_us:.0f} -> {t_us:.0f} us/request ({t_us - p_us:+.0f} us)"
                p_us, t_us = plain.core_us_per_req.get(core), tls.core_us_per_req.get(core)
                if p_us and t_us and self.cpu.taskset:
                    cost["proxy_core_us_added"] = round(t_us - p_us, 1)
                    line += f", proxy core {p_us:.0f} -> {t_us:.0f} us ({t_us - p_us:+.0f})"
                say(line)
                case_out.setdefault("tls_cost", {})[f"{config}@{conns}"] = cost

    def _mib(self, key: str) -> str:
        kb = self.rss.get(key)
        return f"{kb / 1024:.1f} MiB" if kb else "?"

    def stop(self) -> None:
        for part in (self.gate, self.bare, self.mock):
            if part is not None:
                try:
                    part.stop()
                except Exception as exc:  # keep stopping the others
                    print(f"bench: could not stop {part}: {exc}", file=sys.stderr)
        if self.args.keep:
            print(f"bench: kept {self.folder}", file=sys.stderr)
        else:
            shutil.rmtree(self.folder, ignore_errors=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="LMGate overhead benchmark (see docs/performance.md)")
    p.add_argument("--duration", type=int, default=15, help="seconds per measured run (default 15)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up seconds per configuration (default 3)")
    p.add_argument("--cases", help=f"comma-separated, of {','.join(CASES)} (default all; --smoke: "
                   "plain,stream-onewrite,stream-no-usage)")
    p.add_argument("--conns", help="comma-separated connection counts (default 1,64; --smoke: 64)")
    p.add_argument("--smoke", action="store_true",
                   help="correctness only: 2 s runs, plain, stream-onewrite and stream-no-usage at 64 connections; "
                        "exit 1 unless records == requests")
    p.add_argument("--soak", type=int, metavar="SECONDS", help="LMGate alone at full load for SECONDS; "
                   "reports the sidecar's RSS at start and end (not run by default)")
    p.add_argument("--json", action="store_true", help="machine-readable results on stdout (tables go to stderr)")
    p.add_argument("--config", type=Path, default=CONFIG, help=f"LMGate's config file (default {CONFIG})")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="record py-spy (sidecar) and perf (proxy core) profiles of the LMGate runs at the highest "
                        "connection count into DIR (perturbs the load core; see docs/performance.md)")
    p.add_argument("--policy", default="", metavar="COLUMNS",
                   help='the bench key\'s per-key policy, e.g. "rpm=100000000" or "models=gpt-*" (README: '
                        'Per-key policies); default none')
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores with taskset")
    p.add_argument("--keep", action="store_true", help="keep the work folder (configs, logs, stats)")
    args = p.parse_args(argv)
    if args.smoke:
        args.duration, args.warmup = 2, 1
    args.cases = args.cases or ("plain,stream-onewrite,stream-no-usage" if args.smoke else ",".join(CASES))
    args.conns = args.conns or ("64" if args.smoke else "1,64")
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown or not args.cases:
        p.error(f"--cases: unknown {unknown}; choose from {','.join(CASES)}")
    try:
        args.conns = sorted({int(c) for c in args.conns.split(",")})
    except ValueError:
        p.error("--conns: comma-separated integers")
    if args.duration < 1 or args.warmup < 1 or (args.soak is not None and args.soak < 1):
        p.error("--duration, --warmup and --soak are whole seconds >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    global OUT
    args = parse_args(argv)
    if args.json:
        OUT = sys.stderr
    bench = Bench(args)
    # This script polls files and /proc between runs: keep it off the proxy core.
    if bench.cpu.taskset:
        os.sched_setaffinity(0, {int(bench.cpu.load_core)})
    started = time.monotonic()
    try:
        bench.start(bare=args.soak is None)
        return bench.soak(args.soak) if args.soak is not None else bench.benchmark()
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        bench.stop()
        print(f"bench: {time.monotonic() - started:.0f}s in all", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
