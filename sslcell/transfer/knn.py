"""Exact k-nearest-neighbour search on faiss: a classifier, a neighbours transformer, label transfer.

Search is exact (``IndexFlatL2``; cosine = inner product on L2-normalised vectors). For large
batches faiss computes squared distances as ``|q|^2 + |x|^2 - 2 q.x`` in float32, which loses
precision for close pairs far from the origin. So euclidean data are centred on the mean of the
fitted points first (distances do not change), and the candidates faiss returns are re-scored from
the vector differences (``|q - x|``) and re-sorted: distances agree with scikit-learn's to float32
rounding, and a point's distance to itself is exactly 0.
"""

from __future__ import annotations

import warnings
from typing import Literal

import faiss
import numpy as np
from scipy import sparse
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from sslcell.errors import ConfigError, InputError

Metric = Literal["euclidean", "cosine"]
_METRICS = ("euclidean", "cosine")
_REFINE_ELEMENTS = 1 << 24  # gathered candidate vectors per refinement chunk (64 MB of float32)


def _as_float32(x, name: str) -> np.ndarray:
    """``(N, D)`` array-like -> C-contiguous float32; finite values only."""
    if sparse.issparse(x):
        x = x.toarray()
    x = np.ascontiguousarray(np.asarray(x), dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise InputError(f"{name} must be a non-empty 2-D array (N, D); got shape {x.shape}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise InputError(f"{name} has NaN or inf in {rows.size} rows (first: row {rows[0]})")
    return x


class _ExactIndex:
    """Exact faiss index over ``(N, D)`` vectors; ``search`` returns refined, sorted distances.

    Subclasses build another faiss index in :meth:`_build` (or take a loaded ``index``); the prepared vectors
    ``x`` are kept for the exact re-scoring of candidates either way."""

    def __init__(self, x: np.ndarray, metric: str, batch_size: int, index: faiss.Index | None = None):
        if metric not in _METRICS:
            raise ConfigError(f"metric must be one of {_METRICS}; got {metric!r}")
        self.metric, self.batch_size = metric, batch_size
        self.offset = x.mean(axis=0, dtype=np.float64).astype(np.float32) if metric == "euclidean" else None
        self.x = self._prepare(x)
        self.index = self._build(self.x) if index is None else index

    def _build(self, x: np.ndarray) -> faiss.Index:
        index = faiss.IndexFlatL2(x.shape[1]) if self.metric == "euclidean" else faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        return index

    @property
    def _faiss_metric(self) -> int:
        return faiss.METRIC_L2 if self.metric == "euclidean" else faiss.METRIC_INNER_PRODUCT

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        if self.metric == "euclidean":
            x = x - self.offset
        else:  # zero vectors stay zero, as in sklearn's cosine distance
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            x = x / np.where(norms > 0, norms, 1.0)
        return np.ascontiguousarray(x, dtype=np.float32)

    def _n_candidates(self, k: int) -> int:
        """Candidates fetched from the faiss index per query and re-scored exactly; the nearest ``k`` are kept."""
        return k

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(M, D)`` queries -> distances ``(M, k)`` float32 and indices ``(M, k)`` int64, nearest first."""
        if q.shape[1] != self.x.shape[1]:
            raise InputError(f"queries have {q.shape[1]} features, the fitted data {self.x.shape[1]}")
        if not 1 <= k <= self.index.ntotal:
            raise InputError(f"k={k} neighbours requested, but the index holds {self.index.ntotal} points")
        q = self._prepare(q)
        n_cand = min(max(k, self._n_candidates(k)), self.index.ntotal)
        dist = np.empty((q.shape[0], k), dtype=np.float32)
        idx = np.empty((q.shape[0], k), dtype=np.int64)
        for start in range(0, q.shape[0], self.batch_size):
            stop = min(start + self.batch_size, q.shape[0])
            _, cand = self.index.search(q[start:stop], n_cand)
            d = self._refine(q[start:stop], cand)
            d[cand < 0] = np.inf  # an approximate index may find fewer candidates than asked (faiss pads with -1)
            order = np.argsort(d, axis=1, kind="stable")[:, :k]
            dist[start:stop], idx[start:stop] = np.take_along_axis(d, order, 1), np.take_along_axis(cand, order, 1)
        return dist, idx

    def _refine(self, q: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Exact distances of queries ``(M, D)`` to their candidates ``idx`` ``(M, k)``."""
        out = np.empty(idx.shape, dtype=np.float32)
        step = max(1, _REFINE_ELEMENTS // (idx.shape[1] * q.shape[1]))
        for s in range(0, q.shape[0], step):
            diff = self.x[idx[s : s + step]] - q[s : s + step, None, :]
            sq = np.einsum("mkd,mkd->mk", diff, diff, dtype=np.float64)
            # cosine distance of unit vectors: 1 - cos = |a - b|^2 / 2, exact near 0
            out[s : s + step] = np.sqrt(sq) if self.metric == "euclidean" else sq / 2
        return out


def vote(dist: np.ndarray, codes: np.ndarray, n_classes: int, weights: str = "distance") -> np.ndarray:
    """Neighbour votes -> class shares ``(M, n_classes)``: ``dist`` and the neighbours' class ``codes`` are
    ``(M, k)``. ``"distance"`` weighs a vote by ``1 / distance`` (neighbours at distance 0, if any, take the whole
    vote); ``"uniform"`` counts votes."""
    if weights == "uniform":  # a missing neighbour (an approximate index's padding, at distance inf) has no vote
        w = np.isfinite(dist).astype(np.float64)
    elif weights == "distance":
        with np.errstate(divide="ignore"):
            w = 1.0 / dist.astype(np.float64)
        exact = np.isinf(w)
        rows = exact.any(axis=1)
        w[rows] = exact[rows]
    else:
        raise ConfigError(f"weights must be 'uniform' or 'distance'; got {weights!r}")
    n = dist.shape[0]
    flat = np.arange(n)[:, None] * n_classes + codes
    proba = np.bincount(flat.ravel(), weights=w.ravel(), minlength=n * n_classes).reshape(n, n_classes)
    return proba / proba.sum(axis=1, keepdims=True)


def _check_params(n_neighbors: int, batch_size: int) -> None:
    if int(n_neighbors) < 1:
        raise ConfigError(f"n_neighbors must be >= 1; got {n_neighbors}")
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be >= 1; got {batch_size}")


class FaissKNNClassifier(ClassifierMixin, BaseEstimator):
    """k-nearest-neighbour classifier on an exact faiss index, scikit-learn estimator API.

    Parameters mirror :class:`sklearn.neighbors.KNeighborsClassifier`: ``weights="uniform"`` counts
    votes, ``"distance"`` weights them by ``1 / distance`` (a query at distance 0 from some training
    points takes the vote of those points only). Ties go to the first class in ``classes_``.
    ``fit(X (N, D), y (N,))``; ``predict(X (M, D)) -> (M,)``; ``predict_proba(X) -> (M, n_classes)``.
    """

    def __init__(
        self,
        n_neighbors: int = 15,
        *,
        metric: Metric = "euclidean",
        weights: Literal["uniform", "distance"] = "uniform",
        batch_size: int = 8192,
    ):
        self.n_neighbors = n_neighbors
        self.metric = metric
        self.weights = weights
        self.batch_size = batch_size

    def fit(self, X, y) -> FaissKNNClassifier:
        _check_params(self.n_neighbors, self.batch_size)
        if self.weights not in ("uniform", "distance"):
            raise ConfigError(f"weights must be 'uniform' or 'distance'; got {self.weights!r}")
        x = _as_float32(X, "X")
        y = np.asarray(y)
        if y.shape != (x.shape[0],):
            raise InputError(f"y must have shape ({x.shape[0]},) to match X; got {y.shape}")
        self.classes_, self._y_codes = np.unique(y, return_inverse=True)
        self._index = _ExactIndex(x, self.metric, self.batch_size)
        self.n_features_in_ = x.shape[1]
        return self

    def kneighbors(self, X) -> tuple[np.ndarray, np.ndarray]:
        """Distances and indices ``(M, n_neighbors)`` of the training points nearest to ``X`` ``(M, D)``."""
        check_is_fitted(self, "classes_")
        return self._index.search(_as_float32(X, "X"), int(self.n_neighbors))

    def predict_proba(self, X) -> np.ndarray:
        """``(M, D)`` -> ``(M, n_classes)`` vote fractions, columns ordered as ``classes_``."""
        dist, idx = self.kneighbors(X)
        return vote(dist, self._y_codes[idx], len(self.classes_), self.weights)

    def predict(self, X) -> np.ndarray:
        """``(M, D)`` -> ``(M,)`` labels from ``classes_``."""
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


class FaissNeighbors(TransformerMixin, BaseEstimator):
    """Exact neighbours graph on faiss, a drop-in for :class:`sklearn.neighbors.KNeighborsTransformer`.

    ``transform(X (M, D))`` returns a CSR matrix ``(M, N_fit)``: in ``mode="distance"`` each row holds
    ``n_neighbors + 1`` distances (sklearn counts each point as its own neighbour there), nearest first
    in storage order, self-distances stored as explicit zeros; in ``mode="connectivity"``
    ``n_neighbors`` ones. ``fit_transform`` puts each point itself in its row's first slot even when
    exact duplicates tie with it. Works as ``scanpy.pp.neighbors(adata, use_rep=...,
    transformer=FaissNeighbors(n_neighbors=15))``: scanpy reads ``n_neighbors`` from ``get_params()``,
    counts self among them and keeps the nearest ``n_neighbors`` columns, so its connectivities equal
    those of ``scanpy.pp.neighbors(adata, n_neighbors=15)`` with exact search.
    """

    def __init__(
        self,
        n_neighbors: int = 15,
        *,
        mode: Literal["distance", "connectivity"] = "distance",
        metric: Metric = "euclidean",
        batch_size: int = 8192,
    ):
        self.n_neighbors = n_neighbors
        self.mode = mode
        self.metric = metric
        self.batch_size = batch_size

    def fit(self, X, y=None) -> FaissNeighbors:
        _check_params(self.n_neighbors, self.batch_size)
        if self.mode not in ("distance", "connectivity"):
            raise ConfigError(f"mode must be 'distance' or 'connectivity'; got {self.mode!r}")
        x = _as_float32(X, "X")
        self._index = _ExactIndex(x, self.metric, self.batch_size)
        self.n_samples_fit_ = x.shape[0]
        self.n_features_in_ = x.shape[1]
        return self

    def _k(self) -> int:
        return int(self.n_neighbors) + (self.mode == "distance")

    def transform(self, X) -> sparse.csr_matrix:
        check_is_fitted(self, "n_samples_fit_")
        dist, idx = self._index.search(_as_float32(X, "X"), self._k())
        return self._graph(dist, idx)

    def fit_transform(self, X, y=None) -> sparse.csr_matrix:
        x = _as_float32(X, "X")
        dist, idx = self.fit(x)._index.search(x, self._k())
        # move each point to the front of its own row (it may sit behind exact duplicates, or be
        # pushed out by them), shifting the neighbours before it one slot back
        n, k = idx.shape
        own = idx == np.arange(n)[:, None]
        pos = np.where(own.any(axis=1), own.argmax(axis=1), k - 1)
        src = np.arange(k)[None, :] - (np.arange(k)[None, :] <= pos[:, None])
        src[:, 0] = 0
        idx, dist = np.take_along_axis(idx, src, axis=1), np.take_along_axis(dist, src, axis=1)
        idx[:, 0], dist[:, 0] = np.arange(n), 0.0
        return self._graph(dist, idx)

    def _graph(self, dist: np.ndarray, idx: np.ndarray) -> sparse.csr_matrix:
        n, k = idx.shape
        data = dist.ravel() if self.mode == "distance" else np.ones(n * k, dtype=np.float32)
        indptr = np.arange(0, n * k + 1, k)
        return sparse.csr_matrix((data, idx.ravel(), indptr), shape=(n, self.n_samples_fit_))


def knn_transfer(
    reference_emb,
    reference_labels,
    query_emb,
    n_neighbors: int = 15,
    *,
    metric: Metric = "euclidean",
    weights: Literal["uniform", "distance"] = "uniform",
    k: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Zero-shot label transfer: label each query cell by a vote of its ``n_neighbors`` nearest reference cells.

    ``reference_emb (N, D)``, ``reference_labels (N,)``, ``query_emb (M, D)`` ->
    ``labels (M,)`` (values of ``reference_labels``) and ``confidence (M,)``: the winning label's
    share of the (weighted) votes, in ``(0, 1]``. No training; ``n_neighbors`` is capped at ``N``.
    ``k``: the deprecated name of ``n_neighbors``.
    """
    if k is not None:
        warnings.warn("k is deprecated; use n_neighbors", DeprecationWarning, stacklevel=2)
        n_neighbors = k
    n_ref = reference_emb.shape[0] if hasattr(reference_emb, "shape") else len(reference_emb)
    clf = FaissKNNClassifier(min(int(n_neighbors), n_ref), metric=metric, weights=weights)
    proba = clf.fit(reference_emb, reference_labels).predict_proba(query_emb)
    best = np.argmax(proba, axis=1)
    return clf.classes_[best], proba[np.arange(len(best)), best]
