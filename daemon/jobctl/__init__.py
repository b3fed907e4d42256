"""`jobctl`: drive a running jobd. Human tables by default, `--json` everywhere.

`cli` parses the arguments and turns errors into exit statuses, `commands` sends each
subcommand's command and prints its result, `render` draws the tables, `schedules`
holds `jobctl schedules ...`. The console script is `daemon.jobctl:main`.
"""

from daemon.jobctl.cli import main

__all__ = ["main"]
