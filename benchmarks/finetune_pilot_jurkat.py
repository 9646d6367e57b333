"""Try fine-tuning settings for the Jurkat masked autoencoder on the crops suite's validation split (never its test
split) before they enter ``benchmarks/suites/crops_all_labels.yaml``'s grid.

The split is the suite's (``crop_classification``'s ``_test_split`` then ``_labelled_split``, seed 0, all labels):
2,188 crops to train, 547 to score. The model is the suite's ``jurkat_mae_long`` (``--workdir``'s copy); the settings
are ``configs/crops_finetune_onecycle.yaml`` with a random head, as the suite's candidates, plus the fields given.
That config's encoder rate is x1: give ``encoder_lr_factor`` for another (the suite's Jurkat grid: 0.25, 1).
With ``--cnn`` the fields are the supervised CNN's instead (``CNNSettings``, over the suite's: min_steps 300), the
baseline the same way. Each run appends a JSON line (validation accuracy, macro-F1, balanced accuracy; plain and
with TTA) to ``--out``. Results: ``benchmarks/results/finetune_pilot_jurkat.md``.

    python benchmarks/finetune_pilot_jurkat.py NAME '{"epochs": 30, "layer_decay": 0.75, "drop_path": 0.1}' \\
        [--cnn] [--workdir bench_runs/crops] [--out bench_runs/finetune_pilot_jurkat.jsonl]
"""
import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from sslcell.benchmark.tasks import crop_classification as cc
from sslcell.benchmark.tasks._supervised_cnn import CNNSettings, train_cnn
from sslcell.checkpoint import load
from sslcell.classify import FinetuneConfig, finetune
from sslcell.data.images import CellImages

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "jurkat_cellcycle_ifc_mlcp.npz"

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("name")
parser.add_argument("fields", type=json.loads,
                    help="FinetuneConfig fields (with --cnn: CNNSettings fields) over the suite's, as JSON")
parser.add_argument("--cnn", action="store_true", help="train the supervised CNN from scratch instead")
parser.add_argument("--workdir", type=Path, default=Path("bench_runs/crops"))
parser.add_argument("--out", type=Path, default=Path("bench_runs/finetune_pilot_jurkat.jsonl"))
args = parser.parse_args()

cells = cc._labelled_cells(CellImages.read(DATA, channels=[0, 2]), "label")
y = cells.obs["label"].astype(str).to_numpy()
train, _ = cc._test_split(y, None, 0.2, 0)  # the test part is never touched
split = cc._labelled_split(y, None, train, 1.0, 0.2, 0)
t0 = time.perf_counter()
if args.cnn:
    classes = [str(c) for c in cells.obs["label"].cat.categories]
    codes = cells.obs["label"].cat.codes.to_numpy()
    settings = CNNSettings(**{"min_steps": 300, **args.fields})
    classifier = train_cnn(cells[split.fit], codes[split.fit], classes, settings, torch.device("cpu"))
else:
    model = load(args.workdir / "jurkat" / "jurkat_mae_long" / "model")
    values = {**yaml.safe_load((HERE / "configs" / "crops_finetune_onecycle.yaml").read_text()), "head": "full",
              "init_head": "random", "progress_bar": False, "accelerator": "cpu", **args.fields}
    classifier = finetune(cells[split.fit], model, "label", FinetuneConfig.from_dict(values))
score = cc._classifier_score(cells, "label", torch.device("cpu"))
result = {"name": args.name, "model": "supervised CNN" if args.cnn else "jurkat_mae_long", "fields": args.fields,
          "n_fit": len(split.fit), "n_val": len(split.val), "seconds": round(time.perf_counter() - t0)}
for tta in (False, True):
    report = score(classifier, split.val, tta)
    result["val + TTA" if tta else "val"] = {"accuracy": report.accuracy, "macro_f1": report.macro_f1,
                                             "balanced_accuracy": report.balanced_accuracy}
print(json.dumps(result))
args.out.parent.mkdir(parents=True, exist_ok=True)
with args.out.open("a") as stream:
    stream.write(json.dumps(result) + "\n")
