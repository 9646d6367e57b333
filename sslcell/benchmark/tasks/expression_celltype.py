"""Kind ``expression_celltype``: cell-type quality of expression embeddings against PCA-50, scVI and a random encoder.

Every recipe is pretrained on all cells of the ``.h5ad`` WITHOUT labels and the cells are embedded. A stratified
share of the labelled cells (``validation_fraction``) is set aside as VALIDATION cells: few-label logistic probes
there choose the recipe the targets compare (the best macro-F1) and, for every entry, the probe (scaled or unscaled
features). Every embedding and baseline is then scored in ONE :func:`sslcell.tl.evaluate` call on the other (test)
cells, the same folds and few-label draws for all (the protocols: :mod:`sslcell.evaluate.report`; logistic regression
and kNN, 5-fold CV, 5 labels per class). Baselines, computed in the same run from the same counts:

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
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sslcell.benchmark.registry import Context, Table, Target, TaskKind, TaskResult, register
from sslcell.benchmark.tasks._preflight import check_h5ad
from sslcell.errors import ConfigError, InputError, SSLCellError

# the protocols of tl.evaluate, as the tables name them ({k}: neighbours, {s}: folds, {n}: labels per class)
FEW, FEW_RAW = "logistic_few_label", "logistic_few_label_raw"  # the few-label probes, scaled and unscaled
PROTOCOLS = {
    "knn_cv": "kNN-{k}, {s}-fold CV",
    "logistic_cv": "logistic, {s}-fold CV",
    FEW: "logistic, {n} labels/class",
    FEW_RAW: "logistic (unscaled), {n} labels/class",
}

TARGETS_NOTE = ("Targets compare the recipe chosen on the validation cells (the best few-label logistic macro-F1 "
                "there) with each baseline, as ratios of scores measured in this run on the test cells: logistic "
                "regression in 5-fold CV for PCA-50 and scVI (the issue's 'against scVI and PCA-50 with logistic "
                "regression'), and, with {n} labels per class, each side's logistic probe (scaled or unscaled "
                "features) chosen on the validation cells.")


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
    # validation cells: a stratified share of the labelled cells, drawn with validation_seed, on which
    # validation_draws few-label draws (seeds validation_seed, validation_seed + 1, ...) choose the recipe and probes
    validation_fraction: float = 0.3
    validation_seed: int = 100
    validation_draws: int = 10

    def check(self) -> None:
        for name in ("max_epochs", "max_cells", "scvi_max_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be >= 1 or null, got {value}")
        if self.n_splits < 2:
            raise ConfigError(f"n_splits: must be >= 2, got {self.n_splits}")
        for name in ("n_neighbors", "n_per_class", "scvi_latent"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not self.seeds:
            raise ConfigError("seeds: name at least one few-label draw")
        if not 0.0 < self.validation_fraction <= 0.5:
            raise ConfigError(f"validation_fraction: must be in (0, 0.5], got {self.validation_fraction}")
        if self.validation_draws < 1:
            raise ConfigError(f"validation_draws: must be >= 1, got {self.validation_draws}")


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


def _check_raw_counts(adata: Any, path: Path) -> None:
    """The task's recipes and baselines normalise and log-transform X: refuse an X that is not raw counts."""
    from scipy import sparse

    x = adata.X
    values = None if x is None else x.data if sparse.issparse(x) else np.asarray(x)
    if values is None or not np.array_equal(values, np.rint(values)):
        raise InputError(f"{path}: X holds non-integer values (log-normalised or corrected counts?), not raw "
                         "counts; this task's pretraining and baselines read raw integer counts in X and normalise "
                         "and log-transform them themselves. Put the raw counts in "
                         "X (e.g. adata.X = adata.layers['counts']) and write the file again")


def check_task(task: Any) -> None:
    """The .h5ad opens and has the label column (when the suite loads)."""
    check_h5ad(task.path, {"label_key": task.params.label_key})


