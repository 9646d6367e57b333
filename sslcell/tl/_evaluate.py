"""Score embeddings in ``adata.obsm`` (and baselines computed on the spot) against cell labels."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from sslcell.data.images import CellImages
from sslcell.data.labels import label_strings
from sslcell.errors import ConfigError, InputError, SSLCellWarning
from sslcell.evaluate.baselines import pca_baseline, pixel_pca_baseline
from sslcell.evaluate.protocols import cross_validated_scores, few_label_scores
from sslcell.evaluate.report import ROW_FIELDS, EvaluationReport
from sslcell.provenance import versions
from sslcell.tl._keys import check_crops, is_crops, recorded

BASELINES = ("pca", "pixel_pca")


def evaluate(
    adata: ad.AnnData,
    label_key: str,
    use_rep: str | Sequence[str] = "X_sslcell",
    *,
    crops: CellImages | None = None,
    baselines: Sequence[str] | None = None,
    layer: str | None = None,
    n_neighbors: int = 15,
    n_splits: int = 5,
    n_per_class: int = 5,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    seed: int = 0,
    k: int | None = None,
) -> EvaluationReport:
    """Score each ``adata.obsm[use_rep]`` embedding ``(N, D)`` and each baseline against ``obs[label_key]``.

    A scoring function (like scanpy's ``sc.metrics``): ``adata`` is not modified and the report is returned.
    Protocols: see :mod:`sslcell.evaluate.report`.

    Args:
        label_key: the ``obs`` column with labels (categorical, strings or integers; missing ones are dropped).
        use_rep: one or several ``obsm`` keys.
        crops: the crops of ``adata``'s rows (an AnnData from crops), for the ``"pixel_pca"`` baseline.
        baselines: ``"pca"``: :func:`~sslcell.evaluate.baselines.pca_baseline` of the raw counts in ``adata.X``
            (or ``layer``); ``"pixel_pca"``: :func:`~sslcell.evaluate.baselines.pixel_pca_baseline` of ``crops``.
            Default: ``("pca",)`` for expression, ``("pixel_pca",)`` when ``crops`` are given; an AnnData made from
            crops without ``crops`` is refused unless ``baselines=()``.
        n_neighbors: neighbours of the kNN probe. ``seed`` shuffles the CV folds; ``seeds`` draw the few-label sets.
    """
    if k is not None:
        warnings.warn("k is deprecated; use n_neighbors", DeprecationWarning, stacklevel=2)
        n_neighbors = k
    reps = [use_rep] if isinstance(use_rep, str) else list(dict.fromkeys(use_rep))
    baselines = _baselines(adata, crops, baselines, layer)
    named = [key for key in reps if key in baselines]
    if named:
        raise InputError(f"use_rep {named[0]!r} has the name of a baseline, whose rows it would share in the report: "
                         f"pass baselines=() or rename the obsm key")
    if not reps and not baselines:
        raise ConfigError("nothing to evaluate: use_rep and baselines are both empty")
    absent = [key for key in reps if key not in adata.obsm]
    if absent:
        raise InputError(f"adata.obsm has no key {absent[0]!r} (available: {list(adata.obsm.keys())})")
    if int(n_splits) < 2:
        raise ConfigError(f"n_splits must be >= 2; got {n_splits}")
    keep, y, n_missing, dropped, names = _labels(adata, label_key, n_splits)
    _warn_small_classes(y, int(n_per_class), names)

    embeddings = {key: _embedding(adata, key, keep) for key in reps}
    for name in baselines:
        try:
            if name == "pca":
                embeddings[name] = np.asarray(pca_baseline(adata, seed=seed, layer=layer))[keep]
            else:
                embeddings[name] = pixel_pca_baseline(_embedded_channels(adata, reps, crops), seed=seed)[keep]
        except InputError as err:
            raise InputError(f"the {name!r} baseline: {err}; pass baselines=() to score without it") from None

    rows = []
    for rep, x in embeddings.items():
        results = {
            "knn_cv": cross_validated_scores(x, y, "knn", n_splits=n_splits, seed=seed, n_neighbors=n_neighbors),
            "logistic_cv": cross_validated_scores(x, y, "logistic", n_splits=n_splits, seed=seed),
            "logistic_few_label": few_label_scores(x, y, n_per_class=n_per_class, seeds=tuple(seeds), probe="logistic"),
            "logistic_few_label_raw": few_label_scores(
                x, y, n_per_class=n_per_class, seeds=tuple(seeds), probe="logistic", standardize=False
            ),
        }
        for protocol, res in results.items():
            rows.append({"representation": rep, "dims": int(x.shape[1]), "protocol": protocol}
                        | {f: res[f] for f in ROW_FIELDS[3:]})  # fmt: skip
    return EvaluationReport(
        rows=rows,
        label_key=label_key,
        n_neighbors=int(n_neighbors),
        n_splits=int(n_splits),
        n_per_class=int(n_per_class),
        seeds=[int(s) for s in seeds],
        seed=int(seed),
        n_cells=int(keep.sum()),
        n_classes=int(np.unique(y).size),
        n_missing_labels=n_missing,
        dropped_classes=dropped,
        layer=layer,
        versions=versions(("sslcell", "numpy", "scikit-learn", "scanpy", "anndata", "faiss-cpu")),
    )


def _baselines(adata: ad.AnnData, crops: CellImages | None, baselines: Sequence[str] | None,
               layer: str | None) -> list[str]:
    """The baselines to compute, checked against what ``adata`` and ``crops`` hold."""
    chosen = _chosen_baselines(adata, crops, baselines, layer)
    if layer is not None and "pca" not in chosen:
        raise InputError(f"layer {layer!r}: only the 'pca' baseline reads counts, and it is not computed here; "
                         "remove the argument")
    return chosen


def _chosen_baselines(adata: ad.AnnData, crops: CellImages | None, baselines: Sequence[str] | None,
                      layer: str | None) -> list[str]:
    if crops is not None:
        check_crops(adata, crops)
    if baselines is None:
        if crops is not None:
            return ["pixel_pca"]
        if is_crops(adata):
            raise InputError(
                "adata was made from crops and holds no counts for the 'pca' baseline: pass crops=cells for the "
                "raw-pixel PCA baseline, or baselines=() to score the embeddings alone"
            )
        return ["pca"]
    baselines = list(baselines)
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ConfigError(f"unknown baselines {unknown}; available: {list(BASELINES)}")
    if "pca" in baselines and (is_crops(adata) or (layer is None and adata.n_vars == 0)):
        raise InputError("the 'pca' baseline needs expression counts; adata holds none (crops: use 'pixel_pca')")
    if "pixel_pca" in baselines and crops is None:
        raise InputError("the 'pixel_pca' baseline needs the crops: pass crops=cells")
    return baselines
def _embedded_channels(adata: ad.AnnData, reps: list[str], crops: CellImages) -> CellImages:
    """``crops`` on the channels the embeddings ``reps`` were made from (their records), so that the pixel
    baseline reads what the models read (never a channel they were kept from, e.g. the stain labels came from)."""
    used = {tuple(str(c) for c in _read_channels(recorded(adata, key))) for key in reps} - {()}
    if not used:
        return crops  # embeddings made elsewhere: the crops as given
    if len(used) > 1:
        raise InputError(f"the embeddings {reps} were made from different channels {sorted(used)}; the 'pixel_pca' "
                         "baseline reads one set: score them in separate calls")
    channels = list(used.pop())
    if crops.channel_names == channels:
        return crops
    missing = [c for c in channels if c not in crops.channel_names]
    if missing:
        raise InputError(f"the embeddings were made from channels {channels}; the crops from {crops.source} have "
                         f"no channel {missing[0]!r} (they have {crops.channel_names}) for the 'pixel_pca' baseline")
    return crops.select_channels(channels)


def _read_channels(made: dict) -> list:
    """The crops' channels an embedding read, by the crops' names (older records: the model's names)."""
    names = made.get("crop_channels")
    return list(names) if names is not None else list(made.get("channel_names", ()))


def _labels(adata: ad.AnnData, label_key: str, n_splits: int) -> tuple[np.ndarray, np.ndarray, int, dict, list]:
    """-> kept-cell mask ``(n_obs,)``, integer labels of kept cells, cells without label, dropped classes, class
    names (of the integer labels)."""
    if label_key not in adata.obs.columns:
        raise InputError(f"label_key {label_key!r} is not a column of adata.obs (available: {list(adata.obs.columns)})")
    labels = label_strings(adata.obs[label_key], f"obs[{label_key!r}]")  # integer codes stored as floats: "1"
    missing = pd.isna(labels)
    codes, names = pd.factorize(labels[~missing])
    counts = np.bincount(codes, minlength=len(names))
    rare = counts < n_splits
    dropped = {str(names[c]): int(counts[c]) for c in np.flatnonzero(rare)}
    if dropped:
        warnings.warn(
            f"dropping classes of obs['{label_key}'] with fewer than n_splits={n_splits} cells: {dropped}",
            SSLCellWarning,
            stacklevel=3,
        )
    if (~rare).sum() < 2:
        raise InputError(
            f"obs['{label_key}'] has {int((~rare).sum())} classes with at least n_splits={n_splits} labelled cells; "
            "need at least 2"
        )
    keep = ~missing
    keep[keep] = ~rare[codes]
    return keep, codes[~rare[codes]], int(missing.sum()), dropped, [str(n) for n in names]


def _embedding(adata: ad.AnnData, key: str, keep: np.ndarray) -> np.ndarray:
    """``adata.obsm[key]`` rows of the kept cells as a dense ``(n_kept, D)`` float32 array, checked finite."""
    emb = adata.obsm[key]
    emb = emb.toarray() if sparse.issparse(emb) else np.asarray(emb)
    emb = np.asarray(emb[keep], dtype=np.float32).reshape(int(keep.sum()), -1)
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        cells = adata.obs_names[keep][bad]
        raise InputError(f"adata.obsm['{key}'] has NaN or inf in {bad.sum()} cells (first: {cells[0]!r})")
    return emb


def _warn_small_classes(y: np.ndarray, n_per_class: int, class_names: list[str]) -> None:
    """The few-label protocol trains a class of ``c <= n_per_class`` cells on ``c - 1`` of them and tests one
    (:func:`~sslcell.evaluate.protocols.few_label_split`): say so where that happens, since the report's label
    "n labels/class" then overstates its labels and those classes rest on one test cell each."""
    classes, counts = np.unique(y, return_counts=True)
    small = classes[counts <= n_per_class]
    if small.size:
        names = ", ".join(class_names[c] for c in small[:5]) + (", ..." if small.size > 5 else "")
        warnings.warn(f"n_per_class={n_per_class}: {small.size} of {classes.size} classes have {n_per_class} cells or "
                      f"fewer ({names}); the few-label protocol trains each of them on all its cells but one and tests "
                      "that one", SSLCellWarning, stacklevel=3)
