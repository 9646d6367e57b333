"""Non-learned baseline embeddings that an SSL embedding has to beat: PCA of counts, PCA of raw pixels."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import scanpy as sc
from scipy import sparse

from sslcell.errors import InputError


def _counts_matrix(counts, layer: str | None):
    """AnnData (``.X`` or ``.layers[layer]``) or matrix ``(N, G)`` -> float32 copy, dense or CSR."""
    if isinstance(counts, ad.AnnData):
        if layer is not None and layer not in counts.layers:
            raise InputError(f"layer {layer!r} not in adata.layers (available: {list(counts.layers)})")
        counts = counts.X if layer is None else counts.layers[layer]
    elif layer is not None:
        raise InputError("layer is only meaningful when counts is an AnnData")
    if counts is None:
        raise InputError("the AnnData has no count matrix in .X")
    x = sparse.csr_matrix(counts, dtype=np.float32) if sparse.issparse(counts) else np.array(counts, np.float32)
    if x.ndim != 2:
        raise InputError(f"counts must be a 2-D matrix (N cells, G genes); got shape {x.shape}")
    values = x.data if sparse.issparse(x) else x
    if not np.isfinite(values).all():
        raise InputError("counts contain NaN or inf")
    if (values < 0).any():
        raise InputError("counts contain negative values; pca_baseline expects raw counts")
    if (values != np.round(values)).any():
        warnings.warn(
            "counts contain non-integer values; pca_baseline expects raw counts (it normalises and log-transforms)",
            UserWarning,
            stacklevel=3,
        )
    return x


def pca_baseline(counts, n_comps: int = 50, n_top_genes: int = 2000, seed: int = 0, *, layer: str | None = None):
    """The standard scanpy PCA of raw counts ``(N, G)`` -> ``(N, n_comps)`` float32.

    ``normalize_total(target_sum=1e4)``, ``log1p``, ``highly_variable_genes(flavor="seurat",
    n_top_genes=min(n_top_genes, G))`` on the log data, ``scale(max_value=10)`` of those genes, then
    ``pca(n_comps, random_state=seed)``. ``counts``: an AnnData (``.X``, or ``.layers[layer]``) or a
    dense or sparse matrix; it is not modified. ``n_comps`` must be below ``min(N, number of HVGs)``.
    """
    x = _counts_matrix(counts, layer)
    adata = ad.AnnData(x)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
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


def pixel_pca_baseline(cells, n_comps: int = 50, seed: int = 0, *, batch_size: int = 4096) -> np.ndarray:
    """Raw-pixel PCA of crops ``(N, C, H, W)`` -> ``(N, n_comps)`` float32: every pixel of every channel z-scored
    (over the crops given), then PCA (``random_state=seed``). Holds the ``(N, C*H*W)`` float32 pixels in memory."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    n = len(cells)
    x = np.empty((n, int(np.prod(cells.shape[1:]))), dtype=np.float32)
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(start + batch_size, n))
        x[rows] = cells.batch(rows).reshape(len(rows), -1)
    if not 1 <= n_comps < min(x.shape):
        raise InputError(f"n_comps={n_comps} must be >= 1 and < min(crops, pixels) = {min(x.shape)}")
    x = StandardScaler().fit_transform(x)
    return PCA(n_comps, random_state=seed).fit_transform(x).astype(np.float32)