def run(task: Any, ctx: Context) -> TaskResult:
    """Pretrain and embed; choose the recipe and probes on the validation cells; score all on the test cells."""
    import sslcell
    from sslcell.data.expression import read_h5ad
    from sslcell.evaluate import label_fraction_split, pca_baseline

    p: ExpressionCelltypeParams = task.params
    adata = read_h5ad(task.path)
    if p.label_key not in adata.obs:
        raise ConfigError(f"params.label_key: {p.label_key!r} is not a column of {task.path.name} "
                          f"(columns: {list(adata.obs.columns)})")
    _check_raw_counts(adata, task.path)
    n_all = adata.n_obs
    # a subsample keeps enough cells per class for the CV folds on the test cells, after the validation cells
    rows = stratified_subsample(adata.obs[p.label_key].astype(str).to_numpy(), p.max_cells, ctx.seed,
                                min_per_class=math.ceil(p.n_splits / (1 - p.validation_fraction)) + 1)
    adata = adata[rows].copy() if len(rows) < n_all else adata
    labelled = np.flatnonzero(adata.obs[p.label_key].notna().to_numpy())
    labels = adata.obs[p.label_key].to_numpy()
    is_val = np.zeros(adata.n_obs, dtype=bool)
    is_val[labelled[label_fraction_split(labels[labelled].astype(str), p.validation_fraction, p.validation_seed,
                                         keep_one=True)]] = True

    runs: list[dict[str, Any]] = []  # one row per entry: how it was made
    names: dict[str, str] = {}  # obsm key -> entry name
    models: dict[str, Any] = {}
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
        models[recipe.name] = model
        runs.append({"entry": recipe.name, "kind": "sslcell recipe", "source": recipe.source, "epochs": epochs,
                     "seconds": seconds, "status": f"{recipe.config.method.name}, pretrained without labels"})
    if task.recipes and not models:  # the baselines alone compare nothing with sslcell: a failure, not a table
        raise InputError("no recipe could be pretrained: " + "; ".join(f"{r['entry']}: {r['status']}" for r in runs))
    validation = _validation_scores(adata, is_val, names, p)
    primary = max(models, key=lambda name: _best(validation, name)[1], default=None)

    if "random_encoder" in task.baselines:
        if primary is None:
            runs.append({"entry": "random_encoder", "kind": "baseline", "status": "not run: no recipe trained"})
        else:
            untrained = random_encoder(models[primary], ctx.seed)
            sslcell.tl.embed(adata, untrained, key_added="X_random_encoder", device=embed_device(ctx),
                             overwrite=True)
            names["X_random_encoder"] = "random_encoder"
            runs.append({"entry": "random_encoder", "kind": "baseline", "epochs": 0,
                         "status": f"{primary}'s architecture and inputs, random weights (torch seed {ctx.seed})"})
    if "scvi" in task.baselines:
        runs.append(_scvi(adata, p, ctx, names))
    if "pca_hvg" in task.baselines:
        adata.obsm["X_pca_hvg"] = pca_baseline(adata, seed=ctx.seed)
        names["X_pca_hvg"] = "pca_hvg"
        runs.append({"entry": "pca_hvg", "kind": "baseline", "status": "PCA-50 of the log-normalised, scaled 2,000 "
                     "highly variable genes of all cells (no labels)"})
    validation |= _validation_scores(adata, is_val, {k: v for k, v in names.items() if v not in models}, p)

    test = adata[~is_val].copy()
    start = time.perf_counter()
    report = sslcell.tl.evaluate(test, p.label_key, use_rep=list(names), baselines=(),
                                 n_neighbors=p.n_neighbors, n_splits=p.n_splits, n_per_class=p.n_per_class,
                                 seeds=p.seeds, seed=ctx.seed)
    evaluate_s = time.perf_counter() - start
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
    probes = {name: _best(validation, name)[0] for name in names.values()}  # each entry's, chosen on validation
    targets = _targets(scores, primary, probes)
    val_seeds = _validation_seeds(p)
    val_columns = ["entry", "protocol", "macro-F1", "macro-F1 std", "accuracy", "accuracy std", "chosen"]
    val_rows = [{"entry": name, "protocol": PROTOCOLS[proto].format(n=p.n_per_class), **row,
                 "chosen": ("probe, recipe" if name == primary else "probe") if proto == probes[name] else ""}
                for (name, proto), row in validation.items()]
    return TaskResult(
        tables=[
            Table("How each entry was made", ["entry", "kind", "epochs", "seconds", "status"], runs,
                  note="Seconds: pretraining (or fitting) on this run's hardware, embedding excluded."),
            Table(f"Validation cells: {int(is_val.sum())} cells, {p.n_per_class} labels per class", val_columns,
                  val_rows,
                  note=f"The validation cells: {p.validation_fraction:.0%} of the labelled cells of each class "
                       f"(label_fraction_split, seed {p.validation_seed}). Mean and std over {p.validation_draws} "
                       f"few-label draws among them (seeds {val_seeds[0]}..{val_seeds[-1]}). 'chosen': each "
                       "entry's probe (the better macro-F1) and the recipe the targets compare (the best "
                       "macro-F1 of the sslcell recipes)."),
            Table(f"Cell types, obs['{p.label_key}'] (test cells): {report.n_cells} cells, {report.n_classes} "
                  "classes", columns, [{c: s[c] for c in columns} for s in scores],
                  note=f"The cells outside the validation cells. Mean and std over {p.n_splits} CV folds "
                       f"(StratifiedKFold, shuffled, seed {ctx.seed}) or over the few-label draws (seeds "
                       f"{list(p.seeds)}). Classes dropped for having fewer than {p.n_splits} cells: {dropped}."),
        ],
        targets=targets,
        plots=[plot],
        notes=[
            f"Data: `{task.path.name}`, {adata.n_obs:,} of {n_all:,} cells"
            + (f" (stratified subsample, seed {ctx.seed})" if adata.n_obs < n_all else "")
            + f" x {adata.n_vars:,} genes, raw counts. Every recipe is pretrained on these cells without labels "
              "(epochs " + (f"overridden to {p.max_epochs}" if p.max_epochs else "as in each recipe") + ", seed "
            f"{ctx.seed}); labels are used only by the probes: on the validation cells to choose, on the test "
            f"cells to score, where every embedding and baseline is scored in one `sslcell.tl.evaluate` call "
            f"({evaluate_s:.0f} s): the same cells, folds and few-label draws.",
        ] + ([TARGETS_NOTE.format(n=p.n_per_class)] if targets else []),
        raw={"report": report.to_dict(), "runs": runs, "n_cells_total": n_all, "chosen_recipe": primary,
             "validation_cells": np.flatnonzero(is_val).tolist(),
             "validation": [{"entry": name, "protocol": proto, **row} for (name, proto), row in validation.items()]},
    )


