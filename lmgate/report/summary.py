"""From the stats files to report rows: grouped and summed by DuckDB, priced per group.

DuckDB sums the valid records per report group and per what prices them (provider, format, model,
price epoch, long-context tier: prices.Pricer), the Pricer prices each distinct (provider, format,
model, epoch, tier) once, and DuckDB applies those prices and rolls the sums up to one row per
group.
"""

from __future__ import annotations

from lmgate.report.output import DENIED, NO_USAGE, Report, Row
from lmgate.report.prices import Pricer, price_list
from lmgate.report.query import Records, fmt_sql, sql_string


def _in(values: frozenset[str]) -> str:
    return "(" + ", ".join(sql_string(v) for v in sorted(values)) + ")"


# `lmgate doctor`'s own calls (on branches that have it) are records, never usage.
CANARY = "canary"
# The calls a line stands for: a record of folded refusals (lmgate/refusals.py) stands for many.
CALLS = "CASE WHEN bad THEN 1 ELSE coalesce(try_cast(j_folded_calls AS UBIGINT), 1) END"
_RAW_GROUP = {"day": "CAST(ts AS DATE)", "hour": "date_trunc('hour', ts)"}
_DECODE = {"day": "strftime({}, '%Y-%m-%d')", "hour": "strftime({}, '%Y-%m-%dT%H:00Z')",
           "status": "{}::BIGINT"}


