"""Protocols that score an embedding ``(N, D)`` against labels ``(N,)``: k-fold cross-validation, the few-label
protocol (``n_per_class`` labelled cells per class) and a labelled fraction.

Probes come from :mod:`sslcell.evaluate.probes`. Scores are macro-F1 (averaged over the classes that have test
cells, with equal weight) and accuracy; means and standard deviations (``ddof=0``) over splits.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold, cross_validate

from sslcell.errors import ConfigError, InputError
from sslcell.evaluate.probes import Probe, make_probe
from sslcell.transfer.knn import _as_float32


def _n_neighbors(n_neighbors: int, k: int | None) -> int:
    """The deprecated ``k`` keyword, renamed ``n_neighbors`` (scikit-learn's and scanpy's name)."""
    if k is None:
        return n_neighbors
    warnings.warn("k is deprecated; use n_neighbors", DeprecationWarning, stacklevel=3)
    return k


def _encode(X, y) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> float32 ``(N, D)``, integer codes ``(N,)``, cells per class ``(C,)``."""
    x = _as_float32(X, "X")
    y = np.asarray(y)
    if y.shape != (x.shape[0],):
        raise InputError(f"labels must have shape ({x.shape[0]},) to match the embedding; got {y.shape}")
    names, codes = np.unique(y, return_inverse=True)
    if len(names) < 2:
        raise InputError(f"need at least 2 classes to score a probe; got {len(names)}: {list(names)}")
    return x, codes, np.bincount(codes)


def _summary(probe: str, protocol: str, f1s, accs, n_cells: int, n_classes: int, **extra) -> dict:
    f1s, accs = np.asarray(f1s, dtype=float), np.asarray(accs, dtype=float)
    return {
        "probe": probe,
        "protocol": protocol,
        "macro_f1": float(f1s.mean()),
        "macro_f1_std": float(f1s.std()),
        "accuracy": float(accs.mean()),
        "accuracy_std": float(accs.std()),
        "n_cells": int(n_cells),
        "n_classes": int(n_classes),
        "macro_f1_per_split": f1s.tolist(),
        "accuracy_per_split": accs.tolist(),
        **extra,
    }


def cross_validated_scores(
    X,
    y,
    probe: Probe = "knn",
    n_splits: int = 5,
    seed: int = 0,
    n_neighbors: int = 15,
    *,
    standardize: bool = True,
    k: int | None = None,
) -> dict:
    """Stratified ``n_splits``-fold cross-validation (shuffled with ``seed``) of a probe on ``X (N, D)``, ``y (N,)``.

    Every class needs at least ``n_splits`` cells, so that each test fold holds every class;
    otherwise an ``InputError`` names the rare classes (drop them, or lower ``n_splits``).
    Returns a dict with ``macro_f1``, ``macro_f1_std``, ``accuracy``, ``accuracy_std``, the per-fold
    values, ``n_cells`` and ``n_classes``.
    """
    if int(n_splits) < 2:
        raise ConfigError(f"n_splits must be >= 2; got {n_splits}")
    model = make_probe(probe, _n_neighbors(n_neighbors, k), standardize)
    x, codes, counts = _encode(X, y)
    if (counts < n_splits).any():
        names = np.unique(np.asarray(y))
        rare = {str(names[c]): int(counts[c]) for c in np.flatnonzero(counts < n_splits)}
        raise InputError(
            f"classes with fewer cells than n_splits={n_splits} cannot be in every fold: {rare}; "
            "drop them or lower n_splits"
        )
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    res = cross_validate(
        model, x, codes, cv=folds, scoring={"f1": "f1_macro", "acc": "accuracy"}, error_score="raise"
    )
    return _summary(probe, f"cv{n_splits}", res["test_f1"], res["test_acc"], len(codes), len(counts), seed=seed)


def few_label_split(y, n_per_class: int = 5, seed: int = 0) -> np.ndarray:
    """Boolean training mask ``(N,)``: a random draw (``default_rng(seed)``) of labelled cells per class.

    The rule, per class of ``c`` cells: ``c > n_per_class`` -> ``n_per_class`` cells train, the rest
    test; ``2 <= c <= n_per_class`` -> ``c - 1`` train, 1 test; ``c == 1`` -> the cell trains and the
    class has no test cell (it is not scored, but the probe can still predict it, wrongly).
    """
    if int(n_per_class) < 1:
        raise ConfigError(f"n_per_class must be >= 1; got {n_per_class}")
    _, codes = np.unique(np.asarray(y), return_inverse=True)
    counts = np.bincount(codes)
    quota = np.where(counts > n_per_class, n_per_class, np.maximum(counts - 1, 1))
    # sort by class, random order within a class; a cell trains if its rank in its class < quota
    order = np.lexsort((np.random.default_rng(seed).random(codes.size), codes))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(codes.size) - starts[codes[order]]
    train = np.zeros(codes.size, dtype=bool)
    train[order] = rank < quota[codes[order]]
    return train


def few_label_scores(
    X,
    y,
    n_per_class: int = 5,
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4),
    probe: Probe = "logistic",
    n_neighbors: int = 15,
    *,
    standardize: bool = True,
    k: int | None = None,
) -> dict:
    """Few-label protocol: for each seed, train on :func:`few_label_split` and test on all other cells.

    ``X (N, D)``, ``y (N,)``. Macro-F1 averages over the classes with test cells. The kNN probe uses
    ``min(n_neighbors, n_per_class)`` neighbours: with more, the other classes outvote a class's few labelled cells.
    Standardising gives every feature unit weight, noise included: on PCA coordinates (whose variances
    carry the signal) ``standardize=False`` can score much higher. Returns means and standard
    deviations over seeds and the per-seed values (as :func:`cross_validated_scores`), plus
    ``n_untested_classes``.
    """
    if len(seeds) == 0:
        raise ConfigError("seeds must name at least one seed")
    make_probe(probe)  # check the name before any work
    n_neighbors = _n_neighbors(n_neighbors, k)
    x, codes, counts = _encode(X, y)
    if (counts < 2).all():
        raise InputError("every class has a single cell: no cell is left to test the few-label probe on")
    f1s, accs = [], []
    for seed in seeds:
        train = few_label_split(codes, n_per_class, seed)
        model = make_probe(probe, min(n_neighbors, n_per_class), standardize).fit(x[train], codes[train])
        pred = model.predict(x[~train])
        tested = np.unique(codes[~train])
        f1s.append(f1_score(codes[~train], pred, labels=tested, average="macro", zero_division=0))
        accs.append(accuracy_score(codes[~train], pred))
    return _summary(
        probe,
        f"few_label{n_per_class}",
        f1s,
        accs,
        len(codes),
        len(counts),
        seeds=[int(s) for s in seeds],
        n_untested_classes=int((counts == 1).sum()),
    )


def label_fraction_split(y, fraction: float, seed: int = 0, *, keep_one: bool = False) -> np.ndarray:
    """Sorted positions of a stratified ``fraction`` of ``y`` ``(N,)``: per class, ``max(1, round(fraction * c))`` of
    its ``c`` cells (with ``keep_one``, at most ``c - 1``: every class keeps a cell outside the selection), drawn
    with ``default_rng(seed)`` class by class in sorted class order."""
    if not 0.0 < float(fraction) <= 1.0:
        raise ConfigError(f"fraction must be in (0, 1]; got {fraction}")
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        n = max(1, int(round(fraction * len(members))))
        keep.append(rng.choice(members, min(n, len(members) - 1) if keep_one else n, replace=False))
    return np.sort(np.concatenate(keep))
