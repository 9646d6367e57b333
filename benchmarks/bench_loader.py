"""Speed and memory of sslcell's out-of-core expression loader against AnnLoader and in-memory CSR batches.

A thin wrapper over the benchmark runner: it runs the ``loader`` task of ``benchmarks/suites/expression_speed.yaml``
(task kind ``expression_loader``; what it measures and how: ``sslcell/benchmark/tasks/expression_speed.py``).
Extra arguments go to ``sslcell benchmark`` (``--quick``, ``--out DIR``, ``--workdir DIR``)::

    python benchmarks/bench_loader.py [--quick] [--out DIR]
    # the same as: sslcell benchmark benchmarks/suites/expression_speed.yaml --only loader [--quick] [--out DIR]

Other sizes or settings: copy the suite's ``loader`` task into a suite of your own and change its ``params``.
"""

import sys
from pathlib import Path

from sslcell.cli import main

SUITE = Path(__file__).resolve().parent / "suites" / "expression_speed.yaml"

if __name__ == "__main__":
    sys.exit(main(["benchmark", str(SUITE), "--only", "loader", *sys.argv[1:]]))
