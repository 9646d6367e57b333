"""Row sources for :class:`~sslcell.data.expression.ExpressionDataset`: in-memory AnnData and ``.h5ad`` shards.

A shard (:class:`_Shard`) exposes shape, gene names, ``obs`` and raw row blocks of one matrix: an in-memory
AnnData (:class:`_MemoryShard`) or a backed ``.h5ad`` file read in row blocks (:class:`_FileShard`, never loaded
whole). CSR files are read as element ranges straight into caller arrays (:class:`_ArrayReader`, one ``pread``
per run of adjacent chunks), into scratch arrays reused across reads (:class:`Workspace`). :func:`_validate`
checks stored values; :func:`vstack_csr` stacks CSR blocks that share their columns.
"""

from __future__ import annotations

import contextlib
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

from sslcell.errors import FileFormatError, InputError, SSLCellWarning

IN_MEMORY = "<AnnData>"

FLOAT32_MAX = float(np.finfo(np.float32).max)


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


def _empty(workspace: Workspace | None, key: str, n: int, dtype: np.dtype | type) -> np.ndarray:
    """``(n,)`` uninitialised array: fresh, or the ``key`` scratch array of ``workspace``."""
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
        for at, dest, n in zip(run_at.tolist(), run_out.tolist(), run_len.tolist(), strict=True):
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

    def n_stored(self) -> int | None:
        """How many values a sparse matrix stores (None for a dense one)."""
        return None

    def read(self, lo: int, hi: int) -> sp.csr_matrix:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        """Release open file handles (an in-memory shard holds none)."""


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
        self.matrix, self.dtype = matrix, _check_dtype(matrix.dtype, self.where)
        self.n_obs = adata.n_obs
        self.var_names = np.asarray(adata.var_names.astype(str), dtype=object)
        self.obs = adata.obs.copy()

    def nnz_offsets(self, lo: int, hi: int) -> np.ndarray | None:
        return self.matrix.indptr[lo : hi + 1] if sp.issparse(self.matrix) else None

    def read_values(self, a: int, b: int, data: np.ndarray, indices: np.ndarray) -> None:
        data[:] = self.matrix.data[a:b]
        indices[:] = self.matrix.indices[a:b]

    def n_stored(self) -> int | None:
        return len(self.matrix.data) if sp.issparse(self.matrix) else None

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
                    SSLCellWarning,
                    stacklevel=4,
                )
            obs, var = f["obs"], f["var"]
            obs_index = obs.get(obs.attrs.get("_index", "_index"))
            self._obs = None if isinstance(obs_index, h5py.Dataset) else read_elem(obs)  # read lazily when it can
            n_obs_meta = len(obs_index) if self._obs is None else len(self._obs)
            self.var_names = np.asarray(read_elem(var[var.attrs.get("_index", "_index")]), dtype=str).astype(object)
        _check_dtype(self.dtype, self.where)
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
        with self._reading(f"the row pointers of rows {lo}:{hi}"):
            self._readers["indptr"].read(lo, hi + 1, offsets)
        return offsets

    def read_values(self, a: int, b: int, data: np.ndarray, indices: np.ndarray) -> None:
        self._open()
        with self._reading(f"stored values {a}:{b}"):
            self._readers["data"].read(a, b, data)
            self._readers["indices"].read(a, b, indices)

    def read(self, lo: int, hi: int) -> sp.csr_matrix:
        self._open()
        with self._reading(f"rows {lo}:{hi}"):
            return sp.csr_matrix(self._matrix[lo:hi])

    def n_stored(self) -> int | None:
        if not self.is_csr:
            return None
        self._open()
        return len(self._readers["data"].dataset)

    @contextlib.contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        """HDF5's read errors (a damaged compressed chunk) as a :class:`FileFormatError` naming the file."""
        try:
            yield
        except OSError as err:
            if isinstance(err, FileFormatError):
                raise
            raise FileFormatError(f"{self.where}: cannot read {what} (damaged file: {err})") from None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_readers": None, "_matrix": None, "_pid": -1}

    def close(self) -> None:
        """Close this process's file handles; the next read reopens them."""
        if self._pid == os.getpid():
            for reader in (self._readers or {}).values():
                reader.close()
            if self._file is not None:
                self._file.close()
        self._pid, self._file, self._readers, self._matrix = -1, None, None, None

    def __del__(self) -> None:
        if self._readers is not None and self._pid == os.getpid():
            for reader in self._readers.values():
                reader.close()


def _check_dtype(dtype: np.dtype, where: str) -> np.dtype:
    """Integer, boolean (with a warning: read as 0 / 1), float32 or float64 values; anything else is refused with how
    to convert."""
    dtype = np.dtype(dtype)
    if dtype.kind == "b":  # a binarised matrix (peaks, detection calls) is a valid input, but never by accident
        from sslcell._warn import warn_user

        warn_user(f"{where}: boolean values are read as counts of 0 and 1; if X holds something else, convert it "
                  "first (e.g. adata.X = adata.X.astype('float32'))")
    if dtype.kind in "biu" or (dtype.kind == "f" and dtype.itemsize >= 4):
        return dtype
    raise InputError(f"{where}: values of dtype {dtype} are not supported; sslcell reads integer, float32 or float64 "
                     "counts (convert first, e.g. adata.X = adata.X.astype('float32'))")


