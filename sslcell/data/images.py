"""Multi-channel cell crops ``(N, C, H, W)`` with channel names and a per-cell ``obs`` table.

Microscopy is not RGB: a crop has 1 to 6+ channels (brightfield, DIC, darkfield, fluorescence) stored as
``uint8`` or ``uint16`` at full range, or as ``float32`` (finite values only). Other dtypes are refused rather
than silently converted. Large sets stay on disk: an uncompressed ``.npz`` member is memory-mapped and a zarr
array is read chunk by chunk; selecting cells or channels only composes indices (:class:`LazyImages`), and
pixels are read when a batch is asked for.

:meth:`CellImages.read` reads ``.npz``, zarr and folders of TIFF / PNG crops; the readers and the file formats
are in :mod:`sslcell.data.image_readers`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# CROP_SUFFIXES: compatibility re-export (kept for one release); it now lives in sslcell.data.image_readers
from sslcell.data.image_readers import CROP_SUFFIXES as CROP_SUFFIXES
from sslcell.data.image_readers import read_raw_cells
from sslcell.errors import ChannelMismatchError, FileFormatError, InputError

SUPPORTED_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))


PIXEL_SAMPLE = 8  # cells whose pixels an AnnData made from crops keeps hashes of (to_anndata)


class ChannelText(str):
    """A channel given as text on the command line (``--channels 1,2``): the name of a channel where the crops have
    one of that name, else an index where it is a whole number. Text that is both a channel's name and another
    channel's index is refused as ambiguous (the CLI's ``name:1`` / ``index:1`` say which)."""

    def resolve(self, names: Sequence[str]) -> int | str:
        """This channel among channels ``names``: its name (str) or its index (int)."""
        names = list(names)
        number = self.lstrip("-").isdigit()
        if self not in names:
            return int(self) if number else str(self)
        if number and 0 <= int(self) < len(names) and names[int(self)] != self:
            raise ChannelMismatchError(
                f"channel {str(self)!r} is ambiguous: the name of channel {names.index(self)} and the index of "
                f"channel {int(self)} ({names[int(self)]!r}); write name:{self} or index:{self}")
        return str(self)


class LazyImages:
    """A read-on-demand view ``(N, C, H, W)`` of an on-disk array (``np.memmap``, zarr, h5py dataset).

    ``cells`` (N,) and ``channels`` (C,) index the source; :meth:`take` composes further selections without
    reading. Indexing (``view[idx]``) reads the rows and returns a fresh ``ndarray``: one fancy index for a
    memmap; sorted unique rows (chunk locality), then reordered, for zarr / h5py. Pickling a memmap-backed view
    stores the file mapping, not the pixels (cheap for loader workers).
    """

    def __init__(self, source: Any, cells: np.ndarray | None = None, channels: np.ndarray | None = None,
                 where: str = "the image store"):
        self.source = source
        self.where = where  # named in read errors (the file the pixels come from)
        n, c = source.shape[0], source.shape[1]
        self.cells = np.arange(n, dtype=np.intp) if cells is None else np.asarray(cells, dtype=np.intp)
        self.channels = np.arange(c, dtype=np.intp) if channels is None else np.asarray(channels, dtype=np.intp)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.cells), len(self.channels), *self.source.shape[2:4])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.source.dtype)

    ndim = 4

    def __len__(self) -> int:
        return len(self.cells)

    def take(self, cells: Any = slice(None), channels: Any = slice(None)) -> LazyImages:
        """Sub-view: ``cells`` / ``channels`` index this view (int arrays, bool masks or slices); nothing is read."""
        return LazyImages(self.source, self.cells[cells], self.channels[channels], self.where)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        rows = self.cells[key[0]]
        out = self._read(np.atleast_1d(rows))
        out = out[0] if np.ndim(rows) == 0 else out
        rest = key[1:]
        return out[(slice(None), *rest) if np.ndim(rows) else rest] if rest else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self._read(self.cells)
        return out if dtype is None else out.astype(dtype, copy=False)

    def _read(self, rows: np.ndarray) -> np.ndarray:
        """Rows (any order, repeats allowed) of the source -> ``(len(rows), C, H, W)`` ndarray (a fresh copy)."""
        if rows.size == 0:
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        all_channels = np.array_equal(self.channels, np.arange(self.source.shape[1]))
        if isinstance(self.source, np.ndarray):  # memmap: one fancy-index copy, any row order
            out = self.source[rows] if all_channels else self.source[rows[:, None], self.channels]
            return np.asarray(out)
        # zarr / h5py: read sorted unique rows (chunk locality; h5py needs increasing indices), then reorder
        uniq, inverse = np.unique(rows, return_inverse=True)
        key = slice(uniq[0], uniq[-1] + 1) if uniq[-1] - uniq[0] + 1 == len(uniq) else uniq
        try:
            if hasattr(self.source, "oindex"):  # zarr: orthogonal read of the rows and only the selected channels
                block = np.asarray(self.source.oindex[key] if all_channels else
                                   self.source.oindex[key, self.channels])
            elif all_channels:
                block = np.asarray(self.source[key])
            else:  # h5py and others: read whole cells, then drop channels
                block = np.asarray(self.source[key])[:, self.channels]
        except Exception as err:  # a damaged chunk: the codec's own error names neither the file nor the cells
            source_id = getattr(self.source, "id", None)
            if source_id is not None and hasattr(source_id, "valid") and not source_id.valid:
                raise InputError(f"{self.where}: its HDF5 file was closed; keep it open while the crops are used "
                                 "(or read them into memory: np.asarray(dataset))") from None
            raise FileFormatError(f"{self.where}: cannot read the crops at positions {uniq[0]}-{uniq[-1]} "
                                  f"({type(err).__name__}: {err}); the file is damaged or incomplete") from err
        return block if np.array_equal(inverse, np.arange(len(uniq))) else block[inverse]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        src = self.source
        if isinstance(src, np.memmap) and src.filename is not None:  # pickle the mapping, not the pixels
            order = "F" if src.flags.f_contiguous and not src.flags.c_contiguous else "C"
            state["source"] = ("memmap", str(src.filename), src.offset, src.dtype.str, src.shape, order)
        return state

    def __setstate__(self, state: dict) -> None:
        src = state["source"]
        if isinstance(src, tuple) and src and src[0] == "memmap":
            _, filename, offset, dtype, shape, order = src
            state["source"] = np.memmap(filename, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"LazyImages(shape={self.shape}, dtype={self.dtype}, source={type(self.source).__name__})"


class CellImages:
    """N cell crops ``(N, C, H, W)`` (uint8 | uint16 | float32) with channel names and a per-cell ``obs`` table.

    ``images`` is an in-memory ``ndarray`` or a :class:`LazyImages` view of an on-disk array; it is never
    forced into memory (use :meth:`batch` or ``np.asarray(images)``). ``obs`` has one row per cell, indexed by
    cell ids (strings), with labels and metadata columns. ``source`` names where the crops came from.
    """

    def __init__(self, images: Any, channel_names: Sequence[str], obs: pd.DataFrame, source: str = "array"):
        self.images = images
        self.channel_names = list(channel_names)
        self.obs = obs
        self.source = source

    # ----------------------------------------------------------------------------------------------- building
    @classmethod
    def from_array(
        cls,
        images: Any,
        *,
        channel_names: Sequence[str] | None = None,
        obs: pd.DataFrame | None = None,
        labels: Any = None,
        source: str = "array",
    ) -> CellImages:
        """Validate and wrap ``images`` ``(N, C, H, W)``: an ndarray, a ``np.memmap`` or zarr / h5py array.

        ``labels`` (N,) becomes the categorical ``obs["label"]``; ``obs`` (N rows) is copied and its index
        turned into strings (default ids ``"0" .. "N-1"``). On-disk arrays are wrapped in :class:`LazyImages`.
        Float32 crops are checked for NaN / inf here when in memory, and batch by batch when on disk.
        """
        if type(images).__module__.split(".")[0] == "torch":  # a tensor: its dtype is not numpy's
            images = images.detach().cpu().numpy()
        if source == "array" and type(images).__module__.split(".")[0] == "h5py":  # name the file in errors
            source = f"{images.file.filename}:{images.name}"
        if not (hasattr(images, "shape") and hasattr(images, "dtype")):
            try:
                images = np.asarray(images)
            except ValueError as err:  # a ragged list of crops
                raise InputError(f"images: cannot stack them into one (N, C, H, W) array ({err}); every crop "
                                 "needs the same channels and size") from None
        shape = tuple(int(s) for s in images.shape)
        if len(shape) != 4:
            hint = " (for single-channel crops (N, H, W) use images[:, None])" if len(shape) == 3 else ""
            raise InputError(f"images must be 4-D (N, C, H, W); got shape {shape}{hint}")
        if 0 in shape:
            what = "no cells (N = 0)" if shape[0] == 0 else f"a zero-sized axis in shape {shape}"
            raise InputError(f"images is empty: {what}")
        if shape[3] <= 4 < shape[1] == shape[2]:  # (N, H, W, C): C crops H pixels high and C wide otherwise
            raise InputError(f"images of shape {shape} look channels-last (N, H, W, C) = {shape[3]} channels of "
                             f"{shape[1]} x {shape[2]} px; sslcell reads (N, C, H, W): np.moveaxis(images, -1, 1)")
        dtype = np.dtype(images.dtype)
        if dtype not in SUPPORTED_DTYPES and dtype.newbyteorder("=") in SUPPORTED_DTYPES:
            raise InputError(f"images are {dtype.name} stored big-endian ({dtype.str}); sslcell reads native byte "
                             f"order: convert them, e.g. images.astype('{dtype.newbyteorder('=').str}')")
        if dtype not in SUPPORTED_DTYPES:
            raise InputError(
                f"images dtype {dtype} is not supported; use uint8 or uint16 (raw intensities, full range) or "
                f"float32 (e.g. images.astype(np.uint16) or .astype(np.float32))"
            )
        if isinstance(images, np.ndarray) and not isinstance(images, np.memmap):
            if dtype.kind == "f":
                _check_finite(images, "images")
        elif not isinstance(images, LazyImages):
            images = LazyImages(images, where=source)
        names = _channel_names(channel_names, shape[1])
        obs = _make_obs(obs, labels, shape[0])
        return cls(images, names, obs, source=source)

    @classmethod
    def read(
        cls,
        path: str | Path,
        *,
        channels: Sequence[int | str] | int | str | None = None,
        label_key: str | None = None,
    ) -> CellImages:
        """Read crops from an ``.npz``, a zarr array / group or a folder of TIFF / PNG crops.

        Formats: :mod:`sslcell.data.image_readers`. ``channels``: indices or names to keep (the selection stays
        lazy). ``label_key``: the per-cell array (npz / zarr) or ``obs.csv`` column (folder) holding the labels;
        it becomes the categorical ``label``.
        """
        raw = read_raw_cells(Path(path), label_key)
        try:
            cells = CellImages.from_array(raw.images, channel_names=raw.channel_names, obs=raw.obs, source=raw.source)
        except InputError as err:  # name the file the bad array came from
            if str(err).startswith(raw.source):
                raise
            raise type(err)(f"{raw.source}: {err}") from None
        return cells if channels is None else cells.select_channels(channels)

    # ------------------------------------------------------------------------------------------- selections
    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(N, C, H, W)``."""
        return tuple(int(s) for s in self.images.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.images.dtype)

    @property
    def n_channels(self) -> int:
        return len(self.channel_names)

    @property
    def unnamed_channels(self) -> bool:
        """Whether the crops came without channel names (the placeholders ``channel_<k>``)."""
        return placeholder_names(self.channel_names)

    def rename_channels(self, names: Sequence[str]) -> CellImages:
        """The same crops with ``names`` ``(C,)`` as their channel names."""
        return CellImages(self.images, _channel_names(names, self.n_channels), self.obs, self.source)

    def channel_index(self, channels: Sequence[int | str] | int | str) -> list[int]:
        """Indices (``0..C-1``; negative ones are refused) or names -> channel indices; raises
        :class:`ChannelMismatchError` listing what exists."""
        items = [channels] if isinstance(channels, (int, np.integer, str)) else list(channels)
        n = len(self.channel_names)
        available = ", ".join(f"{i}: {name!r}" for i, name in enumerate(self.channel_names))
        index = []
        for item in items:
            if isinstance(item, ChannelText):
                item = item.resolve(self.channel_names)
            if isinstance(item, str):
                if item not in self.channel_names:
                    raise ChannelMismatchError(f"unknown channel name {item!r}; available channels: {available}")
                index.append(self.channel_names.index(item))
            elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
                if item < 0:  # a position counted from the end is too easy to get wrong for a channel
                    raise ChannelMismatchError(
                        f"channel index {item}: negative indices are not accepted; give 0..{n - 1} or a name "
                        f"(available channels: {available})"
                    )
                if item >= n:
                    raise ChannelMismatchError(
                        f"channel index {item} out of range for {n} channels; available channels: {available}"
                    )
                index.append(int(item))
            else:
                raise ChannelMismatchError(f"channel selector {item!r} is neither an index nor a name")
        if not index:
            raise ChannelMismatchError(f"empty channel selection; available channels: {available}")
        dup = [self.channel_names[i] for i in set(index) if index.count(i) > 1]
        if dup:
            raise ChannelMismatchError(f"channel(s) {dup} selected more than once")
        return index

    def select_channels(self, channels: Sequence[int | str] | int | str) -> CellImages:
        """Keep ``channels`` (indices or names, in the given order); lazy for on-disk arrays."""
        index = self.channel_index(channels)
        images = self.images.take(channels=index) if isinstance(self.images, LazyImages) else self.images[:, index]
        return CellImages(images, [self.channel_names[i] for i in index], self.obs, self.source)

    def __getitem__(self, idx: Any) -> CellImages:
        """Subset of cells: an int, slice, int array, bool mask (N,) or cell ids (strings); lazy when on disk."""
        rows = self._rows(idx)
        images = self.images.take(cells=rows) if isinstance(self.images, LazyImages) else self.images[rows]
        return CellImages(images, self.channel_names, self.obs.iloc[rows], self.source)

    def _rows(self, idx: Any) -> np.ndarray | slice:
        n = len(self)
        if isinstance(idx, slice):
            return idx
        if isinstance(idx, tuple):
            raise InputError("cells[...] selects cells with one index (rows, a mask or ids); select channels with "
                             "select_channels")
        if isinstance(idx, (int, np.integer)):
            idx = [idx]
        if isinstance(idx, pd.Series) and pd.api.types.is_bool_dtype(idx.dtype):
            idx = self._aligned_mask(idx)
        boolean = pd.api.types.is_bool_dtype(getattr(idx, "dtype", None))  # numpy or pandas' nullable boolean
        if boolean and pd.isna(idx).any():
            raise InputError("boolean cell mask holds missing values (NA); fill them (e.g. mask.fillna(False))")
        idx = np.asarray(idx, dtype=bool) if boolean else np.asarray(idx)
        if idx.dtype.kind in "UO":
            rows = self.obs.index.get_indexer(idx.astype(str))
            if (rows < 0).any():
                raise InputError(f"unknown cell id(s) {idx[rows < 0][:5].tolist()}")
            return rows
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise InputError(f"boolean cell mask has shape {idx.shape}; expected ({n},)")
            return np.flatnonzero(idx)
        if idx.dtype.kind not in "iu" or idx.ndim != 1:
            raise InputError(f"cell index must be 1-D integers, booleans or ids; got {idx.dtype} {idx.shape}")
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"cell index out of range for {n} cells (min {idx.min()}, max {idx.max()})")
        return idx % n if idx.size and idx.min() < 0 else idx

    def _aligned_mask(self, mask: pd.Series) -> pd.Series:
        """A boolean Series selects by its index, as in pandas: reordered to the cells' ids (compared as strings)."""
        index = mask.index.astype(str)
        if index.equals(self.obs.index):
            return mask
        if index.has_duplicates or len(index) != len(self) or not index.isin(self.obs.index).all():
            raise InputError(f"boolean cell mask: its index is not these {len(self)} cells' ids (e.g. "
                             f"{list(mask.index[:3])} against {list(self.obs.index[:3])}); select by position with "
                             "mask.to_numpy()")
        return pd.Series(mask.to_numpy(), index=index).reindex(self.obs.index)

    def batch(self, idx: np.ndarray) -> np.ndarray:
        """Cells ``idx`` (B,) -> ``(B, C, H, W)`` ndarray in the original dtype (for the loader)."""
        rows = self._rows(idx)
        out = np.asarray(self.images[rows])
        if out.dtype.kind == "f" and isinstance(self.images, LazyImages):
            _check_finite(out, str(self.source), ids=self.obs.index[rows])
        return out

    # ------------------------------------------------------------------------------------------- exports
    def to_anndata(self):
        """One row per cell: ``obs``; ``X`` empty ``(N, 0)`` float32; ``uns["sslcell_images"]`` describes the crops."""
        import anndata as ad

        adata = ad.AnnData(X=np.zeros((len(self), 0), dtype=np.float32), obs=self.obs.copy())
        adata.uns["sslcell_images"] = {
            "channel_names": list(self.channel_names),
            "shape": list(self.shape),
            "dtype": str(self.dtype),
            "source": str(self.source),
        }
        if len(self) and self.obs.index.is_unique:
            # a few cells' pixels, per channel: crops passed later with these rows are checked to be these crops
            ids = list(self.obs.index[np.unique(np.linspace(0, len(self) - 1, PIXEL_SAMPLE).astype(int))])
            adata.uns["sslcell_images"]["pixel_sample"] = {"cells": ids, "digests": self.pixel_digests(ids)}
        return adata

    def pixel_digests(self, ids: Sequence[str]) -> list[list[str]]:
        """Short hashes of the pixels of cells ``ids``, one per channel: ``[cell][channel]``."""
        crops = self.batch(np.asarray(ids, dtype=str))
        return [[hashlib.blake2b(np.ascontiguousarray(channel).tobytes(), digest_size=8).hexdigest()
                 for channel in crop] for crop in crops]

    def channel_stats(self, max_cells: int = 10000, seed: int = 0, batch_size: int = 1024) -> dict:
        """Per-channel mean / std (float64, population std) over a random subset of ``max_cells`` cells.

        JSON-ready for checkpoints: ``{"channel_names", "mean", "std", "n_cells", "seed", "dtype"}``. Reads in
        batches and merges (count, mean, M2) per batch (Chan et al.), so uint16 data loses no precision.
        """
        n = len(self)
        rows = np.arange(n) if max_cells >= n else np.sort(np.random.default_rng(seed).choice(n, max_cells, False))
        count, mean, m2 = 0, np.zeros(self.shape[1]), np.zeros(self.shape[1])
        for start in range(0, len(rows), batch_size):
            x = self.batch(rows[start : start + batch_size]).astype(np.float64)
            x = x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1)  # (C, B*H*W)
            k, batch_mean = x.shape[1], x.mean(axis=1)
            batch_m2 = ((x - batch_mean[:, None]) ** 2).sum(axis=1)
            delta = batch_mean - mean
            mean = mean + delta * k / (count + k)
            m2 = m2 + batch_m2 + delta**2 * count * k / (count + k)
            count += k
        return {
            "channel_names": list(self.channel_names),
            "mean": mean.tolist(),
            "std": np.sqrt(m2 / count).tolist(),
            "n_cells": int(len(rows)),
            "seed": int(seed),
            "dtype": str(self.dtype),
        }

    def __repr__(self) -> str:
        kind = "lazy" if isinstance(self.images, LazyImages) else "in memory"
        return (
            f"CellImages({len(self)} cells, {self.shape[1]} channels {self.channel_names}, "
            f"{self.shape[2]}x{self.shape[3]} {self.dtype}, {kind}, obs columns {list(self.obs.columns)})"
        )


