"""`lmgate report`: usage and spend per owner, key, model and day, from the stats JSON Lines files.

scan.py reads the files (fast, constant memory), prices.py knows the price file and the token
semantics of each API format, output.py makes the rows and prints them, command.py is the CLI.
"""

from lmgate.report.command import add_report_arguments, run_report

__all__ = ["add_report_arguments", "run_report"]
