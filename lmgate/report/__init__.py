"""`lmgate report` and `lmgate export`: usage and spend from the stats JSON Lines files.

query.py reads the files with DuckDB (the `records` view, malformed lines), prices.py knows the
price sources (genai-prices, the override file), summary.py groups and prices, output.py prints
the rows, command.py is the CLI.
"""

from lmgate.report.command import add_export_arguments, add_report_arguments, run_export, run_report

__all__ = ["add_export_arguments", "add_report_arguments", "run_export", "run_report"]