def _validation_seeds(p: ExpressionCelltypeParams) -> list[int]:
    return [p.validation_seed + i for i in range(p.validation_draws)]


def _validation_scores(adata: Any, is_val: np.ndarray, names: dict[str, str],
                       p: ExpressionCelltypeParams) -> dict[tuple[str, str], dict[str, float]]:
    """Few-label logistic scores, scaled and unscaled features, of every ``obsm`` key in ``names`` on the validation
    cells -> ``{(entry, protocol): {"macro-F1", "macro-F1 std", "accuracy", "accuracy std"}}``."""
    from sslcell.evaluate import few_label_scores

    labels = adata.obs[p.label_key].to_numpy()[is_val].astype(str)
    out = {}
    for key, name in names.items():
        for proto, standardize in ((FEW, True), (FEW_RAW, False)):
            r = few_label_scores(adata.obsm[key][is_val], labels, p.n_per_class, tuple(_validation_seeds(p)),
                                 standardize=standardize)
            out[name, proto] = {"macro-F1": r["macro_f1"], "macro-F1 std": r["macro_f1_std"],
                                "accuracy": r["accuracy"], "accuracy std": r["accuracy_std"]}
    return out


def _best(validation: dict[tuple[str, str], dict[str, float]], name: str) -> tuple[str, float]:
    """(protocol, macro-F1) of ``name``'s better few-label probe on the validation cells (scaled on a tie)."""
    return max(((proto, validation[name, proto]["macro-F1"]) for proto in (FEW, FEW_RAW)), key=lambda t: t[1])


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


def _targets(scores: list[dict[str, Any]], primary: str | None, probes: dict[str, str]) -> list[Target]:
    """Ratios of the chosen recipe's test scores to each baseline's, from the same evaluate call; with few labels,
    each side's probe is the one ``probes`` names (chosen on the validation cells)."""
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
    for baseline in ("pca_hvg", "scvi"):
        if baseline not in entries:
            continue
        for metric in ("macro-F1", "accuracy"):
            value = by[primary, probes[primary]][metric] / by[baseline, probes[baseline]][metric]
            out.append(Target(f"{primary} / {baseline}, few-label logistic {metric} (probes chosen on validation)",
                              value, 1.0, unit="x"))
    return out


register(TaskKind(
    name="expression_celltype",
    params=ExpressionCelltypeParams,
    run=run,
    summary="cell types from expression embeddings (recipes pretrained without labels) vs PCA-50, scVI and a "
            "random encoder: recipe and probes chosen on validation cells, one tl.evaluate call on the others "
            "(kNN / logistic CV, few labels)",
    baselines=("pca_hvg", "scvi", "random_encoder"),
    needs_data=True,
    check_task=check_task,
    takes_recipes=True,
    modality="expression",
    quick={"max_cells": 400, "max_epochs": 1, "seeds": [0], "scvi_max_epochs": 1, "validation_draws": 2},
))
