"""Report rows, and the rows as a table, CSV or JSON."""

from __future__ import annotations

import csv
import json
import textwrap
from dataclasses import dataclass, field
from typing import Any, TextIO

from lmgate.records import POLICY_ERRORS
from lmgate.report.prices import GENAI, Pricer, genai_version

# error_type values: a denied call never reached the provider; these two are successful calls
# whose counts are missing (a request, not an error).
DENIED = frozenset({"forbidden", "gate_unavailable", "bad_path", *POLICY_ERRORS})
NO_USAGE = frozenset({"usage_missing", "capture_truncated"})

COUNTERS = ("requests", "denied", "errors", "input_tokens", "output_tokens", "cache_read_tokens",
            "cache_write_tokens", "reasoning_tokens", "cost_usd")
# Then, in CSV and JSON: who priced the row's usage (genai-prices and/or the price file).
SOURCE = "price_source"
WIDTH = 80


@dataclass
class Row:
    group: tuple
    requests: int = 0
    denied: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost: float = 0.0          # of the priced usage
    priced: bool = False       # some usage has a price
    unpriced: bool = False     # some usage has none: the cost is not known
    sources: tuple[str, ...] = ()   # who priced the priced usage

    @property
    def cost_usd(self) -> float | None:
        return None if self.unpriced else round(self.cost, 6)

    @property
    def price_source(self) -> str:
        return "+".join(self.sources)

    def add(self, other: Row) -> None:
        for name in COUNTERS[:-1]:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.cost += other.cost
        self.priced |= other.priced
        self.unpriced |= other.unpriced
        self.sources = tuple(sorted(set(self.sources) | set(other.sources)))


@dataclass
class Report:
    by: tuple[str, ...]
    rows: list[Row]
    total: Row
    unpriced: dict[str, int] = field(default_factory=dict)   # "model (price list)" -> requests
    no_usage: int = 0          # successful calls without token counts
    pricer: Pricer | None = None
    window: str = ""           # the time window, in words ("" for all records)
    overridden: dict[str, list[str]] = field(default_factory=dict)  # price file -> its models


# ---------------------------------------------------------------- json and csv

def records(report: Report) -> list[dict[str, Any]]:
    """One object per group: its fields, COUNTERS (cost_usd null when not known), SOURCE."""
    return [{**dict(zip(report.by, row.group, strict=True)), **{name: getattr(row, name) for name in COUNTERS},
             SOURCE: row.price_source} for row in report.rows]


def write_json(report: Report, out: TextIO) -> None:
    json.dump(records(report), out, indent=2, ensure_ascii=False)
    out.write("\n")


def write_csv(report: Report, out: TextIO) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(list(report.by) + list(COUNTERS) + [SOURCE])
    for row in report.rows:
        cost_cell = "" if row.cost_usd is None else f"{row.cost_usd:.6f}"
        writer.writerow(["" if v is None else v for v in row.group]
                        + [getattr(row, name) for name in COUNTERS[:-1]] + [cost_cell,
                                                                              row.price_source])


def notes(report: Report) -> list[str]:
    """What a reader must know beside the numbers: missing prices, missing counts."""
    lines = []
    for source, models in report.overridden.items():
        lines.append(f"priced by {source}: " + ", ".join(models))
    if report.unpriced:
        lines.append("unpriced models: " + ", ".join(
            f"{label}: {n:,} request{'s' if n != 1 else ''}" for label, n in report.unpriced.items()))
    if report.no_usage:
        lines.append(f"{report.no_usage:,} successful calls had no token counts (usage_missing, "
                     "capture_truncated): their tokens and cost are not included")
    return lines


# ---------------------------------------------------------------- the table

NUMERIC = (("Reqs", "requests"), ("Deny", "denied"), ("Err", "errors"), ("In", "input_tokens"),
           ("Out", "output_tokens"), ("CR", "cache_read_tokens"), ("CW", "cache_write_tokens"),
           ("Rsn", "reasoning_tokens"), ("USD", "cost"))
_UNITS = ("", "k", "M", "G", "T", "P")


def human_tokens(n: int) -> str:
    """At most 5 characters: 999, 1.2k, 12k, 123k, 1.2M, ..."""
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    if value < 1000:
        return f"{sign}{int(value)}"
    for unit in _UNITS[1:]:
        value /= 1000
        if round(value, 1) < 10:
            return f"{sign}{value:.1f}{unit}"
        if round(value) < 1000:
            return f"{sign}{value:.0f}{unit}"
    return f"{sign}{value:.0f}{_UNITS[-1]}"


