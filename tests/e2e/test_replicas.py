"""Many replicas, as in Kubernetes but on one machine: three `lmgate up`, each with its own ports,
runtime folder, spool and stats, sharing only the allow-list file. A round-robin client spreads
calls over them; `lmgate report --stats` over the three replicas' files counts every call once."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import httpx
import pytest

from tests.support.gate import ALICE_KEY, BOB_KEY, CONFIG, UNLISTED_KEY, Gate
from tests.support.http import bearer
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e

REPLICAS = 3
CALLS = 60
PATH = "/v1/replicas/chat/completions"
CHAT = {"id": "chatcmpl-r", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}
CAROL_KEY = "sk-lmgate-test-carol-5555555555555555"


def report(*argv: str) -> dict[str, int]:
    """`lmgate report --by lmgate_id --format json` as a user runs it: requests per key id."""
    result = subprocess.run([sys.executable, "-m", "lmgate", "report", "--config", str(CONFIG), "--by", "lmgate_id",
                             "--format", "json", *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return {row["lmgate_id"] or "-": row["requests"] for row in json.loads(result.stdout)}


def test_three_replicas_share_the_allow_list_and_the_report_counts_every_call_once(mock_upstream, tmp_path):
    mock_upstream.reply(PATH, body=json.dumps(CHAT).encode())
    shared = tmp_path / "shared" / "allowlist.csv"
    gates = [Gate(tmp_path / f"replica-{i}", mock_upstream.url, LMGATE_AUTH__ALLOWLIST_PATH=str(shared))
             for i in range(REPLICAS)]
    shared.parent.mkdir()
    shared.write_text(gates[0].allowlist.read_text())      # alice and bob (hashed)
    for g in gates:
        g.allowlist.unlink()                               # only the shared list exists
    sent: Counter[str] = Counter()
    try:
        for g in gates:
            g.start()
        assert len({(g.port, g.sidecar_port) for g in gates}) == REPLICAS
        keys = [("alice", ALICE_KEY), ("bob", BOB_KEY), ("-", UNLISTED_KEY)]
        with httpx.Client() as client:
            def post(g: Gate, key: str, name: str) -> int:
                """One call; counted as the report will: under its key's id, or "-" if refused."""
                status = client.post(g.base("openai") + PATH, headers=bearer(key), content=b"{}").status_code
                sent[name if status == 200 else "-"] += 1
                return status

            for i in range(CALLS):
                name, key = keys[i % len(keys)]
                g = gates[i % REPLICAS]
                assert post(g, key, name) == (403 if name == "-" else 200), f"call {i} to replica {i % REPLICAS}"
            # One edit of the shared file reaches every replica.
            shared.write_text(shared.read_text() + f"carol,{CAROL_KEY},carol@example.com,2026-12-05\n")
            for g in gates:
                wait_until(lambda g=g: post(g, CAROL_KEY, "carol") == 200, 10, f"carol let in by {g.url}")
    finally:
        codes = [g.stop() for g in gates]
    assert codes == [0] * REPLICAS, [g.log() for g in gates]

    # Each replica recorded the calls it served, and only those (a record with folded_calls
    # stands for that many refused calls from one address).
    per_replica = [sum(r.get("folded_calls") or 1 for r in g.records()) for g in gates]
    assert sum(per_replica) == sum(sent.values()) and all(per_replica)
    expected = dict(sent)
    # Every file once, whether named by a glob, a folder, or both overlapping.
    assert report("--stats", str(tmp_path / "replica-*" / "stats*.jsonl*")) == expected
    assert report("--stats", str(tmp_path), "--stats", str(tmp_path / "replica-1" / "stats.jsonl")) == expected
    # One replica's file alone is its share only.
    assert sum(report("--stats", str(gates[1].stats)).values()) == per_replica[1]
    served = [s for s in mock_upstream.seen if s.path_qs == PATH]
    assert len(served) == sent["alice"] + sent["bob"] + sent["carol"]
