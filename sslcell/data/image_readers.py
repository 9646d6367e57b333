"""Readers for cell crops on disk: ``.npz`` (memory-mapped when uncompressed), zarr, and folders of TIFF / PNG crops.

Each reader returns :class:`RawCells` (pixels ``(N, C, H, W)`` as an ndarray, ``np.memmap`` or zarr array, channel
names and a per-cell ``obs``), not yet validated: :meth:`sslcell.data.images.CellImages.read` validates and wraps them.

* ``.npz``: key ``images`` ``(N, C, H, W)``; optional ``channel_names`` ``(C,)``; per-cell arrays become ``obs``
  columns (1-D of length ``N``, or ``(N, k)`` with ``k <= 16`` split into ``key_0 .. key_{k-1}``); the label
  array (``labels`` / ``label`` or ``label_key``) becomes the categorical column ``label``, named through
  ``label_names`` ``(K,)`` when given (integer code ``-1`` = unlabelled, with or without names); ``cell_id``
  ``(N,)``, if present, is the index. Object (pickled) arrays are never unpickled: a label array of that kind is
  refused, naming it, any other skipped with a warning.
  Scalars (e.g. ``description``) are skipped; a compressed ``images`` member is decompressed into memory.
* zarr: an array ``(N, C, H, W)``, or a group with an ``images`` array and per-cell arrays as above;
  ``channel_names`` / ``label_names`` from the attributes (or arrays of the group).
* a folder of ``.tif`` / ``.tiff`` / ``.png`` crops, one file per cell, at the top level or in class subfolders
  (subfolder name -> ``label``). A 2-D crop is one channel. A 3-D PNG is ``(H, W, C)`` (PIL). A 3-D TIFF is
  ``(C, H, W)`` or ``(H, W, C)``, whichever leaves a square ``H x W`` (so a 40-channel 32 x 32 crop reads
  correctly either way); when both or neither do, the shorter of the first and last axes is the channel axis (ties:
  ``(C, H, W)``) and a warning says how many crops were read by that fallback: store such crops as ``.npz`` or
  zarr ``(N, C, H, W)`` to make the layout explicit. An optional ``obs.csv`` (first column: file name relative to
  the folder, with or without suffix) adds columns; ``label_key`` then names the column to use as ``label`` (the
  subfolder name, if any, moves to ``folder``). A folder is read into memory: convert large sets to zarr or
  uncompressed npz.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import pandas as pd

from sslcell._warn import warn_user
from sslcell.errors import FileFormatError, InputError

CROP_SUFFIXES = (".tif", ".tiff", ".png")
_MAX_SPLIT_COLUMNS = 16  # (N, k) per-cell arrays with k up to this are split into obs columns
_ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")


class RawCells(NamedTuple):
    """What a reader found, before validation (:meth:`sslcell.data.images.CellImages.from_array`).

    ``images``: ``(N, C, H, W)`` ndarray, ``np.memmap`` or zarr array; ``channel_names``: ``C`` names or ``None``;
    ``obs``: one row per cell (``None`` when ``N == 0``); ``source``: the path, for messages.
    """

    images: Any
    channel_names: list[str] | None
    obs: pd.DataFrame | None
    source: str


def is_zarr_store(path: Path) -> bool:
    """Whether ``path`` is read as a zarr store: a folder named ``*.zarr`` or holding a zarr marker file."""
    return path.is_dir() and (path.suffix == ".zarr" or any((path / m).exists() for m in _ZARR_MARKERS))


def read_raw_cells(path: Path, label_key: str | None) -> RawCells:
    """Dispatch on the path: ``.npz`` file, zarr store (``.zarr`` or a zarr marker file), or a folder of crops."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file() and path.suffix.lower() == ".npz":
        return _read_npz(path, label_key)
    if is_zarr_store(path):
        return _read_zarr(path, label_key)
    if path.is_dir():
        return _read_folder(path, label_key)
    raise FileFormatError(
        f"{path}: unsupported format; expected a .npz file, a zarr store or a folder of "
        f"{'/'.join(CROP_SUFFIXES)} crops"
    )


