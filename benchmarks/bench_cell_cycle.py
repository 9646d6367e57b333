"""Cell-cycle reconstruction quality: the suite ``benchmarks/suites/cell_cycle.yaml`` (task kind ``cell_cycle``,
protocol in ``sslcell/benchmark/tasks/cell_cycle.py``): Jurkat crops (random angle, raw-pixel PCA, the SimCLR
embedding alone, the DeepCycle recipe from SimCLR and from a random encoder, single-phase acquisitions) and synthetic
expression (cycle-gene PCA, phase-set scores, the MAE embedding and the DeepCycle recipe for expression).

    python benchmarks/bench_cell_cycle.py [--quick] [--only jurkat|expression] [--out DIR] [--data DIR] [--workdir DIR]

is ``sslcell benchmark benchmarks/suites/cell_cycle.yaml ...``; it writes benchmarks/results/cycle.md / .json and the
Jurkat plots (settings: the suite's ``params``; the old ``--skip jurkat`` is ``--only expression``).
results/cell_cycle.md holds the tables of the pre-runner script.
"""

import sys
from pathlib import Path

from sslcell.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", str(Path(__file__).resolve().parent / "suites" / "cell_cycle.yaml"), *sys.argv[1:]]))
