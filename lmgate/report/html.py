"""`lmgate report --format html`: one self-contained page (inline CSS and SVG, no script, nothing
fetched) with spend and tokens per day as charts, the top owners, keys and models, error rates,
and the same table as `--format table`.

Every chart bar carries its number in `data-value` (and its day in `data-day`), so a test or a
script can read the page's figures; they are the `--format json` values of the same grouping.
Every value from the records is HTML-escaped: owners and models are data, never markup.
"""

from __future__ import annotations

import datetime as dt
from html import escape
from typing import TextIO

from lmgate.report.output import Report, Row, human_tokens, money, table_lines

TOP = 10
# Token kinds stacked in the tokens chart: (Row attribute, label, colour).
TOKEN_SERIES = (("input_tokens", "In", "#4e79a7"), ("output_tokens", "Out", "#f28e2b"),
                ("cache_read_tokens", "CR", "#76b7b2"), ("cache_write_tokens", "CW", "#59a14f"))
CHART_W, CHART_H, PAD_L, PAD_B, PAD_T = 720, 220, 64, 40, 12

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;
background:#fff;max-width:1100px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.meta{color:#555;margin:0 0 12px}
.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{border:1px solid #ddd;border-radius:6px;padding:10px 14px;min-width:120px}
.card b{display:block;font-size:20px}
table{border-collapse:collapse;margin:4px 0}
th,td{padding:3px 10px;border-bottom:1px solid #eee;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}
td.name{max-width:360px;overflow:hidden;text-overflow:ellipsis}
.bar{display:inline-block;height:10px;background:#4e79a7;vertical-align:middle}
pre{background:#f6f6f6;padding:12px;overflow-x:auto;font-size:12px}
svg text{font-size:11px;fill:#444}.legend span{margin-right:14px}
.swatch{display:inline-block;width:10px;height:10px;margin-right:4px}
"""


def _num(value: float) -> str:
    """A number for a data attribute: integers as they are, dollars to 6 decimals."""
    return str(value) if isinstance(value, int) else f"{round(value, 6):.6f}".rstrip("0").rstrip(".")


def _day_axis(days: list[str]) -> list[str]:
    """Every day from the first to the last (a day without calls is a zero, not a gap)."""
    if not days:
        return []
    first, last = dt.date.fromisoformat(days[0]), dt.date.fromisoformat(days[-1])
    return [(first + dt.timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]


def _bar_chart(chart_id: str, title: str, days: list[str],
               series: list[tuple[str, str, str, dict[str, float]]], money_axis: bool) -> str:
    """A stacked bar chart per day as inline SVG; `series` is (key, label, colour, day -> value)."""
    totals = {d: sum(s[3].get(d, 0) for s in series) for d in days}
    top = max(totals.values(), default=0) or 1
    inner_w, inner_h = CHART_W - PAD_L - 8, CHART_H - PAD_B - PAD_T
    step = inner_w / max(len(days), 1)
    bar_w = max(min(step * 0.7, 48), 1)
    out = [f'<figure class="chart" id="{chart_id}" data-days="{len(days)}">',
           f'<svg xmlns="http://www.w3.org/2000/svg" width="{CHART_W}" height="{CHART_H}" '
           f'viewBox="0 0 {CHART_W} {CHART_H}" role="img" aria-label="{escape(title)}">']
    for i in range(5):   # grid lines and the axis' labels
        y = PAD_T + inner_h - inner_h * i / 4
        value = top * i / 4
        label = f"${value:,.2f}" if money_axis else human_tokens(int(value))
        out.append(f'<line x1="{PAD_L}" x2="{CHART_W - 8}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>'
                   f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(label)}</text>')
    every = max(1, len(days) // 12)
    for i, day in enumerate(days):
        x = PAD_L + step * i + (step - bar_w) / 2
        y = PAD_T + inner_h
        for key, label, colour, values in series:
            value = values.get(day, 0)
            h = inner_h * value / top
            y -= h
            shown = f"${value:,.6f}" if money_axis else f"{value:,}"
            out.append(f'<rect class="seg" data-series="{key}" data-day="{day}" data-value="{_num(value)}" '
                       f'x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{h:.1f}" fill="{colour}">'
                       f'<title>{day} {escape(label)}: {shown}</title></rect>')
        if i % every == 0:
            out.append(f'<text x="{x + bar_w / 2:.1f}" y="{CHART_H - PAD_B + 16}" '
                       f'text-anchor="middle">{day[5:]}</text>')
    out.append("</svg>")
    if len(series) > 1:
        out.append('<figcaption class="legend">' + "".join(
            f'<span><i class="swatch" style="background:{c}"></i>{escape(label)}</span>'
            for _, label, c, _ in series) + "</figcaption>")
    out.append("</figure>")
    return "\n".join(out)


def _rate(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _top_table(table_id: str, report: Report, head: str) -> str:
    """The TOP groups by cost, then tokens, with a bar for their share of the cost."""
    rows = sorted(report.rows, key=lambda r: (-r.cost, -(r.input_tokens + r.output_tokens),
                                              -r.requests))[:TOP]
    most = max((r.cost for r in rows), default=0) or 1
    out = [f'<table id="{table_id}"><tr><th>{escape(head)}</th><th>Requests</th><th>Error rate</th>'
           '<th>Tokens in</th><th>Tokens out</th><th>USD</th><th></th></tr>']
    for r in rows:
        name = " / ".join("-" if v is None else str(v) for v in r.group)
        width = int(160 * r.cost / most)
        out.append(f'<tr data-name="{escape(name)}" data-cost="{_num(r.cost)}">'
                   f'<td class="name" title="{escape(name)}">{escape(name)}</td>'
                   f'<td>{r.requests:,}</td><td>{_rate(r.errors, r.requests)}</td>'
                   f'<td>{human_tokens(r.input_tokens)}</td><td>{human_tokens(r.output_tokens)}</td>'
                   f'<td>{escape(money(r))}</td><td><span class="bar" style="width:{width}px"></span></td></tr>')
    if not rows:
        out.append('<tr><td colspan="7">(no records)</td></tr>')
    out.append("</table>")
    return "\n".join(out)


def _errors_table(per_day: Report) -> str:
    out = ['<table id="error-rates"><tr><th>Day</th><th>Requests</th><th>Denied</th><th>Deny rate</th>'
           '<th>Errors</th><th>Error rate</th></tr>']
    for r in per_day.rows:
        out.append(f'<tr data-day="{escape(str(r.group[0]))}"><td>{escape(str(r.group[0]))}</td>'
                   f'<td>{r.requests:,}</td><td>{r.denied:,}</td><td>{_rate(r.denied, r.requests)}</td>'
                   f'<td>{r.errors:,}</td><td>{_rate(r.errors, r.requests)}</td></tr>')
    t = per_day.total
    out.append(f'<tr><th>Total</th><th>{t.requests:,}</th><th>{t.denied:,}</th>'
               f'<th>{_rate(t.denied, t.requests)}</th><th>{t.errors:,}</th>'
               f'<th>{_rate(t.errors, t.requests)}</th></tr></table>')
    return "\n".join(out)


def write_html(report: Report, views: dict[str, Report], out: TextIO, generated: str) -> None:
    """`report` is the table's (the --by grouping); `views` holds the groupings the page needs:
    "day", "owner", "lmgate_id", "model" (by provider and model)."""
    per_day = views["day"]
    days = _day_axis([str(r.group[0]) for r in per_day.rows])
    by_day: dict[str, Row] = {str(r.group[0]): r for r in per_day.rows}
    spend = {d: round(by_day[d].cost, 6) for d in by_day}
    tokens = [(key, label, colour, {d: getattr(by_day[d], key) for d in by_day})
              for key, label, colour in TOKEN_SERIES]
    total = per_day.total
    window = report.window or "All records."
    cards = [("Requests", f"{total.requests:,}"), ("Spend (USD)", money(total) or "-"),
             ("Tokens in", human_tokens(total.input_tokens)),
             ("Tokens out", human_tokens(total.output_tokens)),
             ("Error rate", _rate(total.errors, total.requests)),
             ("Deny rate", _rate(total.denied, total.requests))]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # Nothing may be fetched: the page is read offline, and may hold owners' names.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "style-src 'unsafe-inline'; img-src data:\">",
        "<title>LMGate usage report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>LMGate usage report</h1>",
        f'<p class="meta">{escape(window)} Generated {escape(generated)}.</p>',
        '<div class="cards">' + "".join(f'<div class="card">{escape(k)}<b>{escape(v)}</b></div>'
                                        for k, v in cards) + "</div>",
        "<h2>Spend per day (USD)</h2>",
        _bar_chart("chart-spend", "Spend per day in US dollars", days,
                   [("cost_usd", "USD", "#e15759", spend)], money_axis=True),
        "<h2>Tokens per day</h2>",
        _bar_chart("chart-tokens", "Tokens per day by kind", days, tokens, money_axis=False),
        "<h2>Top models</h2>", _top_table("top-models", views["model"], "Provider / model"),
        "<h2>Top owners</h2>", _top_table("top-owners", views["owner"], "Owner"),
        "<h2>Top keys</h2>", _top_table("top-keys", views["lmgate_id"], "Key (lmgate_id)"),
        "<h2>Error rates per day</h2>", _errors_table(per_day),
        f"<h2>Report by {escape(', '.join(report.by) or 'total')}</h2>",
        '<pre id="report-table">' + escape("\n".join(table_lines(report))) + "</pre>",
        "</body></html>",
    ]
    out.write("\n".join(parts) + "\n")
