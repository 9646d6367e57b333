"""Fate / cell-type prediction from crops: sslcell pretraining + linear probe / fine-tuning vs baselines.

One fixed split per dataset, the same for every entry:

* ``jurkat``: Jurkat cell cycle (imaging flow cytometry), channels 0 and 2 only (brightfield, darkfield;
  channel 1 is the DNA stain the labels came from), 7 phases, stratified 80/20 split, seed 0.
* ``chula``: Chula RBC-12 smears, 13 classes, split by ``image_id`` (no smear on both sides): the first fold of
  ``StratifiedGroupKFold(5, shuffle=True, random_state=0)``, about 80/20.

Entries, each trained on the training part only and scored once on the test part:

* raw-pixel PCA-50 + logistic regression (pixels standardised, PCA and the classifier fitted on train);
* a supervised CNN from scratch: the encoder architecture of the first ResNet recipe, randomly initialised, trained
  end to end with the fine-tuning procedure (all layers at the head's learning rate, a random head);
* per recipe: pretrain on the training crops WITHOUT labels, then (a) a linear probe on frozen embeddings and
  (b) full fine-tuning (LP-FT: encoder at ``encoder_lr_factor`` x the head's learning rate, oversampling,
  dropout head, flips and 90-degree turns), skipped for the recipes named in ``--probe-only``;
* every trained classifier (probe, fine-tune, CNN) is scored twice: plain, and with test-time augmentation
  (``predict(tta=True)``: probabilities averaged over the 8 flips and 90-degree turns), rows "+ TTA";
* the same with 10% of the training labels (stratified, seed 0, at least one per class); pretraining still
  sees all training crops (unlabelled), as a user with few labels would do.

    python benchmarks/bench_images.py --dataset jurkat [--recipes benchmarks/configs/jurkat_*.yaml]

Writes benchmarks/results/images_<dataset>.md / .json and a confusion matrix PNG of the best fine-tuned model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from sklearn.decomposition import PCA
from sklearn.model_selection import StratifiedGroupKFold, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import sslcell
from sslcell import pl, tl
from sslcell.classify import FinetuneConfig, finetune
from sslcell.config import load_config
from sslcell.data.images import CellImages
from sslcell.evaluate import classification_report
from sslcell.evaluate.probes import class_weight as probe_class_weight
from sslcell.evaluate.probes import logistic_probe
from sslcell.evaluate.protocols import label_fraction_split
from sslcell.methods import build_method
from sslcell.provenance import versions

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DATASETS = {
    "jurkat": {"file": "jurkat_cellcycle_ifc_mlcp.npz", "channels": [0, 2], "split": "stratified"},
    "chula": {"file": "chula_rbc12_crops48.npz", "channels": None, "split": "image_id"},
}


def split(cells: CellImages, how: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    y = cells.obs["label"].astype(str).to_numpy()
    idx = np.arange(len(cells))
    if how == "stratified":
        return train_test_split(idx, test_size=0.2, stratify=y, random_state=seed)
    groups = cells.obs["image_id"].to_numpy()
    train, test = next(StratifiedGroupKFold(5, shuffle=True, random_state=seed).split(idx, y, groups))
    assert not set(groups[train]) & set(groups[test])
    return train, test


def pca_logistic(cells: CellImages, train: np.ndarray, test: np.ndarray, seed: int, class_weight=None) -> dict:
    x = np.asarray(cells.images).reshape(len(cells), -1).astype(np.float32)
    y = cells.obs["label"].astype(str).to_numpy()
    # pixels z-scored, PCA-50, then sslcell's one logistic probe (on the PCA scores as they are)
    probe = logistic_probe(class_weight=class_weight, standardize=False)
    model = make_pipeline(StandardScaler(), PCA(50, random_state=seed), probe).fit(x[train], y[train])
    scores = model.predict_proba(x[test])
    classes = [str(c) for c in model.classes_]
    return score(y[test], np.asarray(classes)[scores.argmax(1)], scores, classes, cells)


def score(y_true, y_pred, scores, classes, cells) -> dict:
    all_classes = [str(c) for c in cells.obs["label"].cat.categories]
    full = np.zeros((len(y_true), len(all_classes)))
    for k, c in enumerate(classes):
        full[:, all_classes.index(c)] = scores[:, k]
    report = classification_report(y_true, y_pred, full, classes=all_classes)
    return {
        "report": report,
        **{k: getattr(report, k) for k in ("accuracy", "macro_f1", "balanced_accuracy", "macro_roc_auc")},
    }


def classify(model, cells: CellImages, train: np.ndarray, test: np.ndarray, config: FinetuneConfig) -> tuple[dict, ...]:
    """Train on ``train``, score ``test``: plain predictions, and with test-time augmentation (8 orientations)."""
    t0 = time.time()
    clf = finetune(cells[train], model, "label", config)
    out = []
    for tta in (False, True):
        adata = cells[test].to_anndata()
        tl.predict(adata, clf, crops=cells[test], tta=tta)
        report = tl.score(adata, "label")
        out.append({"report": report, "seconds": time.time() - t0,
                    **{k: getattr(report, k) for k in ("accuracy", "macro_f1", "balanced_accuracy", "macro_roc_auc")}})
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    parser.add_argument("--recipes", nargs="+",
                        help="pretraining recipes (default benchmarks/configs/<dataset>_*.yaml)")
    parser.add_argument("--finetune", help="FinetuneConfig YAML (default benchmarks/configs/<dataset>_finetune.yaml)")
    parser.add_argument("--max-epochs", type=int, help="override every recipe's pretraining epochs")
    parser.add_argument("--finetune-epochs", type=int, help="override the fine-tuning epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--reuse-pretrained", action="store_true",
                        help="use the model already pretrained in --workdir by an earlier run of the same recipe")
    parser.add_argument("--encoder-lr-factors", nargs="+", type=float,
                        help="one fine-tune row per factor (default: the fine-tuning YAML's encoder_lr_factor)")
    parser.add_argument("--probe-only", nargs="+", default=[], metavar="RECIPE",
                        help="recipe names (file stems) to score with the linear probe only, no fine-tuning")
    parser.add_argument("--workdir", default=str(ROOT / "bench_runs"))
    parser.add_argument("--out", help="results prefix (default benchmarks/results/images_<dataset>)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    spec = DATASETS[args.dataset]
    recipes = args.recipes or sorted(str(p) for p in (ROOT / "benchmarks" / "configs").glob(f"{args.dataset}_*.yaml")
                                     if not p.name.endswith("_finetune.yaml"))
    ft_path = Path(args.finetune or ROOT / "benchmarks" / "configs" / f"{args.dataset}_finetune.yaml")
    ft_values = yaml.safe_load(ft_path.read_text()) or {}
    if args.finetune_epochs:
        ft_values["epochs"] = args.finetune_epochs
    ft_values["progress_bar"] = False
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"images_{args.dataset}")

    cells = CellImages.read(DATA / spec["file"], channels=spec["channels"])
    train, test = split(cells, spec["split"], args.seed)
    y = cells.obs["label"].astype(str).to_numpy()
    few = train[label_fraction_split(y[train], 0.1, args.seed)]
    print(f"{args.dataset}: {cells}\ntrain {len(train)}, test {len(test)}, 10% labels {len(few)}", flush=True)

    rows: list[dict] = []

    def add(entry: str, labels: str, result: dict | tuple[dict, dict], **extra) -> None:
        """One row, or two for a trained classifier: plain and with test-time augmentation (" + TTA")."""
        if isinstance(result, tuple):
            add(entry, labels, result[0], **extra)
            add(entry + " + TTA", labels, result[1], **extra)
            return
        row = {"entry": entry, "labels": labels, **{k: v for k, v in result.items() if k != "report"}, **extra}
        rows.append(row)
        print(json.dumps(row, default=float), flush=True)
        results[(entry, labels)] = result

    results: dict = {}
    base = {k: v for k, v in ft_values.items() if k != "scratch"}  # "scratch": overrides of earlier versions
    full_cfg = FinetuneConfig.from_dict({**base, "head": "full"})
    linear_cfg = FinetuneConfig.from_dict({**base, "head": "linear"})
    # the from-scratch CNN trains every layer at the head's rate (plus the "scratch" overrides of the YAML)
    scratch_cfg = FinetuneConfig.from_dict({**base, "head": "full", "encoder_lr_factor": 1.0, "init_head": "random",
                                            **ft_values.get("scratch", {})})
    power = float(linear_cfg.oversample)

    cnn_config = None  # the from-scratch CNN copies the first recipe with a ResNet encoder (else the last recipe)
    for recipe_path in recipes:
        config = load_config(recipe_path)
        if cnn_config is None and config.encoder.name.startswith("resnet"):
            cnn_config = config
        if args.max_epochs:
            config.train.max_epochs = args.max_epochs
        config.train.progress_bar = False
        name = Path(recipe_path).stem
        run = Path(args.workdir) / args.dataset / name
        t0 = time.time()
        if args.reuse_pretrained and (run / "model" / "config.json").is_file():
            model = sslcell.load(run)
            pretrain_s = float("nan")
            print(f"reusing {run / 'model'} ({model.trained_info})", flush=True)
        else:
            model = sslcell.pretrain(config, cells[train], run, overwrite=True)
            pretrain_s = time.time() - t0
        extra = {"recipe": str(Path(recipe_path).relative_to(ROOT)),
                 "pretrain_s": round(pretrain_s) if pretrain_s == pretrain_s else "reused"}
        factors = args.encoder_lr_factors or [full_cfg.encoder_lr_factor]
        for labels, part in (("100%", train), ("10%", few)):
            add(f"sslcell {name} + linear probe", labels, classify(model, cells, part, test, linear_cfg), **extra)
            for factor in factors if name not in args.probe_only else []:
                cfg = FinetuneConfig.from_dict({**base, "head": "full", "encoder_lr_factor": factor})
                add(f"sslcell {name} + fine-tune (encoder lr x{factor:g})", labels,
                    classify(model, cells, part, test, cfg), **extra)

    if not args.skip_baselines:
        for labels, part in (("100%", train), ("10%", few)):
            add("raw pixels PCA-50 + logistic", labels, pca_logistic(cells, part, test, args.seed))
            if power:  # the linear probe's own protocol: class weights from the oversampling power
                what = "balanced class weights" if power == 1 else f"balanced class weights ^ {power:g}"
                add(f"raw pixels PCA-50 + logistic ({what})", labels,
                    pca_logistic(cells, part, test, args.seed, class_weight=probe_class_weight(y[part], power)))
        # supervised CNN from scratch: the ResNet recipe's encoder architecture, random weights
        cnn_config = cnn_config or config
        torch.manual_seed(args.seed)
        untrained = build_method(cnn_config, model.inputs.contract)  # every recipe's contract: the same crops
        for labels, part in (("100%", train), ("10%", few)):
            add(f"supervised CNN from scratch ({cnn_config.encoder.name} {cnn_config.encoder.options})", labels,
                classify(untrained, cells, part, test, scratch_cfg))

    write(out, args, cells, train, test, few, rows, results, ft_values, recipes)


def write(out: Path, args, cells, train, test, few, rows, results, ft_values, recipes) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    best = max((r for r in rows if "fine-tune" in r["entry"] and r["labels"] == "100%"),
               key=lambda r: r["macro_f1"], default=None)
    if best is not None:
        report = results[(best["entry"], best["labels"])]["report"]
        pl.confusion_matrix(report, path=out.with_name(out.name + "_confusion.png"),
                            title=f"{args.dataset}: {best['entry']} (test split)")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    command = "python " + " ".join([Path(sys.argv[0]).relative_to(ROOT).as_posix() if Path(sys.argv[0]).is_absolute()
                                    else sys.argv[0], *sys.argv[1:]])
    lines = [
        f"# Crop classification: {args.dataset}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {os.cpu_count()} cores, {cpu}, no GPU; torch threads {torch.get_num_threads()}  ",
        f"Versions: {', '.join(f'{k} {v}' for k, v in versions().items())}  ",
        f"Data: `{DATASETS[args.dataset]['file']}`, channels {cells.channel_names}, {len(cells)} cells; "
        f"train {len(train)}, test {len(test)} (split: {DATASETS[args.dataset]['split']}, seed {args.seed}); "
        f"10% labels: {len(few)} training cells  ",
        f"Recipes: {', '.join(f'`{Path(r).relative_to(ROOT) if Path(r).is_absolute() else r}`' for r in recipes)}; "
        f"fine-tuning: `{json.dumps(ft_values)}`",
        "",
        "Scores on the test split (one run, seed 0). Pretraining used the training crops only, without labels.",
        "",
        "| entry | labels | accuracy | macro-F1 | balanced acc. | macro ROC-AUC | pretrain s | train+predict s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["labels"] != "100%", -r["macro_f1"])):
        lines.append(f"| {r['entry']} | {r['labels']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | "
                     f"{r['balanced_accuracy']:.3f} | {r['macro_roc_auc']:.3f} | {r.get('pretrain_s', '')} | "
                     f"{round(r['seconds']) if 'seconds' in r else ''} |")
    if best is not None:
        lines += ["", f"Per-class scores of the best fine-tuned entry ({best['entry']}, 100% labels):", "",
                  results[(best["entry"], best["labels"])]["report"].to_markdown()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    payload = {"dataset": args.dataset, "command": command, "seed": args.seed, "versions": versions(),
               "rows": rows, "finetune": ft_values, "n_train": len(train), "n_test": len(test), "n_few": len(few)}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=float))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
