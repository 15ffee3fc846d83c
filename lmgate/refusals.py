"""Bounding the records of refused calls: a flood of bad keys must not flood the stats file.

Per client address, the first `per_window` calls (stats.refusal_records_per_window) refused as
`forbidden` or `bad_path` in each
WINDOW_SECONDS (of the calls' own times) are recorded one by one; the rest of that window become
one record: the first of them, with `folded_calls` (how many refused calls it stands for). Allowed
calls and calls refused while the sidecar was down (`gate_unavailable`) are never folded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

WINDOW_SECONDS = 10.0
# Refusals anyone can cause without a key: a key not listed, a path that is refused.
FOLDED = frozenset({"forbidden", "bad_path"})


@dataclass
class _Window:
    start: float
    recorded: int = 0
    folded: dict[str, Any] | None = None  # the first folded call's record, with its count
    calls: int = 0
    ends: float = field(init=False)

    def __post_init__(self) -> None:
        self.ends = self.start + WINDOW_SECONDS


class RefusalFolder:
    """Decides which refused calls are recorded one by one; hands folded records to `emit`."""

    def __init__(self, emit: Callable[[dict[str, Any]], None], per_window: int) -> None:
        self.emit = emit
        self.per_window = per_window
        self.windows: dict[str, _Window] = {}

    def keep(self, record: dict[str, Any], address: str, at: float) -> bool:
        """True if `record` (a call ended at `at`, from `address`) is to be written as it is."""
        if record["error_type"] not in FOLDED:
            return True
        window = self.windows.get(address)
        if window is None or at >= window.ends:
            if window is not None:
                self._close(window)
            window = self.windows[address] = _Window(at)
        if window.recorded < self.per_window:
            window.recorded += 1
            return True
        if window.folded is None:
            window.folded = record
        window.calls += 1
        return False

    def close_ended(self, now: float) -> None:
        """Write the folded record of every window that ended before `now`, and forget it."""
        if self.windows:
            for address, window in list(self.windows.items()):
                if window.ends <= now:
                    self._close(window)
                    del self.windows[address]

    def close_all(self) -> None:
        """At shutdown: every folded count still held is written."""
        for window in self.windows.values():
            self._close(window)
        self.windows.clear()

    def _close(self, window: _Window) -> None:
        if window.folded is not None:
            self.emit({**window.folded, "folded_calls": window.calls})
            window.folded, window.calls = None, 0
