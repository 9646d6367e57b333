"""Kind ``transfer_quality``: zero-shot label transfer and few-label fine-tuning from sslcell encoders against PCA
baselines and a random encoder, on a reference / query split of labelled expression (``.h5ad``) or crops.

The labelled cells are split into a reference and a query half: stratified halves
(``train_test_split(stratify=label, random_state=seed)``), or with ``group_key`` by group
(``StratifiedGroupKFold(2, shuffle=True, random_state=seed)``: no smear on both sides). Each recipe is pretrained on
the reference half only, without labels, and embeds both halves. Baselines, fitted on the reference half and
projected onto the query: ``pca_hvg`` (PCA-50 of log-normalised, scaled highly variable genes; expression),
``pixel_pca`` (PCA-50 of z-scored raw pixels; crops), ``random_encoder`` (the first recipe's architecture and
inputs, random weights). Everything is scored on the query half (macro-F1 over the query's classes):

* **zero-shot**: every reference label; kNN transfer (:func:`sslcell.tl.transfer_labels`, ``n_neighbors``,
  distance-weighted, votes as they are and balanced) and the logistic probe (scaled and unscaled) on every
  representation. kNN rows also give the 5-fold CV macro-F1 within the reference half, which chooses the vote
  weighting without looking at the query;
* **few-label**: ``n_per_class`` labelled reference cells per class (``few_label_split``, one draw per seed): the
  logistic probe (scaled, unscaled) and kNN transfer with ``n_per_class`` neighbours on every representation, and
  :func:`sslcell.classify.finetune` heads on every recipe (settings in :data:`HEADS`, fixed before any run, never
  chosen on the query). Mean and std over the draws.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from sslcell.benchmark.registry import Context, Table, Target, TaskKind, TaskResult, register
from sslcell.benchmark.tasks._preflight import check_crops, check_h5ad
from sslcell.benchmark.tasks.expression_celltype import (
    embed_device,
    plot_scores,
    pretrain_recipe,
    random_encoder,
    stratified_subsample,
)
from sslcell.errors import ConfigError

# few-label heads: FinetuneConfig defaults except the epochs, which a 5-cells-per-class training set needs more of
# (80 cells make one batch, so 30 epochs would be 30 optimiser steps); fixed before the first run
HEADS: dict[str, dict[str, Any]] = {
    "linear probe": {"head": "linear"},
    "MLP head": {"head": "mlp", "epochs": 200},
    "full fine-tuning": {"head": "full", "epochs": 100},
    "full fine-tuning + SupCon": {"head": "full", "epochs": 100, "supcon_weight": 0.5},
}
PCA_BASELINES = {"pca_hvg": "expression", "pixel_pca": "image"}


@dataclass
class TransferQualityParams:
    modality: Literal["auto", "expression", "image"] = "auto"  # auto: .h5ad -> expression, anything else -> crops
    label_key: str = "label"
    group_key: str | None = None  # obs column whose groups stay on one side (Chula: image_id, the smear)
    max_cells: int | None = None  # stratified subsample of about this many labelled cells (None: all)
    max_epochs: int | None = None  # override the recipes' pretraining epochs
    n_neighbors: int = 15  # zero-shot kNN transfer
    n_per_class: int = 5  # few-label: labelled reference cells per class
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])  # few-label draws
    heads: list[str] = field(default_factory=lambda: list(HEADS))  # few-label fine-tuning heads (names in HEADS)
    finetune_epochs: int | None = None  # cap every head's epochs (None: as in HEADS)
    n_comps: int = 50  # PCA baselines

    def check(self) -> None:
        for i, head in enumerate(self.heads):
            if head not in HEADS:
                raise ConfigError(f"heads[{i}]: unknown head {head!r}; known: {list(HEADS)}")
        for name in ("max_cells", "max_epochs", "finetune_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be >= 1 or null, got {value}")
        if self.n_neighbors < 1 or self.n_per_class < 1 or self.n_comps < 1:
            raise ConfigError("n_neighbors: n_neighbors, n_per_class and n_comps must be >= 1")
        if not self.seeds:
            raise ConfigError("seeds: name at least one few-label draw")


def scores(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Macro-F1 over the classes of ``truth`` ``(N,)`` (predicting an absent class only costs precision), accuracy."""
    from sklearn.metrics import accuracy_score, f1_score

    tested = np.unique(truth)
    return {"macro_f1": float(f1_score(truth, pred, labels=tested, average="macro", zero_division=0)),
            "accuracy": float(accuracy_score(truth, pred))}


