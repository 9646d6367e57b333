"""Kind ``expression_celltype``: cell-type quality of expression embeddings against PCA-50, scVI and a random encoder.

Every recipe is pretrained on all cells of the ``.h5ad`` WITHOUT labels, the cells are embedded, and every embedding
and baseline is scored in ONE :func:`sslcell.tl.evaluate` call on the same cells, folds and few-label draws (the
protocols: :mod:`sslcell.evaluate.report`; logistic regression and kNN, 5-fold CV, 5 labels per class). Baselines,
computed in the same run from the same counts:

* ``pca_hvg``: PCA-50 of the log-normalised, scaled 2,000 highly variable genes
  (:func:`~sslcell.evaluate.pca_baseline`);
* ``scvi``: scVI (latent 30) on the raw counts of the 2,000 highly variable genes (``seurat_v3``), where scvi-tools
  is installed; otherwise a row says it is not installed;
* ``random_encoder``: the first trained recipe's architecture and inputs, randomly initialised (seeded), embedded
  and probed the same way: what pretraining adds over the architecture alone.

The helpers below (subsampling, pretraining a recipe, the random encoder, the bar plot) are shared with
:mod:`sslcell.benchmark.tasks.transfer_quality`.
"""

from __future__ import annotations

import copy
import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sslcell.benchmark.registry import Context, Table, Target, TaskKind, TaskResult, register
from sslcell.errors import ConfigError, SSLCellError

# the protocols of tl.evaluate, as the tables name them ({k}: neighbours, {s}: folds, {n}: labels per class)
PROTOCOLS = {
    "knn_cv": "kNN-{k}, {s}-fold CV",
    "logistic_cv": "logistic, {s}-fold CV",
    "logistic_few_label": "logistic, {n} labels/class",
    "logistic_few_label_raw": "logistic (unscaled), {n} labels/class",
}

TARGETS_NOTE = ("Targets compare the first recipe that trained (fixed in the suite file before the run, not chosen on "
                "these scores) with each baseline, as ratios of scores measured in this run: logistic regression in "
                "5-fold CV for PCA-50 and scVI (the issue's 'against scVI and PCA-50 with logistic regression'), "
                "and, with 5 labels per class, the better of the scaled and unscaled logistic probe on each side.")


@dataclass
class ExpressionCelltypeParams:
    label_key: str = "label"  # obs column with the cell types (used only by the probes)
    max_epochs: int | None = None  # override every recipe's train.max_epochs
    max_cells: int | None = None  # stratified subsample of about this many cells (None: all)
    n_neighbors: int = 15  # kNN probe
    n_splits: int = 5  # CV folds
    n_per_class: int = 5  # few-label protocol
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])  # few-label draws
    scvi_latent: int = 30
    scvi_max_epochs: int | None = None  # None: scvi-tools' default schedule

    def check(self) -> None:
        for name in ("max_epochs", "max_cells", "scvi_max_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be >= 1 or null, got {value}")
        if self.n_splits < 2 or self.n_neighbors < 1 or self.n_per_class < 1 or self.scvi_latent < 1:
            raise ConfigError("n_splits: must be >= 2 (and n_neighbors, n_per_class, scvi_latent >= 1)")
        if not self.seeds:
            raise ConfigError("seeds: name at least one few-label draw")


# ---------------------------------------------------------------- helpers shared with transfer_quality


def stratified_subsample(labels: np.ndarray, max_cells: int | None, seed: int, min_per_class: int = 10) -> np.ndarray:
    """Sorted positions of about ``max_cells`` of ``labels`` ``(N,)``: every class keeps its share of the cells, at
    least ``min_per_class`` (or all it has), drawn with ``default_rng(seed)``. ``None`` or ``>= N``: every position."""
    labels = np.asarray(labels)
    if max_cells is None or max_cells >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    fraction = max_cells / len(labels)
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = min(len(members), max(min_per_class, round(fraction * len(members))))
        keep.append(rng.choice(members, n, replace=False))
    return np.sort(np.concatenate(keep))


