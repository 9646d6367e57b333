"""Crop augmentation speed, sslcell vs lightly: ``sslcell benchmark benchmarks/suites/crop_speed.yaml``.

What is measured and how: :mod:`sslcell.benchmark.tasks.augment_speed` (task kind ``crop_augmentation``); the
settings are in the suite file. Arguments are the runner's (results go to benchmarks/results/crop_speed.md / .json):

    python benchmarks/bench_augment.py [--quick] [--out DIR] [--data DIR] [--device cpu|cuda]
"""

import sys
from pathlib import Path

from sslcell.cli import main

SUITE = Path(__file__).resolve().parent / "suites" / "crop_speed.yaml"

if __name__ == "__main__":
    sys.exit(main(["benchmark", str(SUITE), *sys.argv[1:]]))
