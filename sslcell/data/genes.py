"""Gene vocabulary: align expression columns to a model's gene list, and streaming per-gene statistics.

A model owns an ordered gene list. Every row block handed to it is remapped to that order by gene
name: input genes the model does not know are dropped, model genes absent from the input are
zero-filled and reported in a :class:`GeneAlignment`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sslcell.errors import GeneMismatchError, InputError

if TYPE_CHECKING:
    from sslcell.data.expression import ExpressionDataset

N_EXAMPLES = 5


def as_gene_array(genes: Sequence[str] | np.ndarray | pd.Index, *, where: str) -> np.ndarray:
    """Gene names as a 1-D object array of str; raises :class:`InputError` on duplicates or no genes."""
    names = np.asarray(pd.Index(genes).astype(str), dtype=object)
    if names.ndim != 1 or names.size == 0:
        raise InputError(f"{where}: the gene list is empty (0 genes)")
    duplicated = pd.Index(names).duplicated()
    if duplicated.any():
        examples = list(pd.unique(names[duplicated]))[:N_EXAMPLES]
        raise InputError(
            f"{where}: {int(duplicated.sum())} duplicate gene names, e.g. {examples}; "
            "gene names must be unique (e.g. `adata.var_names_make_unique()`)"
        )
    return names


@dataclass(frozen=True)
class GeneAlignment:
    """How an input's genes map onto a model's gene list.

    ``n_present + n_missing == n_model_genes``; missing genes are zero-filled columns. ``examples``
    lists a few missing gene names; ``n_unused`` counts input genes the model does not know (dropped).
    """

    n_model_genes: int
    n_present: int
    n_missing: int
    examples: list[str] = field(default_factory=list)
    n_unused: int = 0
    source: str = ""

    def __str__(self) -> str:
        text = f"{self.n_present}/{self.n_model_genes} model genes present"
        if self.source:
            text = f"{self.source}: {text}"
        if self.n_missing:
            text += f", {self.n_missing} missing and zero-filled (e.g. {self.examples})"
        if self.n_unused:
            text += f", {self.n_unused} input genes not in the model ignored"
        return text

    @classmethod
    def combine(cls, parts: Sequence[GeneAlignment], model_genes: np.ndarray, present: np.ndarray) -> GeneAlignment:
        """One report for several shards: a model gene counts as present only if every shard has it."""
        missing = model_genes[~present]
        return cls(
            n_model_genes=len(model_genes),
            n_present=int(present.sum()),
            n_missing=int((~present).sum()),
            examples=[str(g) for g in missing[:N_EXAMPLES]],
            n_unused=max(p.n_unused for p in parts),
            source=f"{len(parts)} shards",
        )


class GeneAligner:
    """Remaps the columns of CSR row blocks from an input's gene order to the model's gene order.

    ``column_map[j]`` is the model column of input gene ``j``, or -1 when the model lacks it.
    """

    def __init__(self, input_genes: np.ndarray, model_genes: np.ndarray, *, source: str = "") -> None:
        self.n_genes = len(model_genes)
        self.column_map = pd.Index(model_genes).get_indexer(input_genes).astype(np.int64)
        kept = self.column_map[self.column_map >= 0]
        self.present = np.zeros(self.n_genes, dtype=bool)
        self.present[kept] = True
        self.is_identity = len(input_genes) == self.n_genes and bool(np.all(self.column_map == np.arange(self.n_genes)))
        self._drops = bool(np.any(self.column_map < 0))
        self.keeps_order = bool(np.all(np.diff(kept) > 0))
        if kept.size == 0:
            raise GeneMismatchError(
                f"{source or 'input'}: none of its {len(input_genes)} genes (e.g. {list(input_genes[:N_EXAMPLES])}) "
                f"is in the model's {self.n_genes} genes (e.g. {list(model_genes[:N_EXAMPLES])})"
            )
        missing = model_genes[~self.present]
        self.report = GeneAlignment(
            n_model_genes=self.n_genes,
            n_present=int(self.present.sum()),
            n_missing=int(missing.size),
            examples=[str(g) for g in missing[:N_EXAMPLES]],
            n_unused=int((self.column_map < 0).sum()),
            source=source,
        )

    def apply_arrays(
        self, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Remap CSR arrays (input columns) to model columns, dropping genes the model lacks.

        Column indices within a row stay sorted only if ``keeps_order``; otherwise sort afterwards.
        """
        columns = self.column_map[indices]
        if self._drops:
            keep = columns >= 0
            kept_before = np.concatenate(([0], np.cumsum(keep)))
            return data[keep], columns[keep], kept_before[indptr]
        return data, columns, indptr

    def apply(self, block: sp.csr_matrix) -> sp.csr_matrix:
        """``(n, n_input_genes)`` CSR -> ``(n, n_model_genes)`` CSR with sorted column indices."""
        if self.is_identity:
            return block
        data, columns, indptr = self.apply_arrays(block.data, block.indices, block.indptr)
        index_dtype = np.int32 if max(self.n_genes, len(data)) < 2**31 else np.int64
        out = sp.csr_matrix(
            (data, columns.astype(index_dtype), indptr.astype(index_dtype)), shape=(block.shape[0], self.n_genes)
        )
        if not self.keeps_order:
            out.has_sorted_indices = False
            out.sort_indices()
        return out


def warn_missing(report: GeneAlignment) -> None:
    """Warn once per dataset when model genes are zero-filled."""
    if report.n_missing:
        warnings.warn(f"gene alignment: {report}", UserWarning, stacklevel=4)


# --------------------------------------------------------------------------- streaming statistics


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
    values = values.astype(np.float64)
    return np.bincount(columns, values, n_genes), np.bincount(columns, values * values, n_genes)


def gene_statistics(dataset: ExpressionDataset, chunk_size: int = 4096, target_sum: float = 1e4) -> pd.DataFrame:
    """Per-gene statistics in one streaming pass; memory O(G + chunk).

    Columns (index = ``dataset.genes``):
    ``mean_counts``, ``var_counts`` (of the stored values); ``mean_norm``, ``var_norm`` (of counts
    scaled to ``target_sum`` per cell); ``mean_log1p``, ``var_log1p`` (of ``log1p`` of those);
    ``n_cells_expressed`` (cells with a nonzero value). Variances use ddof=1. When the dataset was
    opened with ``counts_are_log_normalized=True`` the stored values are taken as the ``log1p`` values
    and ``norm`` is their ``expm1``.
    """
    n_genes = dataset.n_genes
    counts, norm, logs = _Moments(n_genes), _Moments(n_genes), _Moments(n_genes)
    expressed = np.zeros(n_genes, dtype=np.int64)
    log_input = dataset.counts_are_log_normalized
    for _, _, block in dataset.iter_chunks(chunk_size):
        n = block.shape[0]
        rows = np.repeat(np.arange(n), np.diff(block.indptr))
        values = block.data.astype(np.float64)
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
    return pd.DataFrame(
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
