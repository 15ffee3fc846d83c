"""`lmgate report` and `lmgate export`: usage and spend from the stats JSON Lines files.

query.py reads the files with DuckDB (the `records` view, malformed lines), prices.py knows the
price sources (genai-prices, the override file), summary.py groups and prices, output.py prints
the rows, command.py is the CLI.
"""

__all__ = ["add_export_arguments", "add_report_arguments", "run_export", "run_report"]


def __getattr__(name: str):
    # Imported on use: the sidecar's /metrics prices with prices.py and must not load DuckDB.
    if name in __all__:
        from lmgate.report import command
        return getattr(command, name)
    raise AttributeError(f"module 'lmgate.report' has no attribute {name!r}")