def _check_pointers(shard: _Shard, lo: int, offsets: np.ndarray) -> None:
    """Raise :class:`FileFormatError` naming the shard and rows where the row pointers ``offsets`` of rows
    ``lo:lo + len(offsets) - 1`` decrease: a damaged file, whose rows would be read as other cells' counts."""
    stored = shard.n_stored()
    if stored is not None and len(offsets) and (offsets[0] < 0 or offsets[-1] > stored):
        raise FileFormatError(f"{shard.where}: damaged sparse matrix, its row pointers for rows {lo}:"
                              f"{lo + len(offsets) - 1} run outside its {stored} stored values; the file cannot be "
                              "read as counts")
    falls = np.diff(offsets) < 0
    if falls.any():
        raise FileFormatError(f"{shard.where}: damaged sparse matrix, its row pointers decrease at row "
                              f"{lo + int(np.argmax(falls))} (rows {lo}:{lo + len(offsets) - 1}); the file cannot "
                              "be read as counts")


def _check_indices(shard: _Shard, lo: int, hi: int, indices: np.ndarray) -> None:
    """Raise :class:`FileFormatError` naming the shard and rows ``lo:hi`` where column ``indices`` fall outside the
    shard's genes: a damaged file, whose values would be read as other genes' counts."""
    n_genes = len(shard.var_names)
    if indices.size and (indices.min() < 0 or indices.max() >= n_genes):
        raise FileFormatError(f"{shard.where}: damaged sparse matrix, column indices outside 0..{n_genes - 1} in "
                              f"rows {lo}:{hi} (min {indices.min()}, max {indices.max()}); the file cannot be read "
                              "as counts")


def _validate(data: np.ndarray, indptr: np.ndarray, shard: _Shard, lo: int, *, counts: bool) -> None:
    """Raise :class:`InputError` naming the shard and rows on NaN/inf, negatives, (``counts``) fractions, or (not
    ``counts``: read as log-normalised) whole numbers above 1 only, which are raw counts (log1p values are not).

    ``data`` are the stored values of rows ``lo:lo + len(indptr) - 1`` of ``shard``; ``indptr`` starts at 0.
    """
    if data.size == 0 or data.dtype.kind == "b" or (counts and data.dtype.kind == "u"):
        return
    integer = data.dtype.kind in "ui"
    if integer:
        negative = data.dtype.kind == "i" and data.min() < 0
        bad, what = (data < 0 if negative else np.zeros(0, dtype=bool)), "negative values"
    else:
        bad, what = ~np.isfinite(data), "NaN or inf values"
        if not bad.any() and data.dtype.itemsize > 4:  # float64 beyond float32's range would be inf in the model
            bad, what = np.abs(data) > FLOAT32_MAX, "values beyond float32's range (|x| > 3.4e38)"
        if not bad.any():
            bad, what = data < 0, "negative values"
        if not bad.any() and counts:
            bad, what = np.rint(data) != data, "non-integer values"
    if not bad.any() and not counts and data.max() > 1 and (integer or (np.rint(data) == data).all()):
        bad, what = data > 1, "whole numbers only"
    if not bad.any():
        return
    first = int(np.argmax(bad))
    row = lo + int(np.searchsorted(indptr, first, side="right")) - 1
    message = (f"{what} in {shard.where}, rows {lo}:{lo + len(indptr) - 1} (first at row {row}, value "
               f"{data[first].item()!r})")
    if what == "whole numbers only":
        message += ("; these look like raw counts, but they are read as log-normalised (counts_are_log_normalized="
                    "True, or a model trained on log-normalised inputs): log-normalise them as its inputs were, or "
                    "read them as raw counts (counts_are_log_normalized=False; no --counts-are-log-normalized)")
    elif what.startswith("negative") or what.startswith("non-integer"):
        message += (
            "; raw counts are expected: if the data are already log-normalised, "
            "open with counts_are_log_normalized=True"
            if counts
            else "; log-normalised data must be non-negative"
        )
    raise InputError(message)


def vstack_csr(blocks: list[sp.csr_matrix], n_genes: int) -> sp.csr_matrix:
    """Stack CSR blocks ``(n_i, n_genes)`` that share the column space -> ``(sum n_i, n_genes)``.

    Cheaper than scipy's generic vstack; a single block is returned as is.
    """
    if len(blocks) == 1:
        return blocks[0]
    nnz = np.cumsum([0] + [b.nnz for b in blocks])
    index_dtype = np.int32 if max(nnz[-1], n_genes) < 2**31 else np.int64
    shifted = [b.indptr[1:] + o for b, o in zip(blocks, nnz[:-1], strict=True)]
    indptr = np.concatenate([[0]] + shifted).astype(index_dtype)
    indices = np.concatenate([b.indices for b in blocks]).astype(index_dtype, copy=False)
    data = np.concatenate([b.data for b in blocks])
    return sp.csr_matrix((data, indices, indptr), shape=(int(sum(b.shape[0] for b in blocks)), n_genes))


def _shard_paths(data: str | os.PathLike | Sequence) -> list[Path]:
    """A ``.h5ad`` path, a folder (its ``*.h5ad`` in name order) or a list of paths -> the shard paths."""
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
    folders = [str(p) for p in paths if p.is_dir()]
    if folders:
        raise InputError(f"{folders[0]}: a folder inside a list of .h5ad files; give the folder alone (its .h5ad "
                         "files are read in name order) or list its files")
    return paths
