"""Non-learned baseline embeddings that an SSL embedding has to beat: PCA of counts, PCA of raw pixels."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import scanpy as sc
from scipy import sparse

from sslcell.errors import InputError, SSLCellWarning

LOG_SCALE_MAX = 20.0  # non-integer "counts" no larger than this are log-normalised values (log1p of CPM <= 13.8)


def _counts_matrix(counts, layer: str | None, what: str = "pca_baseline"):
    """AnnData (``.X`` or ``.layers[layer]``) or matrix ``(N, G)`` -> float32 copy, dense or CSR; NaN, inf or
    negative counts raise, non-integer ones that look log-normalised (none above LOG_SCALE_MAX) too, other non-integer
    ones warn (``what``: the caller, named in the messages)."""
    if isinstance(counts, ad.AnnData):
        if counts.isbacked:
            raise InputError(f"{counts.filename}: a backed AnnData; {what} reads the whole matrix, so load it first "
                             "(adata.to_memory())")
        if layer is not None and layer not in counts.layers:
            raise InputError(f"layer {layer!r} not in adata.layers (available: {list(counts.layers)})")
        if not counts.var_names.is_unique:
            repeated = counts.var_names[counts.var_names.duplicated()].unique()
            raise InputError(f"{what}: gene names repeat in var_names (e.g. {list(repeated[:5])}); make them unique "
                             "first (adata.var_names_make_unique())")
        counts = counts.X if layer is None else counts.layers[layer]
    elif layer is not None:
        raise InputError("layer is only meaningful when counts is an AnnData")
    if counts is None:
        raise InputError("the AnnData has no count matrix in .X")
    x = sparse.csr_matrix(counts, dtype=np.float32) if sparse.issparse(counts) else np.array(counts, np.float32)
    if x.ndim != 2:
        raise InputError(f"counts must be a 2-D matrix (N cells, G genes); got shape {x.shape}")
    if 0 in x.shape:
        raise InputError(f"counts of shape {x.shape}: {what} needs at least one cell and one gene")
    values = x.data if sparse.issparse(x) else x
    if not np.isfinite(values).all():
        raise InputError(f"counts contain NaN or inf; {what} expects raw counts, finite and non-negative")
    if (values < 0).any():
        raise InputError(f"counts contain negative values; {what} expects raw counts, finite and non-negative")
    fractional = values != np.round(values)
    if fractional.any() and values.max(initial=0.0) <= LOG_SCALE_MAX:
        raise InputError(
            f"counts contain non-integer values, none above {values.max(initial=0.0):.3g}: they look log-normalised, "
            f"and {what} normalises and log-transforms raw counts itself (it would do it twice). Pass the raw "
            "counts (layer=, e.g. layer='counts')")
    if fractional.any():
        warnings.warn(
            f"counts contain non-integer values; {what} expects raw counts (it normalises and log-transforms)",
            SSLCellWarning,
            stacklevel=3,
        )
    return x


def log_normalised(counts, layer: str | None = None, what: str = "pca_baseline") -> ad.AnnData:
    """Raw counts ``(N, G)`` (an AnnData's ``.X`` or ``.layers[layer]``, or a matrix) -> a new AnnData of
    ``log1p(normalize_total(counts, target_sum=1e4))``, float32, with the AnnData's obs and var names; checked as
    :func:`_counts_matrix` checks them. The input is not modified."""
    x = _counts_matrix(counts, layer, what)
    adata = ad.AnnData(x)
    if isinstance(counts, ad.AnnData):
        adata.obs_names, adata.var_names = counts.obs_names, counts.var_names
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


def pca_baseline(counts, n_comps: int = 50, n_top_genes: int = 2000, seed: int = 0, *, layer: str | None = None,
                 fit_rows: np.ndarray | None = None):
    """The standard scanpy PCA of raw counts ``(N, G)`` -> ``(N, n_comps)`` float32.

    ``normalize_total(target_sum=1e4)``, ``log1p``, ``highly_variable_genes(flavor="seurat",
    n_top_genes=min(n_top_genes, G))`` on the log data, ``scale(max_value=10)`` of those genes, then
    ``pca(n_comps, random_state=seed)``. ``counts``: an AnnData (``.X``, or ``.layers[layer]``) or a
    dense or sparse matrix; it is not modified. ``n_comps`` must be below ``min(N, number of HVGs)``.

    ``fit_rows`` (positions or a boolean mask): choose the genes and fit the scaling and the PCA on these cells
    only (a transfer reference), then project every cell; the same steps, with scikit-learn's ARPACK PCA.
    """
    adata = log_normalised(counts, layer)
    if fit_rows is not None:
        return _pca_fitted_on(adata, _positions(fit_rows, adata.n_obs), n_comps, n_top_genes, seed)
    sc.pp.highly_variable_genes(adata, flavor="seurat", n_top_genes=min(n_top_genes, adata.n_vars))
    adata = adata[:, adata.var["highly_variable"].to_numpy()].copy()
    if not 1 <= n_comps < min(adata.shape):
        raise InputError(
            f"n_comps={n_comps} must be >= 1 and < min(cells, highly variable genes) = {min(adata.shape)}"
        )
    if sparse.issparse(adata.X):  # scaling centres the genes, which densifies them anyway
        adata.X = adata.X.toarray()
    sc.pp.scale(adata, max_value=10)
    sc.tl.pca(adata, n_comps=n_comps, random_state=seed)
    return np.asarray(adata.obsm["X_pca"], dtype=np.float32)


def _positions(rows: np.ndarray, n: int) -> np.ndarray:
    rows = np.asarray(rows)
    rows = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)
    if rows.ndim != 1 or len(rows) < 2 or rows.min() < 0 or rows.max() >= n:
        raise InputError(f"fit_rows must select at least 2 of the {n} cells (positions or a boolean mask)")
    return rows


def _pca_fitted_on(adata: ad.AnnData, rows: np.ndarray, n_comps: int, n_top_genes: int, seed: int) -> np.ndarray:
    """pca_baseline's gene choice, scaling and PCA fitted on ``rows`` of log-normalised ``adata``; all cells
    projected."""
    reference = adata[rows].copy()
    sc.pp.highly_variable_genes(reference, flavor="seurat", n_top_genes=min(n_top_genes, adata.n_vars))
    genes = reference.var["highly_variable"].to_numpy()
    x = adata.X[:, genes]
    x = np.asarray(x.toarray() if sparse.issparse(x) else x, dtype=np.float64)
    if not 1 <= n_comps < min(len(rows), int(genes.sum())):
        raise InputError(f"n_comps={n_comps} must be >= 1 and < min(fit cells, highly variable genes) = "
                         f"{min(len(rows), int(genes.sum()))}")
    return scaled_pca(x, rows, n_comps, seed, svd_solver="arpack")


def scaled_pca(x: np.ndarray, rows: np.ndarray | None, n_comps: int, seed: int = 0,
               svd_solver: str = "auto") -> np.ndarray:
    """Dense ``x (N, G)`` -> ``(N, n_comps)`` float32: each gene standardised with the mean and std (ddof 1) of
    ``rows`` (None: every cell), clipped at ±10 as ``sc.pp.scale(max_value=10)`` does, then a PCA fitted on those
    rows (scikit-learn, ``random_state=seed``) and every cell projected."""
    from sklearn.decomposition import PCA

    fit = x if rows is None else x[rows]
    if not 1 <= n_comps < min(fit.shape) or len(fit) < 2:
        raise InputError(f"n_comps={n_comps} must be >= 1 and < min(cells, genes) = {min(fit.shape)} (at least 2 "
                         "cells)")
    mean, std = fit.mean(0), fit.std(0, ddof=1)
    std[std == 0] = 1
    z = np.clip((x - mean) / std, -10, 10)
    pca = PCA(n_comps, svd_solver=svd_solver, random_state=seed).fit(z if rows is None else z[rows])
    return pca.transform(z).astype(np.float32)


def pixel_pca_baseline(cells, n_comps: int = 50, seed: int = 0, *, batch_size: int = 4096,
                       fit_rows: np.ndarray | None = None) -> np.ndarray:
    """Raw-pixel PCA of crops ``(N, C, H, W)`` -> ``(N, n_comps)`` float32: every pixel of every channel z-scored
    (over the crops given), then PCA (``random_state=seed``). Holds the ``(N, C*H*W)`` float32 pixels in memory.
    ``fit_rows`` (positions or a boolean mask): fit the z-scoring and the PCA on these crops only (a transfer
    reference), then project every crop."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    n = len(cells)
    x = np.empty((n, int(np.prod(cells.shape[1:]))), dtype=np.float32)
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(start + batch_size, n))
        x[rows] = cells.batch(rows).reshape(len(rows), -1)
    rows = np.arange(n) if fit_rows is None else _positions(fit_rows, n)
    if not 1 <= n_comps < min(len(rows), x.shape[1]):
        raise InputError(f"n_comps={n_comps} must be >= 1 and < min(crops, pixels) = {min(len(rows), x.shape[1])}")
    if fit_rows is None:
        return PCA(n_comps, random_state=seed).fit_transform(StandardScaler().fit_transform(x)).astype(np.float32)
    scaler = StandardScaler().fit(x[rows])
    pca = PCA(n_comps, random_state=seed).fit(scaler.transform(x[rows]))
    return pca.transform(scaler.transform(x)).astype(np.float32)