def money(row: Row) -> str:
    """Cost cell: blank when nothing is priced; a trailing + when unpriced usage is left out."""
    if row.unpriced and not row.priced:
        return ""
    text = "<0.01" if 0 < row.cost < 0.005 else f"{row.cost:,.2f}"
    return text + ("+" if row.unpriced else "")


def _numbers(row: Row) -> list[str]:
    cells = []
    for _, name in NUMERIC:
        if name == "cost":
            cells.append(money(row))
        elif name in ("requests", "denied", "errors"):
            cells.append(f"{getattr(row, name):,}")
        else:
            cells.append(human_tokens(getattr(row, name)))
    return cells


def _clip(text: str, width: int, ellipsis: str) -> str:
    return text if len(text) <= width else text[:max(width - len(ellipsis), 0)] + ellipsis


def _fit(widths: list[int], room: int, gap: int) -> list[int]:
    """Narrow the widest columns until they fit in `room` (each keeps at least 3 characters)."""
    widths = list(widths)
    while widths and sum(widths) + gap * (len(widths) - 1) > room:
        widest = max(range(len(widths)), key=widths.__getitem__)
        if widths[widest] <= 3:
            break
        widths[widest] -= 1
    return widths


def table_lines(report: Report, ellipsis: str = "…") -> list[str]:
    """The table and its notes, every line at most WIDTH characters."""
    heads = [h for h, _ in NUMERIC]
    show = report.rows if report.by else []      # with no --by fields the total is the report
    group_cells = [["-" if v is None else str(v) for v in r.group] for r in show]
    number_cells = [_numbers(r) for r in show] + [_numbers(report.total)]
    num_w = [max(len(c[i]) for c in number_cells + [heads]) for i in range(len(heads))]
    grp_heads = list(report.by) or [""]
    total_label = ["TOTAL"] + [""] * (len(grp_heads) - 1)
    grp_w = [max([len(h)] + [len(c[i]) for c in group_cells + [total_label]])
             for i, h in enumerate(grp_heads)]

    def nums(cells: list[str], gap: str) -> str:
        return gap.join(c.rjust(w) for c, w in zip(cells, num_w, strict=True))

    def grp(cells: list[str], widths: list[int]) -> str:
        return "  ".join(_clip(c, w, ellipsis).ljust(w) for c, w in zip(cells, widths, strict=True))

    lines = []
    if sum(grp_w) + 2 * len(grp_w) + len(nums(heads, " ")) <= WIDTH:
        def line(g: list[str], n: list[str]) -> str:
            return grp(g, grp_w) + "  " + nums(n, " ")
        lines.append(line(grp_heads, heads))
        lines += [line(g, n) for g, n in zip(group_cells, number_cells[:-1], strict=True)]
        lines.append(line(total_label, number_cells[-1]))
    else:
        # Stacked: the group's values on one line, its numbers indented on the next.
        widths = _fit(grp_w, WIDTH, 2)
        gap = "  " if 2 + len(nums(heads, "  ")) <= WIDTH else " "
        lines.append(grp(grp_heads, widths))
        lines.append("  " + nums(heads, gap))
        for g, n in zip(group_cells, number_cells[:-1], strict=True):
            lines.append(grp(g, widths))
            lines.append("  " + nums(n, gap))
        lines.append("TOTAL")
        lines.append("  " + nums(number_cells[-1], gap))
    if not report.rows:
        lines.append("(no records)")
    lines += _legend(report)
    return [_clip(line.rstrip(), WIDTH, ellipsis) for line in lines]


def _legend(report: Report) -> list[str]:
    text = ["Tokens in k (thousand), M (million). In: input not read from cache; CR, CW: cache "
            "read, cache write; Rsn: reasoning, included in Out. Deny, Err: calls denied by "
            "the gate, calls that failed."]
    pricer = report.pricer
    if pricer is not None:
        said = f"USD at list prices from {GENAI} {genai_version()} on each call's date"
        if pricer.overrides is not None:
            said += f", overridden by {pricer.overrides.source} (as of {pricer.overrides.as_of})"
        text.append(said + "." + (" A + marks a partial cost: usage of unpriced models is not in it."
                                  if report.total.unpriced else ""))
    if report.window:
        text.append(report.window)
    text += notes(report)
    lines = []
    for paragraph in text:
        lines += textwrap.wrap(paragraph, WIDTH, break_long_words=True, break_on_hyphens=False)
    return lines


def write_table(report: Report, out: TextIO) -> None:
    encoding = getattr(out, "encoding", None) or "utf-8"
    try:
        "…".encode(encoding)
        ellipsis = "…"
    except (UnicodeEncodeError, LookupError):
        ellipsis = "~"
    out.write("\n".join(table_lines(report, ellipsis)) + "\n")