def summarize(records: Records, by: tuple[str, ...], pricer: Pricer, window: str = "") -> Report:
    """The report's rows; also tells `records` its malformed lines (one pass over the files)."""
    con = records.con
    raw_groups = "".join(f"{_RAW_GROUP.get(name, 'j_' + name)} AS g{i}, " for i, name in enumerate(by))
    gcols = [f"g{i}" for i in range(len(by))]
    decoded = "".join(_DECODE.get(name, "{} ->> '$'").format(f"g{i}") + f" AS g{i}, "
                      for i, name in enumerate(by))
    # The whole prompt of a call, which decides its long-context tier.
    prompt = ("CASE fmt WHEN 'anthropic' THEN coalesce(t_input_tokens, 0) + "
              "coalesce(t_cache_read_tokens, 0) + coalesce(t_cache_write_tokens, 0) "
              "ELSE coalesce(t_input_tokens, 0) END")
    tier = " + ".join(f"({prompt} > {t})::INTEGER" for t in pricer.thresholds()) or "0"
    epoch = " + ".join(f"(ts >= TIMESTAMPTZ '{d.isoformat()} 00:00:00Z')::INTEGER"
                       for d in pricer.change_dates()) or "0"
    # One pass: summed per report group and per what prices a call (provider, format, model, price
    # epoch and tier), on the raw JSON values; bad lines apart, per file. Calls that share what
    # prices them share their prices, so each sum is priced once. Values are decoded after, on the
    # few sums.
    sums = ", ".join(f"sum({t})::HUGEINT AS {name}" for name, t in (
        ("inp", "t_input_tokens"), ("out", "t_output_tokens"), ("cr", "t_cache_read_tokens"),
        ("cw", "t_cache_write_tokens"), ("rsn", "t_reasoning_tokens")))
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE agg_raw AS
        SELECT CASE WHEN bad THEN filename END AS bad_file, {raw_groups}
               j_provider, j_api_format, j_model, j_error_type, fmt, {epoch} AS epoch,
               {tier} AS tier, sum({CALLS}) AS n, {sums}
        FROM (SELECT *, {fmt_sql()} AS fmt FROM checked)
        WHERE bad OR j_error_type IS DISTINCT FROM '"{CANARY}"'
        GROUP BY ALL""")
    records.check(dict(con.execute("SELECT bad_file, sum(n)::BIGINT FROM agg_raw "
                                   "WHERE bad_file IS NOT NULL GROUP BY ALL").fetchall()))
    resums = ", ".join(f"coalesce(sum({c}), 0)::HUGEINT AS {c}" for c in ("inp", "out", "cr", "cw", "rsn"))
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE agg AS
        SELECT *, (b_in <> 0 OR b_out <> 0 OR cr <> 0 OR cw <> 0) AS billed FROM (
            SELECT *,
                   CASE WHEN fmt IN ('openai', 'google') THEN inp - cr ELSE inp END AS b_in,
                   CASE WHEN fmt = 'google' THEN out + rsn ELSE out END AS b_out,
                   CASE WHEN fmt = 'anthropic' THEN cw ELSE 0 END AS b_cw
            FROM (
                SELECT {decoded}j_provider ->> '$' AS provider, j_api_format ->> '$' AS api_format,
                       j_model ->> '$' AS model, j_error_type ->> '$' AS error_type, fmt, epoch, tier,
                       sum(n)::BIGINT AS n, {resums}
                FROM agg_raw WHERE bad_file IS NULL
                GROUP BY ALL))""")

    keys = con.execute("SELECT DISTINCT provider, api_format, model, epoch, tier FROM agg "
                       "WHERE billed").fetchall()
    priced = []
    for provider, api_format, model, epoch_n, tier_n in keys:
        units = pricer.lookup(provider, api_format, model, epoch_n, tier_n)
        if units is not None:
            priced.append((provider, api_format, model, epoch_n, tier_n, units.input,
                           units.cache_read, units.cache_write, units.output, units.source))
    con.execute("""
        CREATE OR REPLACE TEMP TABLE prices (provider VARCHAR, api_format VARCHAR, model VARCHAR,
            epoch INTEGER, tier INTEGER, p_in DOUBLE, p_cr DOUBLE, p_cw DOUBLE, p_out DOUBLE,
            source VARCHAR)""")
    if priced:
        con.executemany("INSERT INTO prices VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", priced)
    con.execute("""
        CREATE OR REPLACE TEMP VIEW costed AS
        SELECT a.*, p.source, p.source IS NOT NULL AS has_price,
               CASE WHEN a.billed AND p.source IS NOT NULL
                    THEN a.b_in * p.p_in + a.cr * p.p_cr + a.b_cw * p.p_cw + a.b_out * p.p_out
                    ELSE 0 END AS cost
        FROM agg a LEFT JOIN prices p
          ON a.provider IS NOT DISTINCT FROM p.provider
         AND a.api_format IS NOT DISTINCT FROM p.api_format
         AND a.model IS NOT DISTINCT FROM p.model
         AND a.epoch = p.epoch AND a.tier = p.tier""")

    select_groups = "".join(g + ", " for g in gcols)
    rows_sql = f"""
        SELECT {select_groups}
               sum(n)::BIGINT,
               sum(CASE WHEN error_type IN {_in(DENIED)} THEN n ELSE 0 END)::BIGINT,
               sum(CASE WHEN error_type IS NOT NULL AND error_type NOT IN {_in(DENIED | NO_USAGE)}
                        THEN n ELSE 0 END)::BIGINT,
               sum(b_in)::BIGINT, sum(b_out)::BIGINT, sum(cr)::BIGINT, sum(cw)::BIGINT,
               sum(rsn)::BIGINT, sum(cost)::DOUBLE,
               coalesce(bool_or(billed AND has_price), false),
               coalesce(bool_or(billed AND NOT has_price), false),
               list(DISTINCT source ORDER BY source) FILTER (WHERE billed AND has_price)
        FROM costed {"GROUP BY " + ", ".join(gcols) if gcols else ""}"""
    rows = []
    width = len(by)
    for values in con.execute(rows_sql).fetchall():
        if not width and not values[width]:
            continue        # no records: no row
        (n, denied, errors, inp, out, cr, cw, rsn, cost, has_priced, has_unpriced,
         sources) = values[width:]
        rows.append(Row(tuple(values[:width]), n, denied, errors, inp, out, cr, cw, rsn,
                        cost or 0.0, has_priced, has_unpriced, tuple(sources or ())))

    unpriced: dict[str, int] = {}
    for provider, api_format, model, n in con.execute(
            "SELECT provider, api_format, model, sum(n)::BIGINT FROM costed "
            "WHERE billed AND NOT has_price GROUP BY ALL").fetchall():
        plist = price_list(provider, api_format)
        label = f"{model or '(no model)'} ({plist or provider or 'unknown provider'})"
        unpriced[label] = unpriced.get(label, 0) + n
    no_usage = con.execute(f"SELECT coalesce(sum(n), 0)::BIGINT FROM agg "
                           f"WHERE error_type IN {_in(NO_USAGE)}").fetchone()[0]
    overridden: dict[str, list[str]] = {}
    for source, provider, api_format, model in con.execute(
            "SELECT DISTINCT source, provider, api_format, model FROM costed "
            "WHERE billed AND has_price ORDER BY ALL").fetchall():
        if pricer.overrides is not None and source == str(pricer.overrides.source):
            label = f"{model} ({price_list(provider, api_format) or provider})"
            overridden.setdefault(source, []).append(label)

    total = Row(("TOTAL",))
    for row in rows:
        total.add(row)
    ordered = sorted(rows, key=lambda r: tuple((v is None, v) for v in r.group))
    return Report(by, ordered, total, dict(sorted(unpriced.items())), no_usage, pricer, window,
                  overridden)
