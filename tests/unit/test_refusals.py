"""lmgate.refusals: a flood of refused calls is recorded with a bound, and every call counted."""

from __future__ import annotations

import pytest

from lmgate.refusals import WINDOW_SECONDS, RefusalFolder
from lmgate.settings import StatsSettings

REFUSALS_PER_WINDOW = StatsSettings().refusal_records_per_window

pytestmark = pytest.mark.unit


def refused(n: int, error_type: str = "forbidden") -> dict:
    return {"request_id": f"r{n}", "error_type": error_type, "masked_key": f"...{n:06d}"}


def run(calls: list[tuple[dict, str, float]]) -> tuple[list[dict], list[dict]]:
    """(records kept as they are, folded records written), with every window closed at the end."""
    folded: list[dict] = []
    folder = RefusalFolder(folded.append, REFUSALS_PER_WINDOW)
    kept = [record for record, address, at in calls if folder.keep(record, address, at)]
    folder.close_all()
    return kept, folded


def test_a_flood_from_one_address_keeps_the_first_ones_and_folds_the_rest_with_their_count():
    kept, folded = run([(refused(i), "10.0.0.1", 100.0 + i * 0.001) for i in range(5000)])
    assert [r["request_id"] for r in kept] == [f"r{i}" for i in range(REFUSALS_PER_WINDOW)]
    [fold] = folded
    assert fold["folded_calls"] == 5000 - REFUSALS_PER_WINDOW
    assert fold["request_id"] == f"r{REFUSALS_PER_WINDOW}"  # the first folded call stands for them


def test_every_window_starts_again_and_counts_are_exact():
    calls = [(refused(i), "a", 1000.0 + i * 0.1) for i in range(1000)]  # 100 s, 10 calls/s
    kept, folded = run(calls)
    windows = int(1000 * 0.1 / WINDOW_SECONDS)
    assert len(kept) == windows * REFUSALS_PER_WINDOW
    assert len(kept) + sum(f["folded_calls"] for f in folded) == 1000
    assert len(folded) == windows


def test_addresses_are_bounded_apart_and_other_outcomes_are_never_folded():
    calls = [(refused(i), addr, 5.0) for i in range(50) for addr in ("a", "b")]
    calls += [(refused(i, "gate_unavailable"), "a", 5.0) for i in range(50)]
    calls += [(refused(i, None), "a", 5.0) for i in range(50)]
    kept, folded = run(calls)
    assert sum(r["error_type"] == "forbidden" for r in kept) == 2 * REFUSALS_PER_WINDOW
    assert sum(r["error_type"] != "forbidden" for r in kept) == 100
    assert sorted(f["folded_calls"] for f in folded) == [50 - REFUSALS_PER_WINDOW] * 2


def test_close_ended_writes_only_windows_that_are_over():
    folded: list[dict] = []
    folder = RefusalFolder(folded.append, REFUSALS_PER_WINDOW)
    for i in range(REFUSALS_PER_WINDOW + 3):
        folder.keep(refused(i), "old", 0.0)
        folder.keep(refused(i), "new", 8.0)
    folder.close_ended(WINDOW_SECONDS + 1)
    assert [f["folded_calls"] for f in folded] == [3]
    assert list(folder.windows) == ["new"]
