"""Speed of the C++ CPU kernels against the eager torch reference, and the throughput guard.

Usage::

    python benchmarks/cpu_ratios.py [--guard] [--repeats N] [--threads T]

The rows, thresholds and timing are :mod:`invcoss.benchmark.guard` (the same as
``python -m invcoss.benchmark.guard``); ``--guard`` exits 1 when a ratio is below its threshold.
"""

import sys

from invcoss.benchmark.guard import main

if __name__ == "__main__":
    sys.exit(main())