# ---------------------------------------------------------------------------------------------- validation
def _check_finite(images: np.ndarray, where: str, ids: pd.Index | None = None, chunk: int = 4096) -> None:
    """Refuse NaN / inf in ``images`` (N, C, H, W), naming the first cells that hold them: their ``ids`` (the
    cells' obs index) where given, else their rows."""
    for start in range(0, len(images), chunk):
        bad = ~np.isfinite(images[start : start + chunk]).reshape(min(chunk, len(images) - start), -1).all(axis=1)
        if bad.any():
            rows = start + np.flatnonzero(bad)
            which = f"cell(s) {list(ids[rows[:5]])}" if ids is not None else f"row(s) {rows[:5].tolist()}"
            raise InputError(f"{where}: NaN or inf in {which}")


def _channel_names(names: Sequence[str] | None, n_channels: int) -> list[str]:
    if names is None:
        return [f"channel_{i}" for i in range(n_channels)]
    names = [str(x) for x in names]
    if len(names) != n_channels:
        raise InputError(f"{len(names)} channel_names {names} for {n_channels} channels")
    if len(set(names)) != len(names):
        raise InputError(f"channel_names must be unique; got {names}")
    return names


def _make_obs(obs: pd.DataFrame | None, labels: Any, n: int) -> pd.DataFrame:
    if obs is None:
        obs = pd.DataFrame(index=pd.Index([str(i) for i in range(n)]))
    else:
        if len(obs) != n:
            raise InputError(f"obs has {len(obs)} rows for {n} cells")
        obs = obs.copy()
        obs.index = pd.Index([str(i) for i in obs.index])
        if obs.index.has_duplicates:
            raise InputError(f"obs index (cell ids) has duplicates: {list(obs.index[obs.index.duplicated()][:5])}")
    if labels is not None:
        if isinstance(labels, pd.Series):
            labels = _aligned_labels(labels, obs.index)
        if not isinstance(labels, pd.Categorical):
            labels = np.asarray(labels)
            if labels.ndim != 1:
                raise InputError(f"labels must be 1-D, one per cell (N,); got shape {labels.shape}")
            labels = pd.Categorical(labels)
        if len(labels) != n:
            raise InputError(f"labels has {len(labels)} entries for {n} cells")
        if "label" in obs.columns:
            raise InputError("labels given and obs already has a 'label' column; give one of them")
        obs["label"] = labels
    return obs


def _aligned_labels(labels: pd.Series, ids: pd.Index) -> Any:
    """A Series of labels in the cells' order: by its index when that holds the cell ids (as ``obs[...] = series``
    aligns), by position when it is the default 0..N-1; any other index is refused rather than guessed."""
    index = pd.Index([str(i) for i in labels.index])
    if index.equals(ids) or not isinstance(labels.index, pd.RangeIndex) and set(index) == set(ids):
        if index.has_duplicates:
            raise InputError(f"labels: its index repeats cell ids {list(index[index.duplicated()][:5])}")
        values = labels.copy()
        values.index = index
        return values.reindex(ids).array
    if isinstance(labels.index, pd.RangeIndex) and labels.index.equals(pd.RangeIndex(len(ids))):
        return labels.array
    raise InputError(f"labels: a Series whose index is neither the cell ids (e.g. {list(ids[:3])}) nor 0..N-1; "
                     "index it by cell id, or pass labels.to_numpy() to take them in order")


def placeholder_names(names: Sequence[str]) -> bool:
    """Whether channel ``names`` are all placeholders ``channel_<k>`` (crops stored without channel names): they
    name positions, not stains."""
    return all(re.fullmatch(r"channel_\d+", name) for name in names)
