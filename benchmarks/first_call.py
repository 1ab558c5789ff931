"""What a first call costs, each case in a fresh process with an empty kernel cache.

    python benchmarks/first_call.py [--repeats 3] [--output PATH]

The same as ``python -m centerkern bench --first-call``: import, the first ``center_loss`` in the
serial and the parallel regime, at a second dtype, with new memory layouts and label dtypes, and
with a warm cache, against the goals of each; results in ``benchmarks/results/first-call-<date>.json``.
"""

import sys

from centerkern._cli.first_call import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
