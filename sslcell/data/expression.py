"""Out-of-core expression matrices: one AnnData, a backed ``.h5ad`` file, or many shards as one dataset.

Rows are read as contiguous blocks and returned as ``(n, G)`` float32 CSR, aligned to a gene list
and checked (finite; non-negative; integer unless ``counts_are_log_normalized=True``). Files are
opened lazily, once per process, so a dataset can be handed to DataLoader worker processes.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem, sparse_dataset

from sslcell.data.genes import GeneAligner, GeneAlignment, as_gene_array, warn_missing
from sslcell.errors import FileFormatError, GeneMismatchError, InputError

IN_MEMORY = "<AnnData>"


class Workspace:
    """Reusable scratch arrays for repeated block reads (fresh pages cost more than the copy itself)."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, key: str, n: int, dtype: np.dtype) -> np.ndarray:
        array = self._arrays.get(key)
        if array is None or array.size < n or array.dtype != dtype:
            size = max(int(1.25 * n), int(1.25 * array.size) if array is not None and array.dtype == dtype else 0)
            self._arrays.pop(key, None)  # free the old array before allocating its successor
            array = self._arrays[key] = np.empty(size, dtype)
        return array[:n]


def _empty(workspace: Workspace | None, key: str, n: int, dtype) -> np.ndarray:
    return np.empty(n, dtype) if workspace is None else workspace.get(key, n, np.dtype(dtype))


