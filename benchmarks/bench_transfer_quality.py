"""Transfer quality: the suite ``benchmarks/suites/transfer.yaml`` (task kind ``transfer_quality``): zero-shot kNN
transfer and few-label fine-tuning from encoders pretrained on a reference half (bladder; Chula RBC-12 split by
smear), against PCA-50 and a random encoder, scored on the query half.

    python benchmarks/bench_transfer_quality.py [--quick] [--out DIR] [--data DIR] [--only bladder] [--device cpu]

is ``sslcell benchmark benchmarks/suites/transfer.yaml ...``; it writes benchmarks/results/transfer_quality.md / .json
(seeds, labels per class and heads: the suite's ``params``; ``--workdir DIR`` keeps the pretrained encoders).
"""

import sys
from pathlib import Path

from sslcell.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", str(Path(__file__).resolve().parent / "suites" / "transfer.yaml"), *sys.argv[1:]]))
