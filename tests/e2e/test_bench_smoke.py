"""scripts/bench.py --smoke: the overhead benchmark runs end to end, and every call LMGate proxied
during it has exactly one stats record (records == requests served by the mock). Timings are not
checked: they are noisy on shared machines (see docs/performance.md for the real run)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "scripts" / "bench.py"
ECHO_MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/share/nginx/modules", "/etc/nginx/modules",
                    "/usr/local/nginx/modules", "/usr/lib64/nginx/modules")
# stream-no-usage: every record of a stream LMGate asked for its usage has it (usage_missing=0).
SMOKE_CASES = ("plain", "stream-onewrite", "stream-no-usage")
RECORDS_LINE = re.compile(r"^RECORDS (?P<label>.+?): mock_served=(?P<served>\d+) records=(?P<records>\d+) "
                          r"client_completed=(?P<completed>\d+) .*-> (?P<verdict>PASS|FAIL)$", re.M)


@pytest.mark.timeout(120)
def test_bench_smoke_records_equal_requests():
    if not shutil.which("wrk"):
        pytest.skip("wrk is not installed (apt-get install wrk)")
    if not any((Path(d) / "ngx_http_echo_module.so").is_file() for d in ECHO_MODULE_DIRS):
        pytest.skip("the nginx echo module is not installed (apt-get install libnginx-mod-http-echo)")
    done = subprocess.run([sys.executable, str(BENCH), "--smoke"], cwd=REPO, capture_output=True, text=True,
                          timeout=90)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    found = {m["label"]: m for m in RECORDS_LINE.finditer(done.stdout)}
    for case in SMOKE_CASES:
        label = f"{case} c=64"
        assert label in found, f"no records check for {label}:\n{output}"
        m = found[label]
        assert m["verdict"] == "PASS", output
        assert int(m["served"]) > 0, output
        # Every call reached the mock and completed (the load drains before wrk stops) and has
        # exactly one record: none lost, none doubled.
        assert int(m["records"]) == int(m["served"]) == int(m["completed"]), output
    assert "records == requests served by the mock, for every LMGate run: PASS" in done.stdout, output
    # Each configuration answered: a table row per configuration and case.
    for title in ("a mock direct", "b bare nginx", "c LMGate"):
        assert len(re.findall(rf"^\s+64  {title}\s+\d+", done.stdout, re.M)) == len(SMOKE_CASES), output
