"""Reprint the table of a bench/run.py results file from its raw numbers:

    python bench/table.py bench/results/<time>.json

The README's Performance table is this output for the file it names.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import table_from  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/table.py RESULTS.json")
    print(table_from(Path(sys.argv[1])))
