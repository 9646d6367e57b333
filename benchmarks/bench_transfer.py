"""Label-transfer speed, sslcell vs scikit-learn's kNN: ``sslcell benchmark benchmarks/suites/transfer_speed.yaml``.

What is measured and how: :mod:`sslcell.benchmark.tasks.transfer_speed` (task kind ``knn_transfer``); the settings and
the hand-written notes on the variants tried are in the suite file. Arguments are the runner's (results go to
benchmarks/results/transfer_speed.md / .json):

    python benchmarks/bench_transfer.py [--quick] [--out DIR]
"""

import sys
from pathlib import Path

from sslcell.benchmark.tasks.transfer_speed import make_data  # noqa: F401  (benchmarks/tune_transfer_ivf.py uses it)
from sslcell.cli import main

SUITE = Path(__file__).resolve().parent / "suites" / "transfer_speed.yaml"

if __name__ == "__main__":
    sys.exit(main(["benchmark", str(SUITE), *sys.argv[1:]]))