# ------------------------------------------------------------------------------------------ per-cell arrays
def _label_column(values: np.ndarray, names: np.ndarray | None, where: str) -> pd.Categorical:
    """Integer codes + ``names`` (K,) -> categorical with those names; else the values as categories. Integer code
    ``-1`` is unlabelled (missing) either way."""
    if names is None:
        if values.dtype.kind == "i":  # -1: unlabelled, as with names (not a class of its own)
            return pd.Categorical(values, categories=np.unique(values[values != -1]))
        return pd.Categorical(values)
    names = [str(x) for x in np.asarray(names).ravel()]
    if values.dtype.kind not in "iu":
        raise InputError(f"{where}: label_names given but labels are {values.dtype}, not integer codes")
    bad = (values < -1) | (values >= len(names))
    if bad.any():
        raise InputError(
            f"{where}: label code {values[bad][0]} (cell {np.flatnonzero(bad)[0]}) outside 0..{len(names) - 1} "
            f"for label_names {names}"
        )
    return pd.Categorical.from_codes(values.astype(np.int64), categories=names)


def _cells_from_arrays(
    images: Any, arrays: dict[str, np.ndarray], attrs: dict, label_key: str | None, source: str
) -> RawCells:
    """``images`` plus named side arrays (npz members / zarr group arrays) -> :class:`RawCells`.

    ``attrs`` supplies ``channel_names`` / ``label_names`` when no array of that name exists.
    """
    n = int(images.shape[0]) if len(images.shape) else 0
    channel_names = arrays.pop("channel_names", attrs.get("channel_names"))
    label_names = arrays.pop("label_names", attrs.get("label_names"))
    if label_key is not None and label_key not in arrays:
        raise InputError(f"{source}: label_key {label_key!r} not found; per-cell arrays: {sorted(arrays)}")
    key = label_key or next((k for k in ("labels", "label") if k in arrays), None)
    columns: dict[str, Any] = {}
    for name, values in arrays.items():
        values = np.asarray(values)
        if values.dtype.kind in "OT":
            values = values.astype(str)
        if name == key:
            if values.shape != (n,):
                raise InputError(f"{source}: labels {name!r} has shape {values.shape} for {n} cells")
            # label_names decode integer codes; a string label array is already named
            names_for = label_names if values.dtype.kind in "iu" else None
            columns["label"] = _label_column(values, names_for, f"{source}: {name!r}")
        elif values.ndim == 1 and len(values) == n:
            columns[name] = values
        elif values.ndim == 2 and len(values) == n and values.shape[1] <= _MAX_SPLIT_COLUMNS:
            columns.update({f"{name}_{j}": values[:, j] for j in range(values.shape[1])})
        elif values.ndim > 0:
            warn_user(f"{source}: array {name!r} with shape {values.shape} is not per-cell; skipped")
    ids = columns.pop("cell_id", None)
    index = pd.Index([str(i) for i in (ids if ids is not None else range(n))])
    obs = pd.DataFrame(columns, index=index) if n else None
    names = None if channel_names is None else [str(x) for x in np.asarray(channel_names).ravel()]
    return RawCells(images, names, obs, source)