class _ArrayReader:
    """Reads element ranges of a 1-D HDF5 dataset into a given array.

    An unfiltered numeric dataset (no compression: anndata's default) is read with one ``pread`` per
    run of chunks adjacent in the file, about twice as fast as HDF5's per-chunk path on 60 KB chunks
    (anndata's default chunking); otherwise, or when the output dtype differs, h5py reads.
    """

    def __init__(self, dataset: h5py.Dataset, path: str) -> None:
        self.dataset, self.path, self.dtype = dataset, path, dataset.dtype
        self._fd: int | None = None
        self.chunk, self.offsets = 0, None
        native = self.dtype.byteorder in ("=", "|") or (self.dtype.byteorder == "<") == np.little_endian
        plain = self.dtype.kind in "biuf" and native and not dataset.id.get_create_plist().get_nfilters()
        if dataset.ndim != 1 or len(dataset) == 0 or not plain:
            return
        offset = dataset.id.get_offset()
        if offset is not None:  # contiguous layout
            self.chunk, self.offsets = len(dataset), np.array([offset], dtype=np.int64)
            return
        if dataset.chunks is None or not hasattr(dataset.id, "chunk_iter"):
            return
        chunk, found = dataset.chunks[0], {}
        try:
            dataset.id.chunk_iter(lambda info: found.__setitem__(info.chunk_offset[0] // chunk, info.byte_offset))
        except Exception:  # an HDF5 build without H5Dchunk_iter: use h5py
            return
        n_chunks = -(-len(dataset) // chunk)
        if len(found) == n_chunks:  # every chunk allocated
            self.chunk, self.offsets = chunk, np.array([found[k] for k in range(n_chunks)], dtype=np.int64)

    def read(self, a: int, b: int, out: np.ndarray) -> None:
        """Fill ``out`` (contiguous, ``b - a`` elements) with elements ``a:b``."""
        if b <= a:
            return
        if self.offsets is None or out.dtype != self.dtype or not out.flags.c_contiguous:
            self.dataset.read_direct(out, np.s_[a:b], np.s_[0 : b - a])
            return
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        size = self.dtype.itemsize
        first = np.arange(a // self.chunk, (b - 1) // self.chunk + 1) * self.chunk
        starts = np.maximum(first, a)
        lengths = (np.minimum(first + self.chunk, b) - starts) * size
        file_at = self.offsets[first // self.chunk] + (starts - first) * size
        new_run = np.r_[True, file_at[1:] != file_at[:-1] + lengths[:-1]]  # merge chunks adjacent in the file
        run_at, run_out = file_at[new_run], (starts[new_run] - a) * size
        run_len = np.add.reduceat(lengths, np.flatnonzero(new_run))
        buffer = out.view(np.uint8)
        for at, dest, n in zip(run_at.tolist(), run_out.tolist(), run_len.tolist()):
            while n:
                got = os.preadv(self._fd, [buffer[dest : dest + n]], at)
                if got <= 0:
                    raise FileFormatError(f"{self.path}: file ends early reading {self.dataset.name} (truncated?)")
                at, dest, n = at + got, dest + got, n - got

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _Shard:
    """One source of rows: shape, gene names, obs, and raw row blocks.

    A shard that stores CSR reads ranges directly into caller arrays (``nnz_offsets`` then
    ``read_values``); any other layout returns blocks from ``read``.
    """

    source: str
    where: str  # e.g. "data.h5ad (layers/counts)", for error messages
    var_names: np.ndarray
    obs: pd.DataFrame
    n_obs: int
    dtype: np.dtype

    def nnz_offsets(self, lo: int, hi: int) -> np.ndarray | None:
        """``indptr[lo:hi + 1]`` when rows can be read as value ranges, else None."""
        return None

    def read_values(self, a: int, b: int, data: np.ndarray, indices: np.ndarray) -> None:  # pragma: no cover
        raise NotImplementedError

    def read(self, lo: int, hi: int) -> sp.csr_matrix:  # pragma: no cover - interface
        raise NotImplementedError


class _MemoryShard(_Shard):
    def __init__(self, adata: ad.AnnData, layer: str | None) -> None:
        self.source = IN_MEMORY
        if layer is None:
            matrix, self.where = adata.X, f"{IN_MEMORY} (X)"
            if matrix is None:
                raise InputError(f"{IN_MEMORY}: .X is None; pass layer=<name> (layers: {list(adata.layers)})")
        else:
            if layer not in adata.layers:
                raise InputError(f"{IN_MEMORY}: no layer {layer!r}; layers are {list(adata.layers)}")
            matrix, self.where = adata.layers[layer], f"{IN_MEMORY} (layers/{layer})"
        if sp.issparse(matrix):
            matrix = sp.csr_matrix(matrix)  # CSC is converted once: row blocks of CSC cost a full scan
        elif isinstance(matrix, np.ndarray):
            matrix = np.asarray(matrix)
        else:
            kind = type(matrix).__name__
            raise InputError(f"{self.where}: unsupported matrix type {kind}; use numpy or scipy.sparse")
        self.matrix, self.dtype = matrix, matrix.dtype
        self.n_obs = adata.n_obs
        self.var_names = np.asarray(adata.var_names.astype(str), dtype=object)
        self.obs = adata.obs.copy()

    def nnz_offsets(self, lo: int, hi: int) -> np.ndarray | None:
        return self.matrix.indptr[lo : hi + 1] if sp.issparse(self.matrix) else None

    def read_values(self, a: int, b: int, data: np.ndarray, indices: np.ndarray) -> None:
        data[:] = self.matrix.data[a:b]
        indices[:] = self.matrix.indices[a:b]

    def read(self, lo: int, hi: int) -> sp.csr_matrix:
        return sp.csr_matrix(self.matrix[lo:hi])


class _FileShard(_Shard):
    """A ``.h5ad`` file read in row blocks; ``X`` (or the layer) is never loaded whole."""

    def __init__(self, path: str | os.PathLike, layer: str | None) -> None:
        self.source = str(path)
        self.key = "X" if layer is None else f"layers/{layer}"
        self.where = f"{self.source} ({self.key})"
        self._pid, self._file, self._readers, self._matrix = -1, None, None, None
        if not Path(path).is_file():
            raise FileNotFoundError(f"{self.source}: no such file")
        try:
            f = h5py.File(path, "r")
        except OSError as err:
            message = f"{self.source}: not an AnnData .h5ad file (cannot be opened as HDF5: {err})"
            raise FileFormatError(message) from err
        with f:
            for key in ("obs", "var"):
                if key not in f:
                    raise FileFormatError(f"{self.source}: not an AnnData .h5ad file (no {key!r} group)")
            if self.key not in f:
                layers = list(f["layers"]) if "layers" in f else []
                if layer is not None:
                    raise InputError(f"{self.source}: no layer {layer!r}; layers are {layers}")
                raise InputError(f"{self.source}: X is absent; pass layer=<name> (layers: {layers})")
            element = f[self.key]
            encoding = element.attrs.get("encoding-type", "array" if isinstance(element, h5py.Dataset) else "")
            if encoding in ("csr_matrix", "csc_matrix"):
                shape = tuple(int(s) for s in element.attrs["shape"])
                self.dtype = element["data"].dtype
            elif encoding == "array" and isinstance(element, h5py.Dataset) and element.ndim == 2:
                shape, self.dtype = element.shape, element.dtype
            else:
                message = f"{self.where}: unsupported matrix encoding {encoding!r}; expected CSR, CSC or dense"
                raise FileFormatError(message)
            self.is_csr = encoding == "csr_matrix"
            if encoding == "csc_matrix":
                warnings.warn(
                    f"{self.where} is stored as CSC: every row block read scans the whole matrix; "
                    "rewrite it as CSR for fast out-of-core reads",
                    UserWarning,
                    stacklevel=4,
                )
            obs, var = f["obs"], f["var"]
            obs_index = obs.get(obs.attrs.get("_index", "_index"))
            self._obs = None if isinstance(obs_index, h5py.Dataset) else read_elem(obs)  # read lazily when it can
            n_obs_meta = len(obs_index) if self._obs is None else len(self._obs)
            self.var_names = np.asarray(read_elem(var[var.attrs.get("_index", "_index")]), dtype=str).astype(object)
        self.n_obs = shape[0]
        if shape[1] != len(self.var_names) or shape[0] != n_obs_meta:
            raise FileFormatError(
                f"{self.where}: matrix shape {shape} does not match obs ({n_obs_meta}) x var ({len(self.var_names)})"
            )

    @property
    def obs(self) -> pd.DataFrame:
        if self._obs is None:
            with h5py.File(self.source, "r") as f:
                self._obs = read_elem(f["obs"])
        return self._obs

    def _open(self) -> None:
        """Open the file once per process (a forked DataLoader worker gets its own handles)."""
        if self._pid == os.getpid():
            return
        self._file = h5py.File(self.source, "r")
        element = self._file[self.key]
        if self.is_csr:
            self._readers = {k: _ArrayReader(element[k], self.source) for k in ("indptr", "data", "indices")}
        else:
            self._matrix = sparse_dataset(element) if isinstance(element, h5py.Group) else element
        self._pid = os.getpid()

    def nnz_offsets(self, lo: int, hi: int) -> np.ndarray | None:
        if not self.is_csr:
            return None
        self._open()
        offsets = np.empty(hi - lo + 1, dtype=self._readers["indptr"].dtype)
        self._readers["indptr"].read(lo, hi + 1, offsets)
        return offsets

    def read_values(self, a: int, b: int, data: np.ndarray, indices: np.ndarray) -> None:
        self._open()
        self._readers["data"].read(a, b, data)
        self._readers["indices"].read(a, b, indices)

    def read(self, lo: int, hi: int) -> sp.csr_matrix:
        self._open()
        return sp.csr_matrix(self._matrix[lo:hi])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_readers": None, "_matrix": None, "_pid": -1}

    def __del__(self) -> None:
        if self._readers is not None and self._pid == os.getpid():
            for reader in self._readers.values():
                reader.close()


def _validate(data: np.ndarray, indptr: np.ndarray, shard: _Shard, lo: int, *, counts: bool) -> None:
    """Raise :class:`InputError` naming the shard and rows on NaN/inf, negatives, or (``counts``) fractions.

    ``data`` are the stored values of rows ``lo:lo + len(indptr) - 1`` of ``shard``; ``indptr`` starts at 0.
    """
    if data.size == 0 or data.dtype.kind in "ub":
        return
    if data.dtype.kind == "i":
        if data.min() >= 0:
            return
        bad, what = data < 0, "negative values"
    else:
        bad, what = ~np.isfinite(data), "NaN or inf values"
        if not bad.any():
            bad, what = data < 0, "negative values"
        if not bad.any() and counts:
            bad, what = np.rint(data) != data, "non-integer values"
        if not bad.any():
            return
    first = int(np.argmax(bad))
    row = lo + int(np.searchsorted(indptr, first, side="right")) - 1
    message = f"{what} in {shard.where}, rows {lo}:{lo + len(indptr) - 1} (first at row {row}, value {data[first]!r})"
    if what != "NaN or inf values":
        message += (
            "; raw counts are expected: if the data are already log-normalised, "
            "open with counts_are_log_normalized=True"
            if counts
            else "; log-normalised data must be non-negative"
        )
    raise InputError(message)


def vstack_csr(blocks: list[sp.csr_matrix], n_genes: int) -> sp.csr_matrix:
    """Stack CSR blocks that share the column space (cheaper than scipy's generic vstack)."""
    if len(blocks) == 1:
        return blocks[0]
    nnz = np.cumsum([0] + [b.nnz for b in blocks])
    index_dtype = np.int32 if max(nnz[-1], n_genes) < 2**31 else np.int64
    indptr = np.concatenate([[0]] + [b.indptr[1:] + o for b, o in zip(blocks, nnz[:-1])]).astype(index_dtype)
    indices = np.concatenate([b.indices for b in blocks]).astype(index_dtype, copy=False)
    data = np.concatenate([b.data for b in blocks])
    return sp.csr_matrix((data, indices, indptr), shape=(int(sum(b.shape[0] for b in blocks)), n_genes))


def _shard_paths(data: str | os.PathLike | Sequence) -> list[Path]:
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.is_dir():
            paths = sorted(path.glob("*.h5ad"))
            if not paths:
                raise InputError(f"{path}: folder holds no .h5ad files")
            return paths
        return [path]
    paths = [Path(p) for p in data]
    if not paths:
        raise InputError("ExpressionDataset.open: empty list of paths")
    return paths


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
                    raise InputError("a view of a backed AnnData is not supported; pass the file path or .to_memory()")
                shards: list[_Shard] = [_FileShard(data.filename, layer)]
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
            for shard in shards[1:]:
                if not np.array_equal(shard.var_names, first.var_names):
                    raise GeneMismatchError(
                        f"shards {first.source} and {shard.source} have different genes (or gene order); "
                        "pass genes=<gene list> to align every shard to one list"
                    )
            return cls(shards, first.var_names, None, None, counts_are_log_normalized)
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
