"""Streaming per-gene statistics of an :class:`~sslcell.data.expression.ExpressionDataset` and HVG selection.

One pass over row chunks, memory O(G + chunk): per-gene moments of raw, library-size-normalised and ``log1p``
values (merged chunk by chunk), seurat-flavour normalised dispersions, and the highly variable genes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sslcell.data.expression import ExpressionDataset
from sslcell.errors import InputError


class _Moments:
    """Per-gene count, mean and sum of squared deviations, merged chunk by chunk (Chan et al. 1979)."""

    def __init__(self, n_genes: int) -> None:
        self.n = 0
        self.mean = np.zeros(n_genes)
        self.m2 = np.zeros(n_genes)

    def update(self, total: np.ndarray, total_sq: np.ndarray, n: int) -> None:
        mean_b = total / n
        m2_b = np.maximum(total_sq - n * mean_b**2, 0.0)
        n_ab = self.n + n
        delta = mean_b - self.mean
        self.mean += delta * (n / n_ab)
        self.m2 += m2_b + delta**2 * (self.n * n / n_ab)
        self.n = n_ab

    def var(self) -> np.ndarray:
        """Sample variance (ddof=1), as scanpy computes it."""
        return self.m2 / max(self.n - 1, 1)


def _column_sums(columns: np.ndarray, values: np.ndarray, n_genes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene sum and sum of squares ``(n_genes,)`` of stored ``values`` (nnz,) at column indices ``columns``."""
    values = values.astype(np.float64)
    return np.bincount(columns, values, n_genes), np.bincount(columns, values * values, n_genes)


def gene_statistics(dataset: ExpressionDataset, chunk_size: int = 4096, target_sum: float = 1e4) -> pd.DataFrame:
    """Per-gene statistics in one streaming pass; memory O(G + chunk).

    Columns (index = ``dataset.genes``):
    ``mean_counts``, ``var_counts`` (of the stored values); ``mean_norm``, ``var_norm`` (of counts
    scaled to ``target_sum`` per cell); ``mean_log1p``, ``var_log1p`` (of ``log1p`` of those);
    ``n_cells_expressed`` (cells with a nonzero value). Variances use ddof=1. ``attrs``: ``n_cells`` and
    ``n_empty_cells`` (cells without any nonzero value). When the dataset was opened with
    ``counts_are_log_normalized=True`` the stored values are taken as the ``log1p`` values and ``norm`` is their
    ``expm1``. An all-zero dataset raises :class:`InputError`.
    """
    n_genes = dataset.n_genes
    counts, norm, logs = _Moments(n_genes), _Moments(n_genes), _Moments(n_genes)
    expressed = np.zeros(n_genes, dtype=np.int64)
    log_input = dataset.counts_are_log_normalized
    n_empty = 0
    for _, _, block in dataset.iter_chunks(chunk_size):
        if not block.has_canonical_format:  # a gene stored twice in a row counts once, as the model sees it
            block = block.copy()
            block.sum_duplicates()
        n = block.shape[0]
        rows = np.repeat(np.arange(n), np.diff(block.indptr))
        values = block.data.astype(np.float64)
        n_empty += n - np.count_nonzero(np.bincount(rows[values != 0], minlength=n))
        if log_input:
            log_values, norm_values = values, np.expm1(values)
        else:
            library = np.bincount(rows, values, n)
            scale = np.divide(target_sum, library, out=np.zeros(n), where=library > 0)
            norm_values = values * scale[rows]
            log_values = np.log1p(norm_values)
        counts.update(*_column_sums(block.indices, values, n_genes), n)
        norm.update(*_column_sums(block.indices, norm_values, n_genes), n)
        logs.update(*_column_sums(block.indices, log_values, n_genes), n)
        expressed += np.bincount(block.indices[values != 0], minlength=n_genes)
    stats = pd.DataFrame(
        {
            "mean_counts": counts.mean,
            "var_counts": counts.var(),
            "mean_norm": norm.mean,
            "var_norm": norm.var(),
            "mean_log1p": logs.mean,
            "var_log1p": logs.var(),
            "n_cells_expressed": expressed,
        },
        index=pd.Index(dataset.genes, name="gene"),
    )
    stats.attrs.update(n_cells=int(dataset.n_obs), n_empty_cells=int(n_empty))
    if not expressed.any():
        raise InputError(
            f"{', '.join(map(str, dataset.sources))}: every value over the {n_genes} genes read is zero "
            f"({dataset.n_obs} cells): there is nothing to learn from"
        )
    return stats


def seurat_dispersions(stats: pd.DataFrame, n_bins: int = 20) -> pd.DataFrame:
    """Normalised dispersion as scanpy's ``highly_variable_genes(flavor="seurat")`` computes it.

    ``stats`` holds ``mean_norm``/``var_norm`` (mean and variance of library-size-normalised counts).
    Returns columns ``means`` (log1p of the mean), ``dispersions`` (log of var/mean) and
    ``dispersions_norm`` (z-score of the dispersion within ``n_bins`` equal-width mean bins).
    """
    mean = stats["mean_norm"].to_numpy(copy=True)
    mean[mean == 0] = 1e-12
    dispersion = stats["var_norm"].to_numpy() / mean
    dispersion[dispersion == 0] = np.nan
    df = pd.DataFrame({"means": np.log1p(mean), "dispersions": np.log(dispersion)}, index=stats.index)
    df["mean_bin"] = pd.cut(df["means"], bins=n_bins)
    grouped = df.groupby("mean_bin", observed=True)["dispersions"]
    avg, dev = grouped.transform("mean"), grouped.transform("std")
    single = dev.isna() & avg.notna()  # a bin with one gene: scanpy sets its normalised dispersion to 1
    dev[single], avg[single] = avg[single], 0.0
    df["dispersions_norm"] = (df["dispersions"] - avg) / dev
    return df


def select_highly_variable(dataset: ExpressionDataset, n_top_genes: int, chunk_size: int = 4096) -> np.ndarray:
    """Names of the ``n_top_genes`` genes of highest seurat-flavour normalised dispersion.

    One streaming pass over ``dataset`` (memory O(G)); counts are normalised to 1e4 per cell first.
    Genes never expressed are never selected. Returned in the dataset's gene order.
    """
    if not 0 < n_top_genes:
        raise InputError(f"select_highly_variable: n_top_genes must be positive, got {n_top_genes}")
    disp = seurat_dispersions(gene_statistics(dataset, chunk_size=chunk_size))
    score = np.nan_to_num(disp["dispersions_norm"].to_numpy(), nan=-np.inf)
    order = np.argsort(-score, kind="stable")[: min(n_top_genes, len(score))]
    order = order[np.isfinite(score[order])]
    return np.asarray(dataset.genes)[np.sort(order)]
