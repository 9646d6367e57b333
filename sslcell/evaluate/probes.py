"""The probes that score an embedding ``(N, D)``: one logistic probe and one kNN probe, with one set of defaults.

Every consumer uses these: ``tl.evaluate``'s protocols, ``classify``'s linear head and the benchmarks' baselines.

* :func:`logistic_probe`: features z-scored with the training cells' statistics (``StandardScaler``), then a
  multinomial logistic regression (lbfgs, L2 with inverse strength ``C=1``, ``max_iter=2000``), optionally with
  class weights (:func:`class_weight`).
* ``make_probe("knn")``: exact faiss kNN, uniform votes, euclidean.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from sslcell.errors import ConfigError
from sslcell.transfer.knn import FaissKNNClassifier

Probe = Literal["knn", "logistic"]
LOGISTIC_C = 1.0
LOGISTIC_MAX_ITER = 2000


def logistic_probe(
    *,
    C: float = LOGISTIC_C,
    max_iter: int = LOGISTIC_MAX_ITER,
    class_weight: dict | str | None = None,
    standardize: bool = True,
) -> Pipeline | LogisticRegression:
    """An unfitted logistic probe: ``StandardScaler`` (unless ``standardize=False``) + ``LogisticRegression``."""
    if C <= 0 or max_iter < 1:
        raise ConfigError(f"logistic probe: C must be > 0 and max_iter >= 1; got C={C}, max_iter={max_iter}")
    logistic = LogisticRegression(C=C, max_iter=max_iter, class_weight=class_weight)
    return make_pipeline(StandardScaler(), logistic) if standardize else logistic


def make_probe(probe: Probe, n_neighbors: int = 15, standardize: bool = True, **logistic):
    """An unfitted scikit-learn classifier: ``"knn"`` with ``n_neighbors``, or ``"logistic"`` (:func:`logistic_probe`,
    ``logistic`` holds its keyword arguments)."""
    if probe == "knn":
        return FaissKNNClassifier(n_neighbors=n_neighbors)
    if probe == "logistic":
        return logistic_probe(standardize=standardize, **logistic)
    raise ConfigError(f"probe must be 'knn' or 'logistic'; got {probe!r}")


def balanced_class_weights(codes: np.ndarray, n_classes: int, power: float = 1.0) -> np.ndarray:
    """``(K,)`` float64: ``(n / (K_present * count_k)) ** power`` for the classes present in ``codes (N,)`` (power 1:
    scikit-learn's "balanced"), 0 for the others."""
    counts = np.bincount(codes, minlength=n_classes)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = (len(codes) / (present.sum() * counts[present])) ** float(power)
    return weights


def class_weight(y: np.ndarray, oversample: bool | float) -> dict | str | None:
    """scikit-learn ``class_weight`` for a class-balancing power: :func:`balanced_class_weights` of the labels ``y``
    ``(N,)``, keyed by label.

    ``True`` (power 1) gives "balanced", ``False`` (0) gives None, any other power a dict keyed by label.
    """
    power = float(oversample)
    if power in (0.0, 1.0):
        return "balanced" if power else None
    classes, codes = np.unique(y, return_inverse=True)
    weights = balanced_class_weights(codes.ravel(), len(classes), power)
    return dict(zip(classes.tolist(), weights.tolist(), strict=True))
