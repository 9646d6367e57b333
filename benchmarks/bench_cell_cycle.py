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

*Single-phase acquisitions.* Each recipe is saved and loaded back (``CycleRecipe.save`` / ``load``), and the held-out
crops of one true phase (G1, S, G2, M = prophase to telophase), and only those, are placed by it as an acquisition
of their own (``CycleRecipe.apply``). The arcs of the true phases on the recipe's circle come from the *training*
crops and their labels (``CycleFit.reanchored``: same circle, arcs as wide as the phases' shares); reported: the
share of each acquisition's θ in its phase's arc (chance: the arc's share of the circle), whether θ is the same as
when those crops are placed among all held-out crops, and what a circle fitted to the acquisition alone gives.

**Expression** (``make_expression``, 3,000 cells, 1,000 genes, 6 types, seed 0): θ against the simulated continuous
phase. Two cycle programmes (``--programmes``): ``whitfield`` (opt-in in the generator: five phase gene groups,
MG1 / G1S / S / G2 / G2M, with cosine profiles, so the phase is identifiable all round) and ``s_g2m`` (the generator's
default: S and G2M genes only, nothing marks mid-G1). Entries: the cycle-gene PCA baseline on the S and G2M genes (as
``tl.cell_cycle_pca``) and, for ``whitfield``, on all cycle genes; the sslcell MAE embedding alone; the DeepCycle
recipe for expression (an MLP head on the frozen MAE encoder learns pseudo-phases; its class log-probabilities on the
phase wheel): pseudo-phases from the S / G2M gene scores (3 phases) and, for ``whitfield``, Revelio-style calls from
the five phase gene sets (``score_phase_sets``); the phase-set z-scores themselves (no network); the MAE
pretrained on the 40 cycle genes only, its embedding alone and (``whitfield``) with the recipe on the phase-set
calls. Each entry is anchored by its own pseudo-phases (no true label). Scores:
``sslcell.evaluate.circular_correlation`` (Jammalamadaka and SenGupta's coefficient around each angle's sample mean
direction) and the same coefficient in its form for uniformly distributed angles
(``circular_correlation(..., uniform=True)``); the simulated phase is uniform, so its sample mean direction is
noise and the first can swing between -1 and 1 for the same θ (see the results).

    python benchmarks/bench_cell_cycle.py [--skip jurkat|expression] [--programmes whitfield s_g2m]

``--skip`` keeps the skipped section's rows, command and versions from the existing results JSON. Writes
benchmarks/results/cell_cycle.md / .json and cell_cycle_jurkat.png (``--results-dir`` to write elsewhere).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split

import sslcell
from sslcell.cellcycle import fit_cycle
from sslcell.cellcycle.expression import score_phase_sets
from sslcell.cellcycle.recipe import CycleRecipe, descriptor_of, fit_recipe, marker_intensity, wheel
from sslcell.classify import FinetuneConfig, finetune
from sslcell.config import load_config
from sslcell.data.images import CellImages
from sslcell.data.synthetic import make_expression, programmes_of
from sslcell.evaluate import circular_correlation, cyclic_spearman, phase_arc_accuracy
from sslcell.evaluate.baselines import pixel_pca_baseline
from sslcell.methods import build_method
from sslcell.provenance import versions

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
ORDER = ["G1", "S", "G2", "Prophase", "Metaphase", "Anaphase", "Telophase"]
MERGED = ["G1", "S", "G2", "M"]  # the mitotic phases are few (121 held-out crops, 100 of them prophase): one arc
BINS = ["bin1", "bin2", "bin3", "bin4"]
WHITFIELD = ["MG1", "G1S", "S", "G2", "G2M"]
SECTIONS = {"jurkat": ("jurkat", "jurkat_pretrain_s"), "expression": ("expression",)}


def section_of(row: dict) -> str:
    return "jurkat" if row["dataset"].startswith("jurkat") else "expression"


def jurkat(args, rows: list[dict], info: dict) -> None:
    cells = CellImages.read(Path(args.data_dir) / "jurkat_cellcycle_ifc_mlcp.npz")
    if args.jurkat_subsample:  # smoke runs of the code only: a stratified subsample
        labels = np.asarray(cells.obs["label"].astype(str))
        keep, _ = train_test_split(np.arange(len(cells)), train_size=args.jurkat_subsample, stratify=labels,
                                   random_state=args.seed)
        cells = cells[np.sort(keep)]
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
    model = sslcell.pretrain(config, free[train], Path(args.workdir) / "jurkat_simclr", overwrite=True,
                             max_epochs=args.pretrain_epochs)
    info["jurkat_pretrain_s"] = round(time.perf_counter() - start, 1)
    embedding = sslcell.tl.embed_crops(free, model).obsm["X_sslcell"]
    fit = fit_cycle(embedding[train], pseudo[train], BINS, warn=False)
    add("sslcell SimCLR embedding alone, circle fit (no pseudo-labels used for training)", fit.theta(embedding[test]),
        fit, pseudo_arc_accuracy=phase_arc_accuracy(fit.theta(embedding[test]), pseudo[test], BINS, fit.phase_starts))

    finetune_config = FinetuneConfig.from_dict({**json.loads(args.finetune), "progress_bar": False})
    torch.manual_seed(args.seed)
    scratch = build_method(config, model.inputs.contract.to_dict())
    best = None
    entries = (("sslcell SimCLR + DeepCycle recipe", model),
               ("DeepCycle recipe from a random encoder (supervised from scratch)", scratch))
    for k, (name, encoder) in enumerate(entries):
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
        recipe.save(Path(args.workdir) / f"jurkat_recipe_{k}")
        single_phase(CycleRecipe.load(Path(args.workdir) / f"jurkat_recipe_{k}"), name, free, train, test, truth,
                     theta, rows)
        if best is None:
            best = placed
    best.obs["phase"] = pd.Categorical(truth[test], categories=ORDER)
    sslcell.pl.cell_cycle(best, color="phase", path=Path(args.results_dir) / "cell_cycle_jurkat.png")
    info["jurkat"] = {"train": int(len(train)), "test": int(len(test)), "finetune": finetune_config.__dict__,
                      "pretrain_epochs": args.pretrain_epochs or config.train.max_epochs,
                      "subsample": args.jurkat_subsample}


def single_phase(recipe: CycleRecipe, name: str, free: CellImages, train: np.ndarray, test: np.ndarray,
                 truth: np.ndarray, theta_all: np.ndarray, rows: list[dict]) -> None:
    """Held-out crops of one true phase placed by the loaded recipe as their own acquisition (module doc)."""
    merged = np.where(np.isin(truth, ORDER[3:]), "M", truth)
    classes, order = recipe.classifier.classes, recipe.info["order"]
    reference = wheel(descriptor_of(recipe.classifier, free[train]), classes, order)
    arcs = recipe.fit.reanchored(reference, merged[train], MERGED, warn=False)
    widths = np.diff(np.r_[arcs.phase_starts, 2 * np.pi])
    for p, width in zip(MERGED, widths, strict=True):
        mask = merged[test] == p
        theta, _, descriptor = recipe.apply(free[test[mask]])
        plane = wheel(descriptor, classes, order)
        own = fit_cycle(plane, warn=False)
        row = {"dataset": "jurkat single-phase acquisition", "entry": name, "phase": p, "cells": int(mask.sum()),
               "share_in_arc": float(np.mean(arcs.phase(arcs.theta(plane)) == p)),
               "arc_share_of_circle": float(width / (2 * np.pi)),
               "same_theta_as_among_all": bool(np.allclose(theta, theta_all[mask], atol=1e-4)),
               "own_fit_closure": own.closure, "own_fit_closure_unscaled": own.closure_unscaled,
               "own_fit_residual": own.residual}
        rows.append(row)
        print(json.dumps(row, default=float), flush=True)


def expression(args, rows: list[dict], info: dict) -> None:
    info["expression"] = {}
    for programme in args.programmes:
        start = time.perf_counter()
        expression_programme(args, programme, rows)
        info["expression"][programme] = {"cells": 3000, "genes": 1000, "cell_types": 6, "pretrain_epochs":
                                         args.expression_epochs, "seconds": round(time.perf_counter() - start, 1)}


def expression_programme(args, programme: str, rows: list[dict]) -> None:
    adata = make_expression(n_cells=3000, n_genes=1000, n_cell_types=6, seed=args.seed, cycle_programme=programme)
    programmes = programmes_of(adata)
    s, g2m = programmes["S"], programmes["G2M"]
    truth = adata.obs["cycle_theta"].to_numpy()
    sslcell.tl.score_cell_cycle(adata, s_genes=s, g2m_genes=g2m)
    anchors = adata.obs["cycle_score_phase"].astype(object).to_numpy()
    order = ["G1", "S", "G2M"]

    def add(entry: str, theta: np.ndarray, fit, pseudo: str) -> None:
        row = {"dataset": "synthetic expression", "programme": programme, "entry": entry, "pseudo_phases": pseudo,
               "circular_correlation": circular_correlation(theta, truth),
               "circular_correlation_uniform": circular_correlation(theta, truth, uniform=True),
               "closure": fit.closure, "closure_unscaled": fit.closure_unscaled, "residual": fit.residual}
        rows.append(row)
        print(json.dumps(row, default=float), flush=True)

    sslcell.tl.cell_cycle_pca(adata, s_genes=s, g2m_genes=g2m)
    fit = fit_cycle(adata.obsm["X_cell_cycle_pca"], anchors, order, warn=False)
    add("cycle-gene PCA, S and G2M genes (tricycle-style baseline)", fit.theta(adata.obsm["X_cell_cycle_pca"]), fit,
        "S/G2M scores")
    sets = None
    if programme == "whitfield":
        sets = {name: programmes[name] for name in WHITFIELD}
        early, late = sets["MG1"] + sets["G1S"] + sets["S"], sets["G2"] + sets["G2M"]  # all 40 cycle genes
        sslcell.tl.cell_cycle_pca(adata, s_genes=early, g2m_genes=late, key_added="X_all_cycle_pca")
        fit = fit_cycle(adata.obsm["X_all_cycle_pca"], anchors, order, warn=False)
        add("cycle-gene PCA, all cycle genes (tricycle-style baseline)", fit.theta(adata.obsm["X_all_cycle_pca"]),
            fit, "S/G2M scores")
        calls = score_phase_sets(adata, sets, seed=args.seed)
        set_anchors = calls["phase"].astype(object).to_numpy()
        z = calls[[f"{name}_score" for name in WHITFIELD]].to_numpy()
        fit = fit_cycle(z, set_anchors, WHITFIELD, warn=False)
        add("phase-set z-scores, circle fit (Revelio-style, no network)", fit.theta(z), fit, "5 phase sets")
    config = load_config(ROOT / "configs" / "expression_mae.yaml")
    config.train.progress_bar = False
    model = sslcell.pretrain(config, adata, Path(args.workdir) / f"expression_mae_{programme}", overwrite=True,
                             max_epochs=args.expression_epochs)
    embedding = sslcell.tl.embed(adata, model, copy=True).obsm["X_sslcell"]
    fit = fit_cycle(embedding, anchors, order, warn=False)
    add("sslcell MAE embedding alone", fit.theta(embedding), fit, "S/G2M scores")
    labelled = [("sslcell MAE + DeepCycle recipe (MLP head on S/G2M gene-score phases)", anchors, order,
                 "S/G2M scores")]
    if sets is not None:
        labelled.append(("sslcell MAE + DeepCycle recipe (MLP head on 5 phase-set calls)", set_anchors, WHITFIELD,
                         "5 phase sets"))
    for entry, labels, phases, pseudo in labelled:
        add(entry, *recipe_theta(adata, model, labels, phases), pseudo)
    # The MAE on the cycle genes only (tricycle restricts its PCA to cell-cycle genes likewise): the embedding holds
    # the cycle instead of the cell types. Added after the first run of the entries above (none reached 0.9); its
    # settings are the MAE config's, unchanged, and it was run once.
    genes = [g for name in (WHITFIELD if programme == "whitfield" else ["S", "G2M"]) for g in programmes[name]]
    cyc = adata[:, genes].copy()
    model = sslcell.pretrain(config, cyc, Path(args.workdir) / f"expression_mae_cycle_genes_{programme}",
                             overwrite=True, max_epochs=args.expression_epochs)
    embedding = sslcell.tl.embed(cyc, model, copy=True).obsm["X_sslcell"]
    fit = fit_cycle(embedding, anchors, order, warn=False)
    add(f"sslcell MAE on the {len(genes)} cycle genes, embedding alone", fit.theta(embedding), fit, "S/G2M scores")
    if sets is not None:
        add(f"sslcell MAE on the {len(genes)} cycle genes + DeepCycle recipe (MLP head on 5 phase-set calls)",
            *recipe_theta(cyc, model, set_anchors, WHITFIELD), "5 phase sets")


def recipe_theta(adata, model, labels: np.ndarray, phases: list[str]):
    """The DeepCycle recipe for expression: an MLP head on the frozen encoder learns the pseudo-phases; θ from the
    circle fitted on the phase wheel of its class log-probabilities. Returns θ and the fit."""
    classifier = finetune(adata, model, labels, FinetuneConfig(head="mlp", epochs=100, progress_bar=False))
    scored = sslcell.tl.predict(adata, classifier, copy=True)
    plane = wheel(np.log(np.clip(scored.obsm["sslcell_pred_proba"], 1e-6, None)), classifier.classes, phases)
    fit = fit_cycle(plane, labels, phases, warn=False)
    return fit.theta(plane), fit


def fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


PROGRAMME_TITLES = {
    "whitfield": "cycle programme `whitfield` (five phase gene groups, cosine profiles: the phase is identifiable all "
                 "round)",
    "s_g2m": "cycle programme `s_g2m` (the generator's default: S and G2M genes only, nothing marks mid-G1)",
}


def write(rows: list[dict], info: dict, sections: dict[str, dict], results: Path) -> None:
    out = results / "cell_cycle"
    out.with_suffix(".json").write_text(json.dumps({"sections": sections, "rows": rows, "info": info}, indent=1,
                                                   default=float))
    lines = ["# Cell-cycle reconstruction", ""]

    def header(section: str) -> None:
        meta = sections.get(section, {})
        lines.extend([f"Command: `{meta.get('command')}`  ",
                      f"Machine: {meta.get('machine')}, CPU only. Seed 0. Versions: "
                      + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()), ""])

    j = info.get("jurkat", {})
    lines += [f"## Jurkat: held-out {j.get('test')} crops (trained on {j.get('train')}); inputs: channels 0 and 2", ""]
    header("jurkat")
    lines += ["Aligned Spearman: θ against G1→S→G2→prophase→metaphase→anaphase→telophase, origin and direction "
              "chosen optimally on the scored cells.", "",
              "| entry | aligned Spearman | pseudo-phase accuracy | pseudo-phase arc accuracy | closure |",
              "|---|---:|---:|---:|---:|"]
    for r in sorted((r for r in rows if r["dataset"] == "jurkat"), key=lambda r: -r["aligned_spearman"]):
        lines.append(f"| {r['entry']} | {r['aligned_spearman']:.3f} | {fmt(r.get('pseudo_accuracy'))} | "
                     f"{fmt(r.get('pseudo_arc_accuracy'))} | {fmt(r.get('closure'))} |")
    lines += ["", "![Jurkat](cell_cycle_jurkat.png)", ""]
    single = [r for r in rows if r["dataset"] == "jurkat single-phase acquisition"]
    lines += ["### Single-phase acquisitions (held-out crops of one phase, placed by the saved and loaded recipe)", ""]
    if single:
        lines += ["Arcs of G1, S, G2 and M (prophase to telophase) on each recipe's circle from the training crops' "
                  "labels; chance = the arc's share of the circle. \"Own fit\": a circle fitted to the acquisition "
                  "alone (closure, closure without axis scaling, residual; `fit_cycle` warns below 0.75 / above "
                  "0.25).", "",
                  "| recipe | phase | crops | θ in the phase's arc | chance | θ as among all held-out crops | "
                  "own fit: closure / unscaled / residual |", "|---|---|---:|---:|---:|---|---|"]
        for r in single:
            lines.append(f"| {r['entry']} | {r['phase']} | {r['cells']} | {r['share_in_arc']:.3f} | "
                         f"{r['arc_share_of_circle']:.3f} | "
                         f"{'same' if r['same_theta_as_among_all'] else 'DIFFERENT'} | "
                         f"{r['own_fit_closure']:.2f} / {r['own_fit_closure_unscaled']:.2f} / "
                         f"{r['own_fit_residual']:.2f} |")
    else:
        lines.append("Not measured in the run above: the code that measures it was added after it; the next full "
                     "run of the Jurkat section fills this table.")
    lines += ["", "## Synthetic expression (known continuous phase)", ""]
    header("expression")
    lines += ["circular correlation: `sslcell.evaluate.circular_correlation` (Jammalamadaka-SenGupta around the sample "
              "mean directions). uniform form: the same coefficient for a uniformly distributed angle, "
              "R(θ − truth) − R(θ + truth) (`circular_correlation(..., uniform=True)`). The simulated phase is "
              "uniform, so its sample mean direction is noise and the first column can take any sign for a θ that "
              "follows the truth; the second is the one to read.", ""]
    for programme in dict.fromkeys(r.get("programme", "s_g2m") for r in rows if section_of(r) == "expression"):
        lines += [f"### {PROGRAMME_TITLES.get(programme, programme)}", "",
                  "| entry | pseudo-phases | circular correlation, uniform form | circular correlation | closure | "
                  "closure unscaled | residual |", "|---|---|---:|---:|---:|---:|---:|"]
        chosen = [r for r in rows if section_of(r) == "expression" and r.get("programme", "s_g2m") == programme]
        for r in sorted(chosen, key=lambda r: -r.get("circular_correlation_uniform", r["circular_correlation"])):
            lines.append(f"| {r['entry']} | {r.get('pseudo_phases', '')} | "
                         f"{fmt(r.get('circular_correlation_uniform'))} | {r['circular_correlation']:.3f} | "
                         f"{r['closure']:.3f} | {fmt(r.get('closure_unscaled'))} | {r['residual']:.3f} |")
        lines.append("")
    md = out.with_suffix(".md")
    old = md.read_text() if md.is_file() else ""
    reading = old[old.index(READING):] if READING in old else ""  # written by hand after a run: kept, to be revised
    md.write_text("\n".join(lines).rstrip("\n") + "\n" + ("\n" + reading if reading else ""))
    print(f"wrote {md}", flush=True)


READING = "## Reading (written by hand after the run)"


def previous_results(results: Path) -> tuple[list[dict], dict, dict[str, dict]]:
    """Rows, info and per-section command / versions / machine of the existing results JSON (older files had one
    command for both sections)."""
    path = results / "cell_cycle.json"
    if not path.is_file():
        return [], {}, {}
    old = json.loads(path.read_text())
    sections = old.get("sections") or {name: {"command": old.get("command"), "versions": old.get("versions", {}),
                                              "machine": old.get("machine")} for name in SECTIONS}
    return old.get("rows", []), old.get("info", {}), sections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=str(DATA))
    parser.add_argument("--workdir", default="/tmp/sslcell_bench_cell_cycle")
    parser.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--finetune", default='{"head": "full", "epochs": 30, "encoder_lr_factor": 1.0}',
                        help="FinetuneConfig fields (JSON) of the recipe's classifier")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="SimCLR epochs (default: the config's)")
    parser.add_argument("--jurkat-subsample", type=int, default=None, help="smoke runs only: a stratified subsample")
    parser.add_argument("--expression-epochs", type=int, default=30)
    parser.add_argument("--programmes", nargs="+", default=["whitfield", "s_g2m"], choices=["whitfield", "s_g2m"])
    parser.add_argument("--skip", nargs="*", default=[], choices=["jurkat", "expression"])
    args = parser.parse_args()
    command = shlex.join(["python", "benchmarks/bench_cell_cycle.py", *(
        a for a in sys.argv[1:] if a not in (args.data_dir, "--data-dir", args.results_dir, "--results-dir"))])
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    old_rows, old_info, sections = previous_results(results)
    rows = [r for r in old_rows if section_of(r) in args.skip]
    info = {k: v for name in args.skip for k, v in old_info.items() if k in SECTIONS[name]}
    sections = {name: meta for name, meta in sections.items() if name in args.skip}
    for name, run in (("expression", expression), ("jurkat", jurkat)):
        if name in args.skip:
            continue
        run(args, rows, info)
        sections[name] = {"command": command, "versions": versions(), "machine": platform.platform()}
        write(rows, info, sections, results)


if __name__ == "__main__":
    main()
