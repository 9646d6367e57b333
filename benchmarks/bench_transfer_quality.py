"""Transfer quality: zero-shot label transfer and few-label fine-tuning from an sslcell encoder, against PCA baselines.

Each labelled set in ../shared/data is split into a reference and a query half:

* mouse bladder (expression): stratified halves (``train_test_split(stratify=label, random_state=seed)``);
* Chula RBC-12 (crops): by smear (``StratifiedGroupKFold(2, shuffle, seed)`` on ``image_id``): no smear on both sides.

The sslcell encoder is pretrained on the reference half only, without labels (``configs/expression_mae.yaml``;
``benchmarks/configs/chula_simclr.yaml``), and embeds both halves. The baseline is PCA-50 fitted on the reference
half and projected onto the query: of log-normalised, scaled highly variable genes (expression), or of z-scored raw
pixels (crops). Every entry runs in the same run and is scored on the query half (macro-F1 over its classes):

* **zero-shot**: all reference labels; kNN transfer (``tl.transfer_labels``, 15 neighbours, distance-weighted) and
  logistic regression (sslcell's probe; on PCA also unscaled) on each representation;
* **few-label**: ``n`` labelled reference cells per class (``few_label_split``, one draw per seed); the PCA baselines
  (logistic scaled / unscaled, kNN), and sslcell's ``classify.finetune`` heads: linear probe, MLP, full fine-tuning,
  full fine-tuning with the supervised contrastive loss. Their settings are fixed below, before any run, and never
  chosen on the query half. Mean and standard deviation over the seeds.

    python benchmarks/bench_transfer_quality.py [--datasets bladder chula] [--seeds 0 1 2 3 4] [--n-per-class 5]

Writes benchmarks/results/transfer_quality.md / .json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

import sslcell
from sslcell.classify import FinetuneConfig, finetune
from sslcell.config import load_config
from sslcell.data.images import CellImages
from sslcell.evaluate.baselines import pca_baseline, pixel_pca_baseline
from sslcell.evaluate.probes import logistic_probe
from sslcell.evaluate.protocols import few_label_split
from sslcell.provenance import versions

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"  # --data-dir overrides it (a worktree elsewhere)
# few-label heads: fixed before the run (defaults of FinetuneConfig except the epochs, which a 5-cells-per-class
# training set needs more of: 80 cells make one batch, so 30 epochs would be 30 optimiser steps)
HEADS = {
    "linear probe": {"head": "linear"},
    "MLP head": {"head": "mlp", "epochs": 200},
    "full fine-tuning": {"head": "full", "epochs": 100},
    "full fine-tuning + SupCon": {"head": "full", "epochs": 100, "supcon_weight": 0.5},
}


def scores(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    tested = np.unique(truth)
    return {"macro_f1": float(f1_score(truth, pred, labels=tested, average="macro", zero_division=0)),
            "accuracy": float(accuracy_score(truth, pred))}


def load_bladder(seed: int, data_dir: Path):
    adata = ad.read_h5ad(data_dir / "mouse_bladder_mca_2100.h5ad")
    y = adata.obs["label"].astype(str).to_numpy()
    ref, query = train_test_split(np.arange(adata.n_obs), test_size=0.5, stratify=y, random_state=seed)
    return adata, y, np.sort(ref), np.sort(query)


def load_chula(seed: int, data_dir: Path):
    cells = CellImages.read(data_dir / "chula_rbc12_crops48.npz")
    y = cells.obs["label"].astype(str).to_numpy()
    groups = cells.obs["image_id"].to_numpy()
    ref, query = next(StratifiedGroupKFold(2, shuffle=True, random_state=seed).split(np.arange(len(y)), y, groups))
    assert not set(groups[ref]) & set(groups[query])
    return cells, y, np.sort(ref), np.sort(query)


def pretrain_and_embed(name: str, data, ref: np.ndarray, query: np.ndarray, recipe: Path, workdir: Path,
                       max_epochs: int | None, reuse: bool):
    """Pretrain on the reference rows (no labels), or with ``reuse`` load the model an earlier run of this script
    pretrained with the same recipe, split and epochs; return the model, reference and query embeddings, seconds."""
    config = load_config(recipe)
    config.train.progress_bar = False
    run, stamp = workdir / name, workdir / f"{name}.json"
    key = {"recipe": config.to_dict(), "reference_rows": int(len(ref)), "first_rows": ref[:10].tolist(),
           "max_epochs": max_epochs}
    if reuse and stamp.is_file() and json.loads(stamp.read_text())["key"] == key:
        model, seconds = sslcell.load(run), json.loads(stamp.read_text())["seconds"]
        print(f"{name}: reusing the model pretrained in {run}", flush=True)
    else:
        start = time.perf_counter()
        subset = data[ref] if isinstance(data, CellImages) else data[ref].copy()
        model = sslcell.pretrain(config, subset, run, overwrite=True, max_epochs=max_epochs)
        seconds = time.perf_counter() - start
        stamp.write_text(json.dumps({"key": key, "seconds": seconds}))
    if isinstance(data, CellImages):
        emb = sslcell.tl.embed_crops(data, model).obsm["X_sslcell"]
    else:
        emb = sslcell.tl.embed(data, model, copy=True).obsm["X_sslcell"]
    return model, emb[ref], emb[query], seconds


def knn_transfer(x_ref, y_ref, x_query, n_neighbors: int, class_weight: str | None = None) -> np.ndarray:
    reference = ad.AnnData(obs={"label": y_ref}, obsm={"X": x_ref})
    query = ad.AnnData(obs={"i": np.arange(len(x_query))}, obsm={"X": x_query})
    sslcell.tl.transfer_labels(query, reference, "label", use_rep="X", n_neighbors=n_neighbors,
                               class_weight=class_weight)
    return query.obs["label_pred"].astype(str).to_numpy()


def reference_cv(x_ref, y_ref, n_neighbors: int, class_weight: str | None, seed: int) -> float:
    """5-fold stratified CV macro-F1 of kNN transfer within the reference half: how a setting is chosen without
    the query."""
    folds = StratifiedKFold(5, shuffle=True, random_state=seed).split(x_ref, y_ref)
    return float(np.mean([scores(y_ref[va], knn_transfer(x_ref[tr], y_ref[tr], x_ref[va], n_neighbors,
                                                         class_weight))["macro_f1"] for tr, va in folds]))


def logistic(x_ref, y_ref, x_query, standardize: bool = True) -> np.ndarray:
    return logistic_probe(standardize=standardize).fit(x_ref, y_ref).predict(x_query)


def run_dataset(name: str, args, rows: list[dict], info: dict) -> None:
    if name == "bladder":
        data, y, ref, query = load_bladder(args.seed, Path(args.data_dir))
        recipe = ROOT / "configs" / "expression_mae.yaml"
        pca = pca_baseline(data, n_comps=50, seed=args.seed, fit_rows=ref)
        baseline = "PCA-50 (HVG, fitted on reference)"
    else:
        data, y, ref, query = load_chula(args.seed, Path(args.data_dir))
        recipe = ROOT / "benchmarks" / "configs" / "chula_simclr.yaml"
        pca = pixel_pca_baseline(data, n_comps=50, seed=args.seed, fit_rows=ref)
        baseline = "raw-pixel PCA-50 (fitted on reference)"
    print(f"{name}: reference {len(ref)}, query {len(query)}, {len(np.unique(y))} classes", flush=True)
    model, e_ref, e_query, seconds = pretrain_and_embed(name, data, ref, query, recipe, Path(args.workdir),
                                                        args.max_epochs, args.reuse_models)
    info[name] = {"reference": int(len(ref)), "query": int(len(query)), "classes": int(len(np.unique(y))),
                  "recipe": str(recipe.relative_to(ROOT)), "pretrain_s": round(seconds, 1),
                  "epochs": args.max_epochs or load_config(recipe).train.max_epochs}
    reps = {f"sslcell {model.config.method.name}": (e_ref, e_query), baseline: (pca[ref], pca[query])}

    def add(entry: str, protocol: str, values: list[dict]) -> None:
        f1s, accs = [v["macro_f1"] for v in values], [v["accuracy"] for v in values]
        row = {"dataset": name, "protocol": protocol, "entry": entry, "macro_f1": float(np.mean(f1s)),
               "macro_f1_std": float(np.std(f1s)), "accuracy": float(np.mean(accs)),
               "accuracy_std": float(np.std(accs)), "n_runs": len(values)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    # zero-shot: every reference label
    for rep, (x_ref, x_query) in reps.items():
        for class_weight, label in ((None, ""), ("balanced", ", balanced votes")):
            add(f"{rep} + kNN-15 transfer{label}", "zero-shot",
                [scores(y[query], knn_transfer(x_ref, y[ref], x_query, 15, class_weight))])
            rows[-1]["reference_cv_macro_f1"] = reference_cv(x_ref, y[ref], 15, class_weight, args.seed)
        add(f"{rep} + logistic", "zero-shot", [scores(y[query], logistic(x_ref, y[ref], x_query))])
        if rep == baseline:
            add(f"{rep} + logistic (unscaled)", "zero-shot",
                [scores(y[query], logistic(x_ref, y[ref], x_query, standardize=False))])

    # few labels per class, one draw per seed
    n = args.n_per_class
    protocol = f"{n} labels/class"
    draws = {seed: ref[few_label_split(y[ref], n, seed)] for seed in args.seeds}
    for rep, (x_ref_all, x_query) in reps.items():
        x_all = np.zeros((len(y), x_ref_all.shape[1]), np.float32)
        x_all[ref] = x_ref_all
        variants = {"logistic": True, "logistic (unscaled)": False} if rep == baseline else {}
        for label, standardize in variants.items():
            add(f"{rep} + {label}", protocol, [scores(y[query], logistic(x_all[t], y[t], x_query, standardize))
                                               for t in draws.values()])
        for class_weight, label in ((None, ""), ("balanced", ", balanced votes")):
            add(f"{rep} + kNN-{n} transfer{label}", protocol,
                [scores(y[query], knn_transfer(x_all[t], y[t], x_query, n, class_weight)) for t in draws.values()])
    for head, values in HEADS.items():
        results = []
        start = time.perf_counter()
        for seed, train in draws.items():
            config = FinetuneConfig.from_dict({**values, "seed": seed, "progress_bar": False})
            if isinstance(data, CellImages):
                classifier = finetune(data[train], model, "label", config)
                crops = data[query]
                scored = sslcell.tl.predict(crops.to_anndata(), classifier, crops=crops, copy=True)
                predicted = scored.obs["sslcell_pred"]
            else:
                classifier = finetune(data[train].copy(), model, "label", config)
                predicted = sslcell.tl.predict(data[query].copy(), classifier, copy=True).obs["sslcell_pred"]
            results.append(scores(y[query], predicted.astype(str).to_numpy()))
        add(f"sslcell {model.config.method.name} + {head}", protocol, results)
        rows[-1]["seconds_per_seed"] = round((time.perf_counter() - start) / len(draws), 1)


REUSED = "; the encoder was pretrained by an earlier run of this script (same recipe, split and epochs) and reused"


def write(rows: list[dict], info: dict, args, command: str) -> None:
    out = ROOT / "benchmarks" / "results" / "transfer_quality"
    payload = {"command": command, "seed": args.seed, "seeds": args.seeds, "datasets": info, "rows": rows,
               "versions": versions(), "machine": platform.platform(), "heads": HEADS}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    lines = ["# Transfer quality: zero-shot and few-label, sslcell vs PCA baselines", "",
             f"Command: `{command}`  ",
             f"Split seed {args.seed}; few-label draws: seeds {args.seeds}. Machine: {platform.platform()}, "
             "CPU only.  ",
             "Scores on the query half; macro-F1 over the query's classes; mean ± std over the draws.  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()), ""]
    for name, meta in info.items():
        lines += [f"## {name}", "",
                  f"Reference {meta['reference']} cells, query {meta['query']}, {meta['classes']} classes. "
                  f"Encoder: `{meta['recipe']}`, {meta['epochs']} epochs on the reference half without labels "
                  f"({meta['pretrain_s']} s{REUSED if args.reuse_models else ''}).",
                  "",
                  "| protocol | entry | macro-F1 | accuracy | runs | reference CV macro-F1 |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in sorted((r for r in rows if r["dataset"] == name), key=lambda r: (r["protocol"], -r["macro_f1"])):
            cv = f"{r['reference_cv_macro_f1']:.3f}" if "reference_cv_macro_f1" in r else ""
            lines.append(f"| {r['protocol']} | {r['entry']} | {r['macro_f1']:.3f} ± {r['macro_f1_std']:.3f} | "
                         f"{r['accuracy']:.3f} ± {r['accuracy_std']:.3f} | {r['n_runs']} | {cv} |")
        lines.append("")
    lines += ["Few-label head settings (fixed before the run; FinetuneConfig defaults otherwise): "
              + "; ".join(f"{k}: `{v}`" for k, v in HEADS.items()), ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print(f"wrote {out}.md", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["bladder", "chula"], choices=["bladder", "chula"])
    parser.add_argument("--seed", type=int, default=0, help="split and pretraining seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="few-label draws")
    parser.add_argument("--n-per-class", type=int, default=5)
    parser.add_argument("--max-epochs", type=int, default=None, help="override the recipes' pretraining epochs")
    parser.add_argument("--workdir", default="/tmp/sslcell_bench_transfer_quality")
    parser.add_argument("--data-dir", default=str(DATA), help="folder with the labelled datasets")
    parser.add_argument("--reuse-models", action="store_true",
                        help="load the encoders an earlier run pretrained (same recipe, split, epochs) from --workdir")
    args = parser.parse_args()
    command = "python benchmarks/bench_transfer_quality.py " + " ".join(
        a for a in sys.argv[1:] if a != args.data_dir and a != "--data-dir")
    rows: list[dict] = []
    info: dict = {}
    for name in args.datasets:
        run_dataset(name, args, rows, info)
        write(rows, info, args, command)


if __name__ == "__main__":
    main()