def knn_transfer(x_ref: np.ndarray, y_ref: np.ndarray, x_query: np.ndarray, n_neighbors: int,
                 class_weight: str | None = None) -> np.ndarray:
    """Labels ``(M,)`` of ``x_query`` ``(M, D)`` from ``x_ref`` ``(N, D)`` by :func:`sslcell.tl.transfer_labels`."""
    import anndata as ad

    import sslcell

    reference = ad.AnnData(obs={"label": y_ref}, obsm={"X": x_ref})
    query = ad.AnnData(obs={"i": np.arange(len(x_query))}, obsm={"X": x_query})
    sslcell.tl.transfer_labels(query, reference, "label", use_rep="X", n_neighbors=n_neighbors,
                               class_weight=class_weight)
    return query.obs["label_pred"].astype(str).to_numpy()


def reference_cv(x_ref: np.ndarray, y_ref: np.ndarray, n_neighbors: int, class_weight: str | None,
                 seed: int) -> float:
    """5-fold stratified CV macro-F1 of kNN transfer within the reference: a setting chosen without the query."""
    from sklearn.model_selection import StratifiedKFold

    folds = StratifiedKFold(5, shuffle=True, random_state=seed).split(x_ref, y_ref)
    return float(np.mean([scores(y_ref[va], knn_transfer(x_ref[tr], y_ref[tr], x_ref[va], n_neighbors,
                                                         class_weight))["macro_f1"] for tr, va in folds]))


def logistic(x_ref: np.ndarray, y_ref: np.ndarray, x_query: np.ndarray, standardize: bool = True) -> np.ndarray:
    from sslcell.evaluate import logistic_probe

    return logistic_probe(standardize=standardize).fit(x_ref, y_ref).predict(x_query)


