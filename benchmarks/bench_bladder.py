"""Embedding quality on mouse bladder: the suite ``benchmarks/suites/expression.yaml`` (task kind
``expression_celltype``): every expression recipe pretrained without labels, PCA-50, scVI and a random encoder,
scored in one ``tl.evaluate`` call.

    python benchmarks/bench_bladder.py [--quick] [--out DIR] [--data DIR] [--workdir DIR] [--device cpu]

is ``sslcell benchmark benchmarks/suites/expression.yaml ...``; it writes benchmarks/results/expression.md / .json
(epochs, cells and probes: the suite's ``params``). results/bladder*.md hold the tables of the pre-runner script.
"""

import sys
from pathlib import Path

from sslcell.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", str(Path(__file__).resolve().parent / "suites" / "expression.yaml"), *sys.argv[1:]]))