# ----------------------------------------------------------------------------------------------------- npz
def _npy_header(fp: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of the ``.npy`` stream ``fp``; leaves ``fp`` at the array data."""
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)
    return np.lib.format.read_array_header_2_0(fp)


def _npz_memmap(path: Path, zf: zipfile.ZipFile, member: str) -> np.memmap | None:
    """Memory-map an npz member stored uncompressed; ``None`` when it is compressed (then load it)."""
    info = zf.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        return None
    with open(path, "rb") as fp:
        fp.seek(info.header_offset)
        local = fp.read(30)
        if local[:4] != b"PK\x03\x04":
            raise FileFormatError(f"{path}: bad zip local header for member {member!r}")
        name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        fp.seek(info.header_offset + 30 + name_len + extra_len)  # local extra field may differ from the central one
        start = fp.tell()
        shape, fortran, dtype = _npy_header(fp)
        offset = fp.tell()
    if dtype.hasobject or 0 in shape:
        return None
    _check_crc(path, member, start, info.file_size, info.CRC)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


_VERIFIED: dict[tuple[str, str, int, int], bool] = {}  # (file, member, size, mtime_ns): checked in this process


def _check_crc(path: Path, member: str, start: int, size: int, crc: int) -> None:
    """Raise if the ``size`` stored bytes of ``member`` from ``start`` do not match the zip's CRC-32: a memory map
    skips the check that loading does (a flipped byte would read as pixels). One streaming pass per file."""
    stat = path.stat()
    key = (str(path.resolve()), member, stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return
    value, left = 0, size
    with open(path, "rb") as fp:
        fp.seek(start)
        while left:
            block = fp.read(min(left, 1 << 24))
            if not block:
                break
            value, left = zlib.crc32(block, value), left - len(block)
    if left or value != crc:
        raise FileFormatError(f"{path}: member {member!r} fails its CRC-32 check ("
                              + (f"{left} bytes missing" if left else "its bytes changed since it was written")
                              + "); the file is damaged: copy it again")
    _VERIFIED[key] = True


def _read_npz(path: Path, label_key: str | None) -> RawCells:
    """An ``.npz``: ``images`` memory-mapped when stored uncompressed; other members become per-cell arrays."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = {name[:-4]: name for name in zf.namelist() if name.endswith(".npy")}
            if "images" not in members:
                raise FileFormatError(f"{path}: no 'images' array in the .npz; keys found: {sorted(members)}")
            images = _npz_memmap(path, zf, members["images"])
            arrays = {}
            for key, member in members.items():
                if key == "images":
                    continue
                with zf.open(member) as fp:
                    shape, _, dtype = _npy_header(fp)
                if np.dtype(dtype).hasobject:  # pickled: never loaded (allow_pickle=False)
                    fix = f"save it as a string array, e.g. np.savez(..., {key}=values.astype(str))"
                    if key in ("label_names", "channel_names", label_key) or (label_key is None and key in
                                                                              ("labels", "label")):
                        raise FileFormatError(f"{path}: the array {key!r} is an object (pickled) array, "
                                              f"which sslcell does not load: {fix}")
                    warn_user(f"{path}: array {key!r} is an object (pickled) array, not loaded; skipped ({fix})")
                    continue
                if len(shape) <= 1 or (len(shape) == 2 and shape[1] <= _MAX_SPLIT_COLUMNS):
                    with zf.open(member) as fp:
                        arrays[key] = np.lib.format.read_array(fp, allow_pickle=False)
                else:
                    warn_user(f"{path}: array {key!r} with shape {shape} is not per-cell; skipped")
            if images is None:
                with zf.open(members["images"]) as fp:
                    images = np.lib.format.read_array(fp, allow_pickle=False)
    except FileFormatError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as err:
        raise FileFormatError(f"{path}: cannot read as .npz ({type(err).__name__}: {err})") from err
    arrays = {k: v for k, v in arrays.items() if v.ndim > 0}  # scalars such as "description" are not per-cell
    return _cells_from_arrays(images, arrays, {}, label_key, str(path))


# ---------------------------------------------------------------------------------------------------- zarr
def _read_zarr(path: Path, label_key: str | None) -> RawCells:
    """A zarr array or group; the pixels stay on disk (read in chunks via :class:`~sslcell.data.images.LazyImages`)."""
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as err:  # zarr raises many types for broken stores
        raise FileFormatError(f"{path}: cannot open as zarr ({type(err).__name__}: {err})") from err
    attrs = dict(node.attrs)
    if isinstance(node, zarr.Array):
        _warn_absent_chunks(node, path)
        return _cells_from_arrays(node, {}, attrs, label_key, str(path))
    try:
        keys = sorted(node.array_keys())
        if "images" not in keys:
            raise FileFormatError(f"{path}: zarr group has no 'images' array; arrays: {keys}")
        images = node["images"]
        _warn_absent_chunks(images, path)
        attrs = {**dict(images.attrs), **attrs}
        arrays = {k: node[k][...] for k in keys if k != "images" and node[k].ndim <= 2}
    except FileFormatError:
        raise
    except Exception as err:  # e.g. an object array whose codec would unpickle: zarr refuses it, we name the store
        raise FileFormatError(f"{path}: cannot read the zarr group's arrays ({type(err).__name__}: {err})") from err
    return _cells_from_arrays(images, arrays, attrs, label_key, str(path))


def _warn_absent_chunks(images: Any, path: Path) -> None:
    """Warn when chunks of the zarr array ``images`` are absent: zarr reads them as the fill value, so crops lost
    by an interrupted copy would read as blank (a store may also leave out chunks holding only the fill value)."""
    try:
        stored, total = images.nchunks_initialized, images.nchunks
    except Exception:  # noqa: BLE001 - a store that cannot list its keys: nothing to compare
        return
    if stored < total:
        warn_user(f"{path}: {total - stored} of the {total} chunks of its images are absent; zarr reads those crops "
                  f"as the fill value ({images.fill_value}). An interrupted copy loses chunks; a store written with "
                  "write_empty_chunks=False leaves out those holding only the fill value")


# -------------------------------------------------------------------------------------------------- folder
def _read_crop(file: Path) -> tuple[np.ndarray, bool]:
    """One crop file -> ``(C, H, W)`` and whether its channel axis was a guess; see the module doc for the rule."""
    try:
        if file.suffix.lower() == ".png":
            from PIL import Image

            _check_png_depth(file)
            with Image.open(file) as im:
                if im.mode in ("P", "PA"):  # palette indices -> the colours (or grey levels) they stand for
                    im = im.convert(_palette_mode(im))
                elif im.mode == "1":
                    im = im.convert("L")
                arr = np.asarray(im)
            if arr.dtype == np.int32 and arr.size and 0 <= arr.min() and arr.max() <= 65535:  # old 16-bit PNG mode "I"
                arr = arr.astype(np.uint16)
        else:
            arr = _read_tiff(file)
    except FileFormatError:
        raise
    except Exception as err:  # PIL / tifffile raise many types for corrupt files
        raise FileFormatError(f"{file}: cannot read crop ({type(err).__name__}: {err})") from err
    arr = np.squeeze(arr) if arr.ndim > 3 else arr
    if arr.ndim == 2:
        return arr[None], False
    if arr.ndim == 3:
        if file.suffix.lower() == ".png":
            return np.moveaxis(arr, -1, 0), False
        first, ambiguous = _channels_first(arr.shape)
        return (arr if first else np.moveaxis(arr, -1, 0)), ambiguous
    raise FileFormatError(f"{file}: crop has shape {arr.shape}; expected (H, W), (C, H, W) or (H, W, C)")


def _read_tiff(file: Path) -> np.ndarray:
    """A TIFF crop's pixels. Several series (a channel per ``TiffWriter.write`` call) are stacked as channels when
    each is one (H, W) plane of one shape and dtype; otherwise refused (``imread`` reads the first series only, so
    the other channels would be dropped without a word)."""
    import tifffile

    with tifffile.TiffFile(file) as tif:
        series = tif.series
        if len(series) <= 1:
            return series[0].asarray() if series else tif.asarray()
        planes = [s.asarray() for s in series]
    kinds = {(p.shape, p.dtype.str) for p in planes}
    if len(kinds) == 1 and planes[0].ndim == 2:
        return np.stack(planes)
    raise FileFormatError(f"{file}: {len(planes)} image series of shapes/dtypes {sorted(kinds)}; a crop file holds one "
                          "image, or one (H, W) plane per channel of one shape and dtype (save the channels as one "
                          "(C, H, W) array, e.g. tifffile.imwrite(path, crop))")


def _palette_mode(im: Any) -> str:
    """The mode a palette PNG is read in: ``"L"`` for a grey palette (one channel, as it was drawn), else ``"RGB"``
    (transparency is dropped: every crop of a folder gets the same channels)."""
    palette = np.asarray(im.getpalette() or [], dtype=np.int64).reshape(-1, 3)
    index = np.asarray(im)
    used = palette[np.unique(index[..., 0] if index.ndim == 3 else index)] if len(palette) else palette
    return "L" if len(used) and (used == used[:, :1]).all() else "RGB"


def _check_png_depth(file: Path) -> None:
    """Refuse a 16-bit colour PNG (IHDR bit depth 16, colour type RGB / grey + alpha / RGBA): Pillow reads it as
    8 bits per channel without a word."""
    with open(file, "rb") as f:
        head = f.read(26)
    if len(head) == 26 and head[12:16] == b"IHDR" and head[24] == 16 and head[25] in (2, 4, 6):
        raise FileFormatError(f"{file}: a 16-bit colour PNG, which Pillow reads as 8 bits per channel (the low "
                              "byte lost); save such crops as TIFF or .npz (uint16)")


def _channels_first(shape: tuple[int, ...]) -> tuple[bool, bool]:
    """Is a 3-D TIFF crop ``(C, H, W)`` (else ``(H, W, C)``), and was that a guess? The layout that leaves a square
    ``H x W`` wins; otherwise the shorter of the first and last axes is the channel axis (ties: first)."""
    a, b, c = shape
    square_if_first, square_if_last = b == c, a == b
    if square_if_first != square_if_last:
        return square_if_first, False
    return a <= c, True


def _crop_files(path: Path) -> list[Path]:
    """Crop files at the top level of ``path`` or in its direct subfolders (not both), sorted."""
    def crops_in(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in CROP_SUFFIXES)

    top = crops_in(path)
    nested = [p for d in sorted(path.iterdir()) if d.is_dir() for p in crops_in(d)]
    if not top and not nested:
        raise FileFormatError(f"{path}: no {'/'.join(CROP_SUFFIXES)} crops at the top level or in subfolders")
    if top and nested:
        raise InputError(
            f"{path}: crops both at the top level ({top[0].name}) and in subfolders ({nested[0].relative_to(path)}); "
            "put all crops in class subfolders or all at the top level"
        )
    folders = [path] if top else sorted(d for d in path.iterdir() if d.is_dir())
    other = sorted(p for d in folders for p in d.iterdir() if p.is_file() and p.suffix.lower() in _OTHER_IMAGES)
    if other:  # crops saved in another format would silently be left out of the data set
        warn_user(f"{path}: {len(other)} image file(s) in formats sslcell does not read as crops were skipped "
                  f"(e.g. {other[0].relative_to(path)}); crops are {'/'.join(CROP_SUFFIXES)} files")
    return top or nested


_OTHER_IMAGES = (".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".jp2", ".czi", ".nd2", ".lif")


def _folder_obs(path: Path, ids: list[str], folder_labels: list[str] | None, label_key: str | None) -> pd.DataFrame:
    """``obs`` for a crop folder: ``obs.csv`` rows matched to crop ids, and the ``label`` column (module doc)."""
    csv = path / "obs.csv"
    if not csv.exists():
        if label_key is not None:
            raise InputError(f"{path}: label_key {label_key!r} given but the folder has no obs.csv")
        obs = pd.DataFrame(index=pd.Index(ids))
    else:
        table = pd.read_csv(csv, index_col=0)
        table.index = [_strip_crop_suffix(str(i)) for i in table.index]
        missing = [i for i in ids if i not in table.index]
        if missing:
            raise InputError(f"{csv}: no row for {len(missing)} crop(s), e.g. {missing[:5]}")
        obs = table.loc[ids].copy()
        if label_key is not None:
            if label_key not in obs.columns:
                raise InputError(f"{csv}: label_key {label_key!r} is not a column; columns: {list(obs.columns)}")
            if folder_labels is not None:
                obs["folder"] = folder_labels
            obs["label"] = obs.pop(label_key)
        elif folder_labels is not None and "label" in obs.columns:
            raise InputError(f"{csv}: has a 'label' column and crops sit in class subfolders; pass label_key='label' "
                             "to use the column (the subfolder name then goes to 'folder')")
    if folder_labels is not None and "label" not in obs.columns:
        obs["label"] = folder_labels
    if "label" in obs.columns:
        obs["label"] = pd.Categorical(obs["label"])
    return obs


def _strip_crop_suffix(name: str) -> str:
    return name[: -len(Path(name).suffix)] if Path(name).suffix.lower() in CROP_SUFFIXES else name


def _read_folder(path: Path, label_key: str | None) -> RawCells:
    """A folder of crop files, read into one in-memory ``(N, C, H, W)`` array (file order = cell order)."""
    files = _crop_files(path)
    first, guessed = _read_crop(files[0])
    images = np.empty((len(files), *first.shape), dtype=first.dtype)
    images[0] = first
    n_guessed = int(guessed)
    for i, file in enumerate(files[1:], start=1):
        crop, guessed = _read_crop(file)
        n_guessed += guessed
        if crop.shape != first.shape or crop.dtype != first.dtype:
            raise InputError(
                f"{path}: crops differ: {files[0].relative_to(path)} is {first.shape} {first.dtype} (C, H, W) but "
                f"{file.relative_to(path)} is {crop.shape} {crop.dtype}; all crops must have one shape and dtype"
            )
        images[i] = crop
    if n_guessed:
        warn_user(
            f"{path}: {n_guessed} of {len(files)} TIFF crops have no square H x W either way, so their channel axis "
            f"was taken by the fallback rule: read as (C, H, W) = {first.shape}. If that is wrong, store the crops "
            "as .npz or zarr (N, C, H, W)"
        )
    ids = [_strip_crop_suffix(f.relative_to(path).as_posix()) for f in files]
    nested = files[0].parent != path
    obs = _folder_obs(path, ids, [f.parent.name for f in files] if nested else None, label_key)
    return RawCells(images, None, obs, str(path))