def split_halves(y: np.ndarray, groups: np.ndarray | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted reference and query positions of ``y`` ``(N,)``: stratified halves, or (``groups``) halves by group."""
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split

    idx = np.arange(len(y))
    if groups is None:
        ref, query = train_test_split(idx, test_size=0.5, stratify=y, random_state=seed)
    else:
        ref, query = next(StratifiedGroupKFold(2, shuffle=True, random_state=seed).split(idx, y, groups))
    return np.sort(ref), np.sort(query)


def check_task(task: Any) -> None:
    """The data opens as its modality and has the label and group columns (when the suite loads)."""
    p = task.params
    columns = {"label_key": p.label_key, "group_key": p.group_key}
    if _modality(task, p) == "expression":
        check_h5ad(task.path, columns)
    else:
        check_crops(task.path, columns)


def _modality(task: Any, p: Any) -> str:
    return p.modality if p.modality != "auto" else ("expression" if task.path.suffix == ".h5ad" else "image")


def run(task: Any, ctx: Context) -> TaskResult:
    """Split, pretrain on the reference, embed, fit baselines, score zero-shot and few-label on the query."""
    p: TransferQualityParams = task.params
    data, modality, n_all = _load(task, p, ctx.seed)
    y = data.obs[p.label_key].astype(str).to_numpy()
    groups = data.obs[p.group_key].to_numpy() if p.group_key else None
    ref, query = split_halves(y, groups, ctx.seed)
    for name in task.baselines:
        if PCA_BASELINES.get(name, modality) != modality:
            raise ConfigError(f"baselines: {name} needs {PCA_BASELINES[name]} data; this task's data holds "
                              f"{modality} (use {'pixel_pca' if name == 'pca_hvg' else 'pca_hvg'})")
    for recipe in task.recipes:
        if recipe.config.modality != modality:
            raise ConfigError(f"recipes: {recipe.name} is an {recipe.config.modality} recipe; the data is {modality}")

    reps: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # representation -> (reference, query) embeddings
    models: dict[str, Any] = {}
    made: list[str] = []
    reference = data[ref] if modality == "image" else data[ref].copy()
    for recipe in ctx.steps(task.recipes, desc="recipes"):
        model, seconds = pretrain_recipe(recipe, reference, ctx, p.max_epochs)
        emb = _embed(data, model, ctx)
        reps[recipe.name], models[recipe.name] = (emb[ref], emb[query]), model
        made.append(f"`{recipe.name}` ({recipe.config.method.name}, {p.max_epochs or recipe.config.train.max_epochs}"
                    f" epochs on the reference half without labels, {seconds:.0f} s)")
    for name in task.baselines:
        if name == "random_encoder":
            if not models:
                raise ConfigError("baselines: random_encoder copies the first recipe's architecture; give a recipe")
            first = next(iter(models))
            emb = _embed(data, random_encoder(models[first], ctx.seed), ctx)
            made.append(f"`random_encoder` ({first}'s architecture and inputs, random weights, torch seed {ctx.seed})")
        else:
            from sslcell.evaluate import pca_baseline, pixel_pca_baseline

            fit = pca_baseline if name == "pca_hvg" else pixel_pca_baseline
            emb = fit(data, n_comps=p.n_comps, seed=ctx.seed, fit_rows=ref)
            made.append(f"`{name}` (PCA-{p.n_comps} of " + ("log-normalised, scaled highly variable genes"
                        if name == "pca_hvg" else "z-scored raw pixels") + ", fitted on the reference half)")
        reps[name] = (emb[ref], emb[query])

    bases = {r.name: r.finetune or {} for r in task.recipes}  # a recipe's finetune settings, under each head's
    rows = _zero_shot(reps, y, ref, query, p, ctx.seed) + _few_label(reps, models, bases, data, y, ref, query, p, ctx)
    baselines = set(task.baselines)
    for row in rows:
        row["_baseline"] = row["representation"] in baselines
    tables, panels = [], {}
    for protocol in dict.fromkeys(r["protocol"] for r in rows):
        chosen = sorted((r for r in rows if r["protocol"] == protocol), key=lambda r: -r["macro-F1"])
        columns = ["representation", "method", "macro-F1", "macro-F1 std", "accuracy", "accuracy std", "draws"]
        columns += ["reference CV macro-F1"] if protocol == "zero-shot" else ["seconds/draw"]
        tables.append(Table(f"{task.name}, {protocol}", columns, [{c: r.get(c) for c in columns} for r in chosen]))
        panels[protocol] = [(f"{r['representation']} + {r['method']}", r["macro-F1"], r["macro-F1 std"],
                             r["_baseline"]) for r in chosen]
    plot = f"{ctx.prefix}_scores.png"
    plot_scores(ctx.out_dir / plot, panels, "macro-F1 on the query half")
    side = f"by `{p.group_key}` (StratifiedGroupKFold(2), no group on both sides)" if p.group_key \
        else "stratified halves"
    targets = _targets(rows, list(models), [b for b in task.baselines if b in PCA_BASELINES], p)
    notes = [
        f"Data: `{task.path.name}` ({modality}), {len(y):,} labelled cells of {n_all:,}"
        + (f" (stratified subsample, seed {ctx.seed})" if len(y) < n_all else "")
        + f", {len(np.unique(y))} classes; split {side}, seed {ctx.seed}: reference {len(ref):,}, "
          f"query {len(query):,}. Scores on the query half, macro-F1 over the query's classes; few-label: "
          f"{p.n_per_class} labelled reference cells per class, one draw per seed {list(p.seeds)}.",
        "Representations: " + "; ".join(made) + ".",
    ]
    if models and p.heads:
        notes.append("Few-label heads (`classify.finetune`; over a recipe's own `finetune` settings where the suite "
                     "gives them, FinetuneConfig defaults otherwise; fixed before the run"
                     + (f", epochs capped at {p.finetune_epochs}" if p.finetune_epochs else "") + "): "
                     + "; ".join(f"{h}: `{HEADS[h]}`" for h in p.heads) + ".")
    if targets:
        notes.append("Targets, per recipe, as ratios of query macro-F1 measured in this run: zero-shot, the recipe's "
                     "kNN transfer with the vote weighting that scored higher in 5-fold CV within the reference half "
                     "(the query is not used to choose), against the best zero-shot entry of the PCA baseline (chosen "
                     "on the query: in the baseline's favour); few-label, the recipe with the first head listed "
                     "against the best few-label PCA entry.")
    return TaskResult(
        tables=tables,
        targets=targets,
        plots=[plot],
        notes=notes,
        raw={"rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
             "reference": ref.size, "query": query.size, "modality": modality, "heads": {h: HEADS[h] for h in p.heads}},
    )


def _load(task: Any, p: TransferQualityParams, seed: int) -> tuple[Any, str, int]:
    """The labelled cells of ``task.path`` (a stratified subsample with ``max_cells``), the modality, all cells."""
    modality = _modality(task, p)
    if modality == "expression":
        from sslcell.data.expression import read_h5ad

        data = read_h5ad(task.path)
    else:
        from sslcell.data.images import CellImages

        data = CellImages.read(task.path)
    for key in (p.label_key, p.group_key):
        if key is not None and key not in data.obs:
            raise ConfigError(f"params: {key!r} is not a column of {task.path.name}'s obs "
                              f"(columns: {list(data.obs.columns)})")
    labelled = np.flatnonzero(data.obs[p.label_key].notna().to_numpy())
    keep = labelled[stratified_subsample(data.obs[p.label_key].astype(str).to_numpy()[labelled], p.max_cells, seed)]
    if len(keep) == len(data):
        return data, modality, len(data)
    return (data[keep] if modality == "image" else data[keep].copy()), modality, len(data)


def _embed(data: Any, model: Any, ctx: Context) -> np.ndarray:
    import sslcell

    if modality_of(data) == "image":
        return sslcell.tl.embed_crops(data, model, device=embed_device(ctx)).obsm["X_sslcell"]
    return sslcell.tl.embed(data, model, copy=True, device=embed_device(ctx)).obsm["X_sslcell"]


def modality_of(data: Any) -> str:
    from sslcell.data.images import CellImages

    return "image" if isinstance(data, CellImages) else "expression"


def _row(rep: str, method: str, protocol: str, values: list[dict[str, float]], **extra: Any) -> dict[str, Any]:
    f1s, accs = [v["macro_f1"] for v in values], [v["accuracy"] for v in values]
    return {"representation": rep, "method": method, "protocol": protocol, "macro-F1": float(np.mean(f1s)),
            "macro-F1 std": float(np.std(f1s)), "accuracy": float(np.mean(accs)),
            "accuracy std": float(np.std(accs)), "draws": len(values), **extra}


def _zero_shot(reps: dict, y: np.ndarray, ref: np.ndarray, query: np.ndarray, p: TransferQualityParams,
               seed: int) -> list[dict[str, Any]]:
    rows = []
    k = p.n_neighbors
    for rep, (x_ref, x_query) in reps.items():
        for class_weight, label in ((None, ""), ("balanced", ", balanced votes")):
            rows.append(_row(rep, f"kNN-{k} transfer{label}", "zero-shot",
                             [scores(y[query], knn_transfer(x_ref, y[ref], x_query, k, class_weight))],
                             **{"reference CV macro-F1": reference_cv(x_ref, y[ref], k, class_weight, seed),
                                "_votes": class_weight}))
        for standardize, label in ((True, ""), (False, " (unscaled)")):
            rows.append(_row(rep, f"logistic{label}", "zero-shot",
                             [scores(y[query], logistic(x_ref, y[ref], x_query, standardize))]))
    return rows


def _few_label(reps: dict, models: dict, bases: dict, data: Any, y: np.ndarray, ref: np.ndarray, query: np.ndarray,
               p: TransferQualityParams, ctx: Context) -> list[dict[str, Any]]:
    import sslcell
    from sslcell.classify import FinetuneConfig, finetune
    from sslcell.evaluate import few_label_split

    n, protocol = p.n_per_class, f"{p.n_per_class} labels/class"
    draws = [ref[few_label_split(y[ref], n, seed)] for seed in p.seeds]  # positions in data
    where = np.full(len(y), -1)
    where[ref] = np.arange(len(ref))  # data position -> row of the reference embeddings
    rows = []
    for rep, (x_ref, x_query) in reps.items():
        for standardize, label in ((True, ""), (False, " (unscaled)")):
            rows.append(_row(rep, f"logistic{label}", protocol, [
                scores(y[query], logistic(x_ref[where[t]], y[t], x_query, standardize)) for t in draws]))
        for class_weight, label in ((None, ""), ("balanced", ", balanced votes")):
            rows.append(_row(rep, f"kNN-{n} transfer{label}", protocol, [
                scores(y[query], knn_transfer(x_ref[where[t]], y[t], x_query, n, class_weight)) for t in draws]))
    device = embed_device(ctx)
    queried = data[query] if modality_of(data) == "image" else data[query].copy()
    for name, model in models.items():
        for head in ctx.steps(p.heads, desc=f"{name} heads"):
            results, start = [], time.perf_counter()
            for seed, train in zip(p.seeds, draws, strict=True):
                config = FinetuneConfig.from_dict({**bases[name], **HEADS[head], "seed": seed, "progress_bar": False,
                                                   "accelerator": ctx.device})
                if p.finetune_epochs:
                    config.epochs = min(config.epochs, p.finetune_epochs)
                train_cells = data[train] if modality_of(data) == "image" else data[train].copy()
                classifier = finetune(train_cells, model, p.label_key, config, device=device)
                if modality_of(data) == "image":
                    scored = sslcell.tl.predict(queried.to_anndata(), classifier, crops=queried, device=device,
                                                copy=True)
                else:
                    scored = sslcell.tl.predict(queried, classifier, device=device, copy=True)
                results.append(scores(y[query], scored.obs["sslcell_pred"].astype(str).to_numpy()))
            rows.append(_row(name, head, protocol, results,
                             **{"seconds/draw": (time.perf_counter() - start) / len(draws)}))
    return rows


def _targets(rows: list[dict[str, Any]], recipes: list[str], pca: list[str], p: TransferQualityParams) -> list[Target]:
    """Per recipe: its CV-chosen zero-shot kNN and its first few-label head over the best PCA entry (query)."""
    out = []
    for baseline in pca:
        best = {proto: max(r["macro-F1"] for r in rows if r["representation"] == baseline and r["protocol"] == proto)
                for proto in {r["protocol"] for r in rows}}
        for name in recipes:
            knn = [r for r in rows if r["representation"] == name and r["protocol"] == "zero-shot" and "_votes" in r]
            chosen = max(knn, key=lambda r: r["reference CV macro-F1"])  # ties: votes as they are (listed first)
            out.append(Target(f"{name} zero-shot {chosen['method']} (chosen by reference CV) / best {baseline} "
                              "zero-shot, macro-F1", chosen["macro-F1"] / best["zero-shot"], 1.0, unit="x"))
            if p.heads:
                few = next(r for r in rows if r["representation"] == name and r["method"] == p.heads[0])
                out.append(Target(f"{name} + {p.heads[0]}, {few['protocol']} / best {baseline} entry, macro-F1",
                                  few["macro-F1"] / best[few["protocol"]], 1.0, unit="x"))
    return out


register(TaskKind(
    name="transfer_quality",
    params=TransferQualityParams,
    run=run,
    summary="zero-shot kNN / logistic transfer and few-label fine-tuning from encoders pretrained on a reference "
            "half, scored on the query half, vs PCA-50 (genes or raw pixels) and a random encoder",
    baselines=("pca_hvg", "pixel_pca", "random_encoder"),
    needs_data=True,
    check_task=check_task,
    takes_recipes=True,
    quick={"max_cells": 500, "max_epochs": 1, "seeds": [0], "finetune_epochs": 2},
))
