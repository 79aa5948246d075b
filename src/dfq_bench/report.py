"""``python -m dfq_bench.report``: the reporter's command line (the reporter is ``results/report.py``)."""

import sys

from dfq_bench.results.report import main

if __name__ == "__main__":
    sys.exit(main(exit_now=True))
