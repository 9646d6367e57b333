"""Checks of a task's data file when the suite loads, before any task runs: it opens as the task reads it and holds
the ``obs`` columns and channels the task's parameters name. An ``.h5ad`` is read through h5py (``obs``'s column
names only); crops through ``CellImages.read`` once per file and process (a compressed ``.npz`` is decompressed for
it), except a folder of crop files, which is only checked to exist (opening every file would double the task's own
reading). Errors are :class:`ConfigError`\\ s starting with the suite field (``data: ...``,
``params.label_key: ...``); the suite adds the task's place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sslcell.errors import ConfigError, SSLCellError

_CROPS: dict[tuple[str, int, int], tuple[list[str], list[str]]] = {}  # file -> (obs columns, channel names)


def check_h5ad(path: Path, columns: dict[str, str | None]) -> None:
    """``path`` opens as an ``.h5ad`` with ``X`` and ``obs``, and ``obs`` has each named column
    (``{param field: column or None}``)."""
    import h5py

    if path.is_dir():
        raise ConfigError(f"data: {path} is a folder, not an .h5ad file")
    try:
        with h5py.File(path, "r") as f:
            if "X" not in f or "obs" not in f:
                raise ConfigError(f"data: {path} is not an .h5ad file (no {'X' if 'X' not in f else 'obs'} in it)")
            obs = f["obs"]
            if isinstance(obs, h5py.Group):
                present = [str(c) for c in obs.attrs.get("column-order", [])]
            else:  # files written by anndata < 0.7: obs is one table
                present = [n for n in obs.dtype.names or () if n != "index"]
    except ConfigError:
        raise
    except (OSError, KeyError, ValueError) as err:
        raise ConfigError(f"data: {path} cannot be read as an .h5ad file ({type(err).__name__}: {err})") from None
    _check_columns(path, present, columns)


def check_crops(path: Path, columns: dict[str, str | None], channels: Any = None, **more_channels: Any) -> None:
    """``path`` opens as crops, ``channels`` (and each of ``more_channels``: ``{param field: channel or
    channels}``) are among them, and its ``obs`` has each named column."""
    import numpy as np

    from sslcell.data.image_readers import is_zarr_store
    from sslcell.data.images import CellImages

    if path.is_dir() and not is_zarr_store(path):
        return  # a folder of crop files: checked when the task reads it
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _CROPS:
        try:
            cells = CellImages.read(path)
        except (SSLCellError, OSError, ValueError) as err:
            raise ConfigError(f"data: {err}") from None
        _CROPS.clear()  # one file's summary at a time: a suite's tasks reading one file check it once
        _CROPS[key] = list(cells.obs.columns), list(cells.channel_names)
    present, names = _CROPS[key]
    blank = CellImages.from_array(np.zeros((1, len(names), 1, 1), np.uint8), channel_names=names)
    for field, selected in {"channels": channels, **more_channels}.items():
        if selected is None:
            continue
        try:  # the same selection, and message, on one blank crop with these channels
            blank.select_channels(selected)
        except SSLCellError as err:
            raise ConfigError(f"params.{field}: {err}") from None
    _check_columns(path, present, columns)


def _check_columns(path: Path, present: list[str], columns: dict[str, str | None]) -> None:
    for field, column in columns.items():
        if column is not None and column not in present:
            raise ConfigError(f"params.{field}: {path.name} has no obs column {column!r}; its columns are {present}")