def embed_device(ctx: Context) -> str | None:
    """``ctx.device`` for :func:`sslcell.tl.embed` and friends (``None``: CUDA when available)."""
    return None if ctx.device == "auto" else ctx.device


def pretrain_recipe(recipe: Any, data: Any, ctx: Context, max_epochs: int | None) -> tuple[Any, float]:
    """Pretrain ``recipe`` (a :class:`~sslcell.benchmark.suite.RecipeSpec`) on ``data`` without labels, with the
    suite's seed and device, into ``ctx.workdir / recipe.name``; -> (model, seconds). The spec is not modified."""
    from sslcell.train import pretrain

    config = copy.deepcopy(recipe.config)
    config.train.seed = ctx.seed
    config.train.progress_bar = False
    config.train.accelerator = ctx.device  # auto, cpu or cuda
    start = time.perf_counter()
    model = pretrain(config, data, ctx.workdir / recipe.name, overwrite=True, max_epochs=max_epochs)
    return model, time.perf_counter() - start


def random_encoder(model: Any, seed: int) -> Any:
    """An untrained model of ``model``'s recipe (architecture) and inputs (genes or channels and their
    statistics), initialised with ``torch.manual_seed(seed)``; the global random state is kept."""
    import torch

    from sslcell.methods import build_method

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_method(model.config, model.inputs.contract).eval()


