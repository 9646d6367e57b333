"""Cell-cycle reconstruction quality: Jurkat crops (real) and simulated expression (known continuous phase).

**Jurkat** (``jurkat_cellcycle_ifc_mlcp.npz``): stratified 80/20 split (seed 0; the phase labels are used for the
split and for scoring only). Every network sees channels 0 and 2 (brightfield, darkfield); channel 1 (the DNA stain)
only makes pseudo-labels: 4 quantile bins of its integrated intensity (edges from the training crops). Entries, all
fitted on the training crops and scored on the held-out ones:

* random angle; raw-pixel PCA (the angle of the circle fitted in the first two PCs of z-scored pixels);
* the self-supervised embedding alone (SimCLR, ``benchmarks/configs/jurkat_simclr.yaml``), no pseudo-labels;
* the DeepCycle recipe (``sslcell.cellcycle.recipe.fit_recipe``): the SimCLR encoder fine-tuned on the pseudo-labels;
* the same recipe from a randomly initialised encoder (a supervised CNN from scratch, same budget and settings).

Scores: the Spearman correlation of θ with the true order G1→S→G2→prophase→metaphase→anaphase→telophase after
choosing origin and direction optimally on the scored cells (``cyclic_spearman``; said wherever reported), the
pseudo-phase accuracy of the recipe's classifier, the pseudo-phase arc accuracy and the closure.

**Expression** (``make_expression``, 3,000 cells, seed 0; its cycle genes are S_xx / G2M_xx): θ against the simulated
continuous phase (circular correlation). Entries: the cycle-gene PCA baseline; the sslcell MAE embedding alone; the
DeepCycle recipe for expression (an MLP head on the frozen MAE encoder learns the gene-score phases). Every entry is
anchored by the gene-score phase calls (no true label).

    python benchmarks/bench_cell_cycle.py [--finetune-epochs 30] [--expression-epochs 30]

Writes benchmarks/results/cell_cycle.md / .json and cell_cycle_jurkat.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split

import sslcell
from sslcell.cellcycle import fit_cycle
from sslcell.cellcycle.recipe import fit_recipe, marker_intensity, wheel
from sslcell.classify import FinetuneConfig, finetune
from sslcell.config import load_config
from sslcell.data.images import CellImages
from sslcell.data.synthetic import make_expression
from sslcell.evaluate import circular_correlation, cyclic_spearman, phase_arc_accuracy
from sslcell.evaluate.baselines import pixel_pca_baseline
from sslcell.methods import build_method
from sslcell.provenance import versions

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
ORDER = ["G1", "S", "G2", "Prophase", "Metaphase", "Anaphase", "Telophase"]
BINS = ["bin1", "bin2", "bin3", "bin4"]


def jurkat(args, rows: list[dict], info: dict) -> None:
    cells = CellImages.read(Path(args.data_dir) / "jurkat_cellcycle_ifc_mlcp.npz")
    truth = np.asarray(cells.obs["label"].astype(str))
    train, test = train_test_split(np.arange(len(cells)), test_size=0.2, stratify=truth, random_state=args.seed)
    train, test = np.sort(train), np.sort(test)
    marker = marker_intensity(cells, 1)
    edges = np.quantile(marker[train], [0.25, 0.5, 0.75])
    pseudo = np.asarray(BINS, dtype=object)[np.searchsorted(edges, marker, side="right")]
    free = cells.select_channels([0, 2])

    def add(entry: str, theta_test: np.ndarray, fit=None, **extra) -> None:
        row = {"dataset": "jurkat", "entry": entry,
               "aligned_spearman": cyclic_spearman(theta_test, truth[test], ORDER)["spearman"],
               "closure": fit.closure if fit is not None else None, **extra}
        rows.append(row)
        print(json.dumps(row, default=float), flush=True)

    rng = np.random.default_rng(args.seed)
    add("random angle", rng.uniform(0, 2 * np.pi, len(test)))
    pixels = pixel_pca_baseline(free, n_comps=2, seed=args.seed, fit_rows=train)
    fit = fit_cycle(pixels[train], warn=False)
    add("raw-pixel PCA (2 PCs), circle fit", fit.theta(pixels[test]), fit)

    config = load_config(ROOT / "benchmarks" / "configs" / "jurkat_simclr.yaml")
    config.train.progress_bar = False
    start = time.perf_counter()
    model = sslcell.pretrain(config, free[train], Path(args.workdir) / "jurkat_simclr", overwrite=True)
    info["jurkat_pretrain_s"] = round(time.perf_counter() - start, 1)
    embedding = sslcell.tl.embed_crops(free, model).obsm["X_sslcell"]
    fit = fit_cycle(embedding[train], pseudo[train], BINS, warn=False)
    add("sslcell SimCLR embedding alone, circle fit (no pseudo-labels used for training)", fit.theta(embedding[test]),
        fit, pseudo_arc_accuracy=phase_arc_accuracy(fit.theta(embedding[test]), pseudo[test], BINS, fit.phase_starts))

    finetune_config = FinetuneConfig.from_dict({**json.loads(args.finetune), "progress_bar": False})
    torch.manual_seed(args.seed)
    scratch = build_method(config, model.inputs.contract.to_dict())
    best = None
    for name, encoder in (("sslcell SimCLR + DeepCycle recipe", model),
                          ("DeepCycle recipe from a random encoder (supervised from scratch)", scratch)):
        start = time.perf_counter()
        labelled = cells[train]
        recipe, _ = fit_recipe(labelled, encoder, [1], [0, 2], finetune_config)
        seconds = time.perf_counter() - start
        placed = recipe.to_anndata(free[test])
        theta, descriptor = placed.obs["cell_cycle_theta"].to_numpy(), placed.obsm["cell_cycle_descriptor"]
        predicted = np.asarray(recipe.classifier.classes)[descriptor.argmax(1)]
        add(name, theta, recipe.fit, pseudo_accuracy=float(np.mean(predicted == pseudo[test])),
            pseudo_arc_accuracy=phase_arc_accuracy(theta, pseudo[test], BINS, recipe.fit.phase_starts),
            train_s=round(seconds, 1))
        if best is None:
            best = placed
    best.obs["phase"] = pd.Categorical(truth[test], categories=ORDER)
    sslcell.pl.cell_cycle(best, color="phase", path=ROOT / "benchmarks" / "results" / "cell_cycle_jurkat.png")
    info["jurkat"] = {"train": int(len(train)), "test": int(len(test)), "finetune": finetune_config.__dict__}


def expression(args, rows: list[dict], info: dict) -> None:
    adata = make_expression(n_cells=3000, n_genes=1000, n_cell_types=6, seed=args.seed)
    s = [g for g in adata.var_names if g.startswith("S_")]
    g2m = [g for g in adata.var_names if g.startswith("G2M_")]
    truth = adata.obs["cycle_theta"].to_numpy()
    sslcell.tl.score_cell_cycle(adata, s_genes=s, g2m_genes=g2m)
    anchors = adata.obs["cycle_score_phase"].astype(object).to_numpy()
    order = ["G1", "S", "G2M"]

    def add(entry: str, theta: np.ndarray, fit) -> None:
        row = {"dataset": "synthetic expression", "entry": entry, "circular_correlation": circular_correlation(
            theta, truth), "closure": fit.closure, "residual": fit.residual}
        rows.append(row)
        print(json.dumps(row, default=float), flush=True)

    sslcell.tl.cell_cycle_pca(adata, s_genes=s, g2m_genes=g2m)
    fit = fit_cycle(adata.obsm["X_cell_cycle_pca"], anchors, order, warn=False)
    add("cycle-gene PCA (tricycle-style baseline)", fit.theta(adata.obsm["X_cell_cycle_pca"]), fit)
    config = load_config(ROOT / "configs" / "expression_mae.yaml")
    config.train.progress_bar = False
    model = sslcell.pretrain(config, adata, Path(args.workdir) / "expression_mae", overwrite=True,
                             max_epochs=args.expression_epochs)
    embedding = sslcell.tl.embed(adata, model, copy=True).obsm["X_sslcell"]
    fit = fit_cycle(embedding, anchors, order, warn=False)
    add("sslcell MAE embedding alone", fit.theta(embedding), fit)
    classifier = finetune(adata, model, anchors, FinetuneConfig(head="mlp", epochs=100, progress_bar=False))
    scored = sslcell.tl.predict(adata, classifier, copy=True)
    plane = wheel(np.log(np.clip(scored.obsm["sslcell_pred_proba"], 1e-6, None)), classifier.classes, order)
    fit = fit_cycle(plane, anchors, order, warn=False)
    add("sslcell MAE + DeepCycle recipe (MLP head on gene-score phases)", fit.theta(plane), fit)
    info["expression"] = {"cells": int(adata.n_obs), "genes": int(adata.n_vars), "pretrain_epochs":
                          args.expression_epochs}


def fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def write(rows: list[dict], info: dict, command: str) -> None:
    out = ROOT / "benchmarks" / "results" / "cell_cycle"
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows, "info": info,
                                                    "versions": versions(), "machine": platform.platform()},
                                                   indent=1, default=float))
    j = info.get("jurkat", {})
    lines = ["# Cell-cycle reconstruction", "", f"Command: `{command}`  ",
             f"Machine: {platform.platform()}, CPU only. Seed 0. Versions: "
             + ", ".join(f"{k} {v}" for k, v in versions().items()), "",
             f"## Jurkat: held-out {j.get('test')} crops (trained on {j.get('train')}); inputs: channels 0 and 2", "",
             "Aligned Spearman: θ against G1→S→G2→prophase→metaphase→anaphase→telophase, origin and direction "
             "chosen optimally on the scored cells.", "",
             "| entry | aligned Spearman | pseudo-phase accuracy | pseudo-phase arc accuracy | closure |",
             "|---|---:|---:|---:|---:|"]
    for r in sorted((r for r in rows if r["dataset"] == "jurkat"), key=lambda r: -r["aligned_spearman"]):
        lines.append(f"| {r['entry']} | {r['aligned_spearman']:.3f} | {fmt(r.get('pseudo_accuracy'))} | "
                     f"{fmt(r.get('pseudo_arc_accuracy'))} | {fmt(r.get('closure'))} |")
    lines += ["", "![Jurkat](cell_cycle_jurkat.png)", "",
              "## Synthetic expression (known continuous phase)", "",
              "| entry | circular correlation | closure | residual |", "|---|---:|---:|---:|"]
    for r in sorted((r for r in rows if r["dataset"] != "jurkat"), key=lambda r: -r["circular_correlation"]):
        lines.append(f"| {r['entry']} | {r['circular_correlation']:.3f} | {r['closure']:.3f} | {r['residual']:.3f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}.md", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=str(DATA))
    parser.add_argument("--workdir", default="/tmp/sslcell_bench_cell_cycle")
    parser.add_argument("--finetune", default='{"head": "full", "epochs": 30, "encoder_lr_factor": 1.0}',
                        help="FinetuneConfig fields (JSON) of the recipe's classifier")
    parser.add_argument("--expression-epochs", type=int, default=30)
    parser.add_argument("--skip", nargs="*", default=[], choices=["jurkat", "expression"])
    args = parser.parse_args()
    command = "python benchmarks/bench_cell_cycle.py " + " ".join(
        a for a in sys.argv[1:] if a not in (args.data_dir, "--data-dir"))
    rows: list[dict] = []
    info: dict = {}
    if "expression" not in args.skip:
        expression(args, rows, info)
        write(rows, info, command)
    if "jurkat" not in args.skip:
        jurkat(args, rows, info)
        write(rows, info, command)


if __name__ == "__main__":
    main()
