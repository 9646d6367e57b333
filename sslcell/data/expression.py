"""Out-of-core expression matrices: one AnnData, a backed ``.h5ad`` file, or many shards as one dataset.

Rows are read as contiguous blocks and returned as ``(n, G)`` float32 CSR, aligned to a gene list
and checked (finite; non-negative; integer unless ``counts_are_log_normalized=True``). Files are
opened lazily, once per process, so a dataset can be handed to DataLoader worker processes. The reading
layer (in-memory and ``.h5ad`` shards, fast HDF5 range reads, value checks) is :mod:`sslcell.data.shards`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from sslcell.data.genes import GeneAligner, GeneAlignment, as_gene_array, check_missing, warn_missing

# IN_MEMORY, _ArrayReader, vstack_csr (and Workspace, used here): compatibility re-exports, kept for one
# release; the reading layer moved to sslcell.data.shards
from sslcell.data.shards import IN_MEMORY as IN_MEMORY
from sslcell.data.shards import (
    Workspace,
    _check_indices,
    _check_pointers,
    _empty,
    _FileShard,
    _MemoryShard,
    _Shard,
    _shard_paths,
    _validate,
)
from sslcell.data.shards import _ArrayReader as _ArrayReader
from sslcell.data.shards import vstack_csr as vstack_csr
from sslcell.errors import FileFormatError, GeneMismatchError, InputError


class ExpressionDataset:
    """Rows of one or more expression matrices, read in contiguous blocks, aligned to ``genes``.

    Build with :meth:`open`. Every block is ``(n, n_genes)`` float32 CSR in the column order of
    ``genes``; ``obs`` concatenates the shards' obs (with a ``shard`` column when there are several).
    """

    def __init__(
        self,
        shards: list[_Shard],
        genes: np.ndarray,
        aligners: list[GeneAligner] | None,
        alignment: GeneAlignment | None,
        counts_are_log_normalized: bool,
    ) -> None:
        self._shards = shards
        self._aligners = aligners
        self._offsets = np.cumsum([0] + [s.n_obs for s in shards])
        self.genes = genes
        self.alignment = alignment
        self.counts_are_log_normalized = counts_are_log_normalized
        self.sources = [s.source for s in shards]
        self.n_obs = int(self._offsets[-1])
        self.n_genes = len(genes)
        self._obs: pd.DataFrame | None = None

    @classmethod
    def open(
        cls,
        data: ad.AnnData | str | os.PathLike | Sequence[str | os.PathLike],
        *,
        layer: str | None = None,
        genes: Sequence[str] | np.ndarray | None = None,
        counts_are_log_normalized: bool = False,
    ) -> ExpressionDataset:
        """Open an AnnData, a ``.h5ad`` file (read backed), a folder of ``.h5ad`` shards (name order) or a list.

        ``layer`` names the counts layer (default ``X``). ``genes`` is the model gene list to align to
        (default: the data's own genes, which all shards must then share in the same order).
        ``counts_are_log_normalized=True`` declares log-normalised values: then only NaN/inf and
        negative values are rejected, not fractions.
        """
        if isinstance(data, ad.AnnData):
            if data.isbacked:
                if data.is_view:
                    raise InputError(f"{data.filename}: a view of a backed AnnData (some of its cells or genes) is "
                                     "not read in place; pass the whole file, or the view's .to_memory() (tools: "
                                     "copy=True)")
                shards: list[_Shard] = [_FileShard(data.filename, layer)]
                shards[0].var_names = np.asarray(data.var_names, dtype=str).astype(object)  # as renamed in memory
            else:
                shards = [_MemoryShard(data, layer)]
        else:
            shards = [_FileShard(p, layer) for p in _shard_paths(data)]
        for shard in shards:
            if shard.n_obs == 0 or len(shard.var_names) == 0:
                raise InputError(f"{shard.where}: empty AnnData ({shard.n_obs} cells x {len(shard.var_names)} genes)")
            as_gene_array(shard.var_names, where=shard.source)
        if genes is None:
            first = shards[0]
            if all(np.array_equal(shard.var_names, first.var_names) for shard in shards[1:]):
                return cls(shards, first.var_names, None, None, counts_are_log_normalized)
            known = set(first.var_names)
            for shard in shards[1:]:
                other = set(shard.var_names)
                if other != known:
                    odd = sorted(known ^ other)
                    raise GeneMismatchError(
                        f"shards {first.source} and {shard.source} have different genes ({len(odd)} in only one of "
                        f"them, e.g. {odd[:3]}): give every shard the same genes, e.g. subset each to the shared ones"
                    )
            genes = first.var_names  # the same genes in another order: every shard is aligned to the first by name
        return cls._aligned(shards, as_gene_array(genes, where="genes"), counts_are_log_normalized)

    @classmethod
    def _aligned(cls, shards: list[_Shard], genes: np.ndarray, log_normalized: bool) -> ExpressionDataset:
        aligners = [GeneAligner(s.var_names, genes, source=s.source) for s in shards]
        if len(aligners) == 1:
            alignment = aligners[0].report
        else:
            present = np.logical_and.reduce([a.present for a in aligners])
            alignment = GeneAlignment.combine([a.report for a in aligners], genes, present)
        warn_missing(alignment)
        return cls(shards, genes, aligners, alignment, log_normalized)

    def close(self) -> None:
        """Close the shards' open files (reads reopen them); a dataset is also a context manager."""
        for shard in self._shards:
            shard.close()

    def __enter__(self) -> ExpressionDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def with_genes(self, genes: Sequence[str] | np.ndarray) -> ExpressionDataset:
        """The same sources re-aligned to another gene list."""
        return self._aligned(self._shards, as_gene_array(genes, where="genes"), self.counts_are_log_normalized)

    @property
    def obs(self) -> pd.DataFrame:
        """Concatenated obs of all shards (index = obs_names); a categorical ``shard`` column when >1 shard."""
        if self._obs is None:
            if len(self._shards) == 1:
                self._obs = self._shards[0].obs
            else:
                obs = pd.concat([s.obs.assign(shard=s.source) for s in self._shards], axis=0, join="outer")
                obs["shard"] = pd.Categorical(obs["shard"], categories=list(dict.fromkeys(self.sources)))
                self._obs = obs
        return self._obs

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_obs, self.n_genes

    def __len__(self) -> int:
        return self.n_obs

    def __repr__(self) -> str:
        return f"ExpressionDataset({self.n_obs} cells x {self.n_genes} genes, {len(self._shards)} source(s))"

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` as ``(stop - start, n_genes)`` float32 CSR, aligned and validated."""
        if not 0 <= start <= stop <= self.n_obs:
            raise IndexError(f"rows {start}:{stop} out of range for {self.n_obs} cells")
        return self.read_ranges([(start, stop)])

    def iter_chunks(self, chunk_size: int = 4096) -> Iterator[tuple[int, int, sp.csr_matrix]]:
        """``(start, stop, rows)`` for consecutive row chunks in row order; ``rows`` as in :meth:`read_rows`."""
        if chunk_size < 1:
            raise InputError(f"iter_chunks: chunk_size must be >= 1, got {chunk_size}")
        for start in range(0, self.n_obs, chunk_size):
            stop = min(start + chunk_size, self.n_obs)
            yield start, stop, self.read_rows(start, stop)

    def _pieces(self, ranges: Sequence[tuple[int, int]]) -> Iterator[tuple[int, int, int]]:
        """``(shard, lo, hi)`` shard-local row ranges covering the dataset row ``ranges`` in order."""
        for start, stop in ranges:
            i = int(np.searchsorted(self._offsets, start, side="right")) - 1
            while start < stop:
                offset = int(self._offsets[i])
                hi = min(stop - offset, self._shards[i].n_obs)
                yield i, start - offset, hi
                start, i = offset + hi, i + 1

    def read_ranges(self, ranges: Sequence[tuple[int, int]], workspace: Workspace | None = None) -> sp.csr_matrix:
        """The rows of several ``(start, stop)`` ranges stacked, as in :meth:`read_rows`.

        With a ``workspace`` the result's arrays live in it and are overwritten by the next read with
        the same workspace (the loader's buffer); without one they are fresh.
        """
        plans, total = [], 0
        for i, lo, hi in self._pieces(ranges):
            offsets = self._shards[i].nnz_offsets(lo, hi)
            block = None if offsets is not None else self._shards[i].read(lo, hi)
            offsets = (block.indptr if block is not None else offsets).astype(np.int64)
            _check_pointers(self._shards[i], lo, offsets)
            plans.append((i, lo, hi, offsets, block))
            total += int(offsets[-1] - offsets[0])
        n_rows = sum(hi - lo for _, lo, hi, _, _ in plans)
        index_dtype = np.int32 if max(total, self.n_genes) < 2**31 else np.int64
        data = _empty(workspace, "data", total, np.float32)
        indices = _empty(workspace, "indices", total, index_dtype)
        indptr = np.zeros(n_rows + 1, dtype=np.int64)
        nnz = row = 0
        sort = False
        for i, lo, hi, offsets, block in plans:
            shard, n = self._shards[i], int(offsets[-1] - offsets[0])
            aligner = self._aligners[i] if self._aligners and not self._aligners[i].is_identity else None
            local = offsets - offsets[0]
            # read straight into the output where nothing is to be converted or remapped
            data_in_place = block is None and aligner is None and shard.dtype == np.float32
            indices_in_place = block is None and aligner is None
            if block is not None:
                raw, raw_indices = block.data, block.indices
            else:
                raw = data[nnz : nnz + n] if data_in_place else _empty(workspace, "raw", n, shard.dtype)
                raw_indices = (
                    indices[nnz : nnz + n] if indices_in_place else _empty(workspace, "raw_idx", n, index_dtype)
                )
                shard.read_values(int(offsets[0]), int(offsets[-1]), raw, raw_indices)
            if block is None:  # a block scipy built from the file was checked by scipy
                _check_indices(shard, lo, hi, raw_indices)
            _validate(raw, local, shard, lo, counts=not self.counts_are_log_normalized)
            if aligner is not None:
                raw, raw_indices, local = aligner.apply_arrays(raw, raw_indices, local)
                sort = sort or not aligner.keeps_order
            kept = len(raw)
            if not data_in_place:
                data[nnz : nnz + kept] = raw
            if not indices_in_place:
                indices[nnz : nnz + kept] = raw_indices
            indptr[row + 1 : row + 1 + hi - lo] = nnz + local[1:]
            nnz, row = nnz + kept, row + hi - lo
        out = sp.csr_matrix((data[:nnz], indices[:nnz], indptr.astype(index_dtype)), shape=(n_rows, self.n_genes))
        if sort:
            out.has_sorted_indices = False
            out.sort_indices()
        return out


def read_h5ad(path: str | os.PathLike, backed: str | None = None) -> ad.AnnData:
    """``anndata.read_h5ad`` whose errors name the file: a missing one, a folder, or a file that is not a readable
    ``.h5ad`` (another format, truncated, damaged) raise :class:`FileFormatError` (an ``OSError``) with the path."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such .h5ad file")
    if path.is_dir():
        raise FileFormatError(f"{path}: a folder, not an .h5ad file")
    try:
        return ad.read_h5ad(path, backed=backed)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - h5py and anndata raise OSError, KeyError, ValueError ... on bad files
        raise FileFormatError(f"{path}: cannot be read as an .h5ad file ({type(err).__name__}: {err})") from None


def open_counts(
    adata: ad.AnnData,
    genes: Sequence[str],
    *,
    layer: str | None = None,
    counts_are_log_normalized: bool = False,
    max_missing_genes: float | None = None,
) -> ExpressionDataset:
    """The counts of ``adata`` (``X`` or ``layer``; a backed file is read chunk-wise) aligned to a model's ``genes``;
    more than ``max_missing_genes`` of them missing is refused (:func:`~sslcell.data.genes.check_missing`). Close
    the dataset after use."""
    with warnings.catch_warnings():  # the alignment warning comes below, only if the data are not refused
        warnings.filterwarnings("ignore", message="gene alignment: ", category=UserWarning)
        dataset = ExpressionDataset.open(adata, layer=layer, genes=list(genes),
                                         counts_are_log_normalized=counts_are_log_normalized)
    try:
        check_missing(dataset.alignment, max_missing_genes)
        if dataset.alignment is not None:
            warn_missing(dataset.alignment)
    except BaseException:
        dataset.close()  # refused (or the warning made an error): no open file left behind
        raise
    return dataset


class CountRows:
    """Some cells' counts held in memory, ``(N, G)`` float32 CSR over a model's genes, read densely by rows.

    It has the row protocol of :class:`~sslcell.data.images.CellImages` (``len``, ``shape``, ``dtype``,
    ``batch(rows)``, indexing by positions), so the crops' batch loader, batch-norm recalibration and the
    inference loop serve counts too; fine-tuning holds its labelled cells this way.
    """

    def __init__(self, counts: sp.spmatrix, source: str = "<counts>") -> None:
        self.counts = sp.csr_matrix(counts, dtype=np.float32)
        self.source = source

    @classmethod
    def read(cls, dataset: ExpressionDataset, rows: np.ndarray, chunk_size: int = 4096) -> CountRows:
        """The dataset's ``rows`` (positions, in increasing order), read chunk by chunk."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or (np.diff(rows) <= 0).any() or (len(rows) and not 0 <= rows[0] <= rows[-1] < len(dataset)):
            raise InputError(f"CountRows.read: rows must be increasing positions in [0, {len(dataset)})")
        parts = []
        for start, stop, chunk in dataset.iter_chunks(chunk_size):
            lo, hi = np.searchsorted(rows, [start, stop])
            if hi > lo:
                parts.append(chunk[rows[lo:hi] - start])
        counts = sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, dataset.n_genes), dtype=np.float32)
        return cls(counts, source=", ".join(map(str, dataset.sources)))

    @property
    def shape(self) -> tuple[int, int]:
        return self.counts.shape

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    def __len__(self) -> int:
        return self.counts.shape[0]

    def __getitem__(self, rows: np.ndarray) -> CountRows:
        return CountRows(self.counts[np.asarray(rows)], self.source)

    def batch(self, rows: np.ndarray) -> np.ndarray:
        """Dense counts ``(len(rows), G)`` float32 of the given positions."""
        return self.counts[np.asarray(rows)].toarray()

    def map_rows(self, fn: Callable[[np.ndarray], np.ndarray], chunk_size: int = 4096) -> CountRows:
        """A copy with ``fn`` applied to dense blocks of rows, ``(n, G) -> (n, G)`` float32; ``fn`` must keep
        zeros zero, so that the counts stay sparse."""
        blocks = [sp.csr_matrix(fn(self.batch(np.arange(start, min(start + chunk_size, len(self))))), dtype=np.float32)
                  for start in range(0, len(self), chunk_size)]
        counts = sp.vstack(blocks, format="csr") if blocks else self.counts.copy()
        return CountRows(counts, self.source)