def plot_scores(path: Path, panels: dict[str, list[tuple[str, float, float, bool]]], xlabel: str) -> None:
    """Horizontal bars, one panel per key; a bar per ``(label, mean, std, is_baseline)`` (baselines in grey)."""
    from matplotlib.figure import Figure

    tallest = max(len(bars) for bars in panels.values())
    ncols = min(2, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(5.2 * ncols, (0.3 * tallest + 1.2) * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, (title, bars) in zip(axes[:len(panels)], panels.items(), strict=True):
        labels, means, stds, baseline = zip(*bars, strict=True)
        pos = np.arange(len(bars))
        ax.barh(pos, means, xerr=stds, capsize=2, color=["0.65" if b else "tab:blue" for b in baseline])
        ax.set_yticks(pos, labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------- the task


def scvi_embedding(adata: Any, seed: int, n_latent: int = 30, max_epochs: int | None = None,
                   accelerator: str = "auto", n_top_genes: int = 2000) -> np.ndarray:
    """scVI (Lopez et al. 2018) on the raw counts ``(N, G)`` of the ``seurat_v3`` highly variable genes ->
    ``(N, n_latent)``; ``max_epochs=None``: scvi-tools' default schedule. Genes seen in fewer than 3 cells are
    dropped first (on small subsamples the ``seurat_v3`` loess fit is singular without it)."""
    import scanpy as sc
    import scvi

    scvi.settings.seed = seed
    work = adata.copy()
    sc.pp.filter_genes(work, min_cells=3)
    sc.pp.highly_variable_genes(work, n_top_genes=min(n_top_genes, work.n_vars), flavor="seurat_v3", subset=True)
    scvi.model.SCVI.setup_anndata(work)
    model = scvi.model.SCVI(work, n_latent=n_latent)
    model.train(max_epochs=max_epochs, accelerator="gpu" if accelerator == "cuda" else accelerator,
                enable_progress_bar=False)
    return np.asarray(model.get_latent_representation(), dtype=np.float32)


def run(task: Any, ctx: Context) -> TaskResult:
    """Pretrain, embed, compute the baselines, score everything in one ``tl.evaluate`` call."""
    import anndata as ad

    import sslcell

    p: ExpressionCelltypeParams = task.params
    adata = ad.read_h5ad(task.path)
    if p.label_key not in adata.obs:
        raise ConfigError(f"params.label_key: {p.label_key!r} is not a column of {task.path.name} "
                          f"(columns: {list(adata.obs.columns)})")
    n_all = adata.n_obs
    rows = stratified_subsample(adata.obs[p.label_key].astype(str).to_numpy(), p.max_cells, ctx.seed,
                                min_per_class=p.n_splits)
    adata = adata[rows].copy() if len(rows) < n_all else adata

    runs: list[dict[str, Any]] = []  # one row per entry: how it was made
    names: dict[str, str] = {}  # obsm key -> entry name
    first = None
    for recipe in ctx.steps(task.recipes, desc="recipes"):
        epochs = p.max_epochs or recipe.config.train.max_epochs
        try:
            model, seconds = pretrain_recipe(recipe, adata, ctx, p.max_epochs)
        except SSLCellError as err:  # e.g. programme masking on data without gene symbols: a row, not a failure
            runs.append({"entry": recipe.name, "kind": "sslcell recipe", "source": recipe.source,
                         "status": f"not run: {err}"})
            continue
        sslcell.tl.embed(adata, model, key_added=f"X_{recipe.name}", device=embed_device(ctx), overwrite=True)
        names[f"X_{recipe.name}"] = recipe.name
        first = first or (recipe.name, model)
        runs.append({"entry": recipe.name, "kind": "sslcell recipe", "source": recipe.source, "epochs": epochs,
                     "seconds": seconds, "status": f"{recipe.config.method.name}, pretrained without labels"})

    if "random_encoder" in task.baselines:
        if first is None:
            runs.append({"entry": "random_encoder", "kind": "baseline", "status": "not run: no recipe trained"})
        else:
            untrained = random_encoder(first[1], ctx.seed)
            sslcell.tl.embed(adata, untrained, key_added="X_random_encoder", device=embed_device(ctx),
                             overwrite=True)
            names["X_random_encoder"] = "random_encoder"
            runs.append({"entry": "random_encoder", "kind": "baseline", "epochs": 0,
                         "status": f"{first[0]}'s architecture and inputs, random weights (torch seed {ctx.seed})"})
    if "scvi" in task.baselines:
        runs.append(_scvi(adata, p, ctx, names))
    if "pca_hvg" in task.baselines:
        runs.append({"entry": "pca_hvg", "kind": "baseline", "status": "PCA-50 of the log-normalised, scaled 2,000 "
                     "highly variable genes (computed inside tl.evaluate)"})

    start = time.perf_counter()
    report = sslcell.tl.evaluate(adata, p.label_key, use_rep=list(names),
                                 baselines=("pca",) if "pca_hvg" in task.baselines else (),
                                 n_neighbors=p.n_neighbors, n_splits=p.n_splits, n_per_class=p.n_per_class,
                                 seeds=p.seeds, seed=ctx.seed)
    evaluate_s = time.perf_counter() - start
    names["pca"] = "pca_hvg"
    scores = [{"entry": names[r["representation"]], "dims": r["dims"],
               "protocol": PROTOCOLS[r["protocol"]].format(k=p.n_neighbors, s=p.n_splits, n=p.n_per_class),
               "macro-F1": r["macro_f1"], "macro-F1 std": r["macro_f1_std"],
               "accuracy": r["accuracy"], "accuracy std": r["accuracy_std"], "_protocol": r["protocol"]}
              for r in report.rows]
    baselines = {"pca_hvg", "scvi", "random_encoder"}
    plot = f"{ctx.prefix}_scores.png"
    plot_scores(ctx.out_dir / plot, {
        PROTOCOLS[proto].format(k=p.n_neighbors, s=p.n_splits, n=p.n_per_class):
            [(s["entry"], s["macro-F1"], s["macro-F1 std"], s["entry"] in baselines)
             for s in scores if s["_protocol"] == proto]
        for proto in PROTOCOLS}, "macro-F1")
    columns = ["entry", "dims", "protocol", "macro-F1", "macro-F1 std", "accuracy", "accuracy std"]
    dropped = ", ".join(f"{k} ({v})" for k, v in report.dropped_classes.items()) or "none"
    targets = _targets(scores, first[0] if first else None)
    return TaskResult(
        tables=[
            Table("How each entry was made", ["entry", "kind", "epochs", "seconds", "status"], runs,
                  note="Seconds: pretraining (or fitting) on this run's hardware, embedding excluded."),
            Table(f"Cell types, obs['{p.label_key}']: {report.n_cells} cells, {report.n_classes} classes",
                  columns, [{c: s[c] for c in columns} for s in scores],
                  note=f"Mean and std over {p.n_splits} CV folds (StratifiedKFold, shuffled, seed {ctx.seed}) or "
                       f"over the few-label draws (seeds {list(p.seeds)}). Classes dropped for having fewer than "
                       f"{p.n_splits} cells: {dropped}."),
        ],
        targets=targets,
        plots=[plot],
        notes=[
            f"Data: `{task.path.name}`, {adata.n_obs:,} of {n_all:,} cells"
            + (f" (stratified subsample, seed {ctx.seed})" if adata.n_obs < n_all else "")
            + f" x {adata.n_vars:,} genes, raw counts. Every recipe is pretrained on these cells without labels "
              "(epochs " + (f"overridden to {p.max_epochs}" if p.max_epochs else "as in each recipe") + ", seed "
            f"{ctx.seed}); labels are used only by the probes. Every embedding and baseline is scored in one "
            f"`sslcell.tl.evaluate` call ({evaluate_s:.0f} s): the same cells, folds and few-label draws.",
        ] + ([TARGETS_NOTE] if targets else []),
        raw={"report": report.to_dict(), "runs": runs, "n_cells_total": n_all},
    )


def _scvi(adata: Any, p: ExpressionCelltypeParams, ctx: Context, names: dict[str, str]) -> dict[str, Any]:
    """Embed with scVI into ``obsm['X_scvi']`` where scvi-tools is installed; -> the entry's row either way."""
    row: dict[str, Any] = {"entry": "scvi", "kind": "baseline"}
    if importlib.util.find_spec("scvi") is None:
        return row | {"status": "not installed (pip install -e '.[bench]'): not run"}
    start = time.perf_counter()
    try:
        adata.obsm["X_scvi"] = scvi_embedding(adata, ctx.seed, p.scvi_latent, p.scvi_max_epochs, ctx.device)
    except ImportError as err:
        return row | {"status": f"not run: scvi-tools could not be imported ({err})"}
    names["X_scvi"] = "scvi"
    import scvi

    epochs = p.scvi_max_epochs or "scvi-tools default"
    return row | {"epochs": epochs, "seconds": time.perf_counter() - start,
                  "status": f"scvi-tools {scvi.__version__}, latent {p.scvi_latent}, raw counts of the 2,000 "
                            "seurat_v3 highly variable genes (of genes in >= 3 cells)"}


def _targets(scores: list[dict[str, Any]], primary: str | None) -> list[Target]:
    """Ratios of the first trained recipe's scores to each baseline's, from the same evaluate call."""
    if primary is None:
        return []
    by = {(s["entry"], s["_protocol"]): s for s in scores}
    entries = {s["entry"] for s in scores}
    out = []
    for baseline in ("pca_hvg", "scvi", "random_encoder"):
        if baseline not in entries:
            continue
        for metric in ("macro-F1", "accuracy"):
            if baseline == "random_encoder" and metric == "accuracy":
                continue
            value = by[primary, "logistic_cv"][metric] / by[baseline, "logistic_cv"][metric]
            out.append(Target(f"{primary} / {baseline}, logistic CV {metric}", value, 1.0, unit="x"))
    if "pca_hvg" in entries:
        few = [max(by[e, "logistic_few_label"]["macro-F1"], by[e, "logistic_few_label_raw"]["macro-F1"])
               for e in (primary, "pca_hvg")]
        out.append(Target(f"{primary} / pca_hvg, few-label logistic macro-F1 (better of scaled, unscaled)",
                          few[0] / few[1], 1.0, unit="x"))
    return out


register(TaskKind(
    name="expression_celltype",
    params=ExpressionCelltypeParams,
    run=run,
    summary="cell types from expression embeddings (recipes pretrained without labels) vs PCA-50, scVI and a "
            "random encoder, one tl.evaluate call (kNN / logistic CV, few labels)",
    baselines=("pca_hvg", "scvi", "random_encoder"),
    needs_data=True,
    takes_recipes=True,
    quick={"max_cells": 400, "max_epochs": 1, "seeds": [0], "scvi_max_epochs": 1},
))
