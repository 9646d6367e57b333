"""Gene vocabulary: align expression columns to a model's gene list by name.

A model owns an ordered gene list. Every row block handed to it is remapped to that order by gene
name: input genes the model does not know are dropped, model genes absent from the input are
zero-filled and reported in a :class:`GeneAlignment`. This module imports no dataset code; per-gene
statistics and highly variable genes are in :mod:`sslcell.data.gene_stats`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sslcell.errors import GeneMismatchError, InputError, SSLCellWarning

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


MAX_MISSING_GENES = 0.5  # default largest share of a model's genes that may be missing from data it reads


def missing_info(report: GeneAlignment | None, n_model_genes: int) -> dict[str, Any]:
    """What ``uns`` records about a model's genes missing from the data: count and a few names."""
    return {"n_model_genes": int(n_model_genes),
            "n_missing_genes": int(report.n_missing) if report is not None else 0,
            "missing_genes_examples": list(report.examples) if report is not None else []}


def check_missing(report: GeneAlignment | None, max_share: float | None = None) -> None:
    """Raise :class:`GeneMismatchError` when more than ``max_share`` (default :data:`MAX_MISSING_GENES`) of the
    model's genes are missing."""
    max_share = MAX_MISSING_GENES if max_share is None else max_share
    if not 0.0 <= float(max_share) <= 1.0:
        raise InputError(f"max_missing_genes must lie in [0, 1]; got {max_share}")
    if report is None or report.n_missing <= max_share * report.n_model_genes:
        return
    raise GeneMismatchError(
        f"{report}: {report.n_missing / report.n_model_genes:.0%} of the model's genes are missing, more than "
        f"max_missing_genes={max_share:g}; check the species and symbols vs IDs, or pass a larger "
        "max_missing_genes (1 accepts any overlap)"
    )


def warn_missing(report: GeneAlignment) -> None:
    """Warn once per dataset when model genes are zero-filled."""
    if report.n_missing:
        warnings.warn(f"gene alignment: {report}", SSLCellWarning, stacklevel=4)


# Compatibility forwards (kept for one release): the statistics moved to sslcell.data.gene_stats, which imports
# sslcell.data.expression (which imports this module), so they are resolved on first access (PEP 562) rather
# than re-exported by a module-level import, which would recreate the import cycle.
_MOVED_TO_GENE_STATS = ("gene_statistics", "seurat_dispersions", "select_highly_variable", "_Moments", "_column_sums")


def __getattr__(name: str) -> Any:
    if name not in _MOVED_TO_GENE_STATS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from sslcell.data import gene_stats

    value = getattr(gene_stats, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MOVED_TO_GENE_STATS})
