"""Crop classification on one dataset: a thin wrapper over ``sslcell benchmark benchmarks/suites/crops.yaml``.

Runs the suite's task for ``--dataset`` (task kind ``crop_classification``: sslcell pretraining + linear probe and
fine-tuning against raw-pixel PCA-50, a random-weight encoder and a supervised CNN, every setting chosen on a
validation split, one fixed test split; see ``sslcell/benchmark/tasks/crop_classification.py``), optionally with
fewer recipes or baselines and parameter overrides, and writes ``benchmarks/results/crops_<dataset>[_<tag>].md``,
``.json`` and the confusion matrix PNG through the suite runner::

    python benchmarks/bench_images.py --dataset jurkat [--quick]
    python benchmarks/bench_images.py --dataset jurkat --recipes --baselines supervised_cnn --tag supervised_cnn
    python benchmarks/bench_images.py --dataset chula --set cnn_epochs=[30] --set label_fractions=[1.0]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import yaml

from sslcell.benchmark import load_suite, run_suite
from sslcell.config import from_dict
from sslcell.errors import ConfigError

SUITE = Path(__file__).resolve().parent / "suites" / "crops.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="a task of benchmarks/suites/crops.yaml (jurkat, chula)")
    parser.add_argument("--recipes", nargs="*", help="keep only these recipes (names); none at all: no recipe")
    parser.add_argument("--baselines", nargs="*", help="keep only these baselines; none at all: no baseline")
    parser.add_argument("--set", action="append", default=[], metavar="PARAM=YAML",
                        help="override a task parameter, e.g. --set cnn_epochs=[30,60] (repeatable)")
    parser.add_argument("--tag", help="suffix of the results files: crops_<dataset>_<tag>.md")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", help="results folder (default benchmarks/results)")
    parser.add_argument("--data", help="folder of the data files (default ../shared/data)")
    parser.add_argument("--workdir", help="keep pretrained models here (with --set reuse_pretrained=true: reuse)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    suite = load_suite(SUITE, quick=args.quick, data_dir=args.data, out=args.out)
    tasks = {t.name: t for t in suite.tasks}
    if args.dataset not in tasks:
        parser.error(f"--dataset: no task {args.dataset!r} in {SUITE.name}; tasks: {sorted(tasks)}")
    task = tasks[args.dataset]
    if args.recipes is not None:
        unknown = sorted(set(args.recipes) - {r.name for r in task.recipes})
        if unknown:
            parser.error(f"--recipes: {unknown} not in the task's recipes {[r.name for r in task.recipes]}")
        task.recipes = [r for r in task.recipes if r.name in args.recipes]
    if args.baselines is not None:
        unknown = sorted(set(args.baselines) - set(task.baselines))
        if unknown:
            parser.error(f"--baselines: {unknown} not in the task's baselines {task.baselines}")
        task.baselines = [b for b in task.baselines if b in args.baselines]
    if args.set:
        values = dataclasses.asdict(task.params)
        for item in args.set:
            key, sep, text = item.partition("=")
            if not sep:
                parser.error(f"--set {item!r}: expected PARAM=VALUE")
            values[key] = yaml.safe_load(text)
        try:
            task.params = from_dict(task.kind.params, values, "params")
            task.params.check()
        except ConfigError as err:
            parser.error(f"--set: {err}")
    suite.tasks = [task]
    suite.name = f"crops_{args.dataset}" + (f"_{args.tag}" if args.tag else "")
    run = run_suite(suite, workdir=args.workdir, device=args.device)
    print(f"results: {run.markdown_path}")
    for message in run.errors.values():
        print(f"failed: {message}", file=sys.stderr)
    return 1 if run.errors else 0


if __name__ == "__main__":
    sys.exit(main())
