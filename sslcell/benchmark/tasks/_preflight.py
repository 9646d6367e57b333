"""Checks of a task's data file when the suite loads, before any task runs: it opens (header and ``obs`` only, no
pixels or counts) and holds the ``obs`` columns the task's parameters name. Errors are :class:`ConfigError`\\ s
starting with the suite field (``data: ...``, ``params.label_key: ...``); the suite adds the task's place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sslcell.errors import ConfigError, SSLCellError


def check_h5ad(path: Path, columns: dict[str, str | None]) -> None:
    """``path`` opens as an ``.h5ad`` and its ``obs`` has each named column (``{param field: column or None}``)."""
    import anndata as ad

    if path.is_dir():
        raise ConfigError(f"data: {path} is a folder, not an .h5ad file")
    try:
        adata = ad.read_h5ad(path, backed="r")
    except Exception as err:  # h5py and anndata raise many kinds for a file that is not an .h5ad
        raise ConfigError(f"data: {path} cannot be read as an .h5ad file ({type(err).__name__}: {err})") from None
    try:
        _check_columns(path, list(adata.obs.columns), columns)
    finally:
        adata.file.close()


def check_crops(path: Path, columns: dict[str, str | None], channels: Any = None) -> None:
    """``path`` opens as crops (``CellImages.read``: the arrays' headers and ``obs``), ``channels`` are among
    them, and its ``obs`` has each named column."""
    from sslcell.data.images import CellImages

    try:
        cells = CellImages.read(path)
    except (SSLCellError, OSError, ValueError) as err:
        raise ConfigError(f"data: {err}") from None
    if channels is not None:
        try:
            cells.select_channels(channels)
        except SSLCellError as err:
            raise ConfigError(f"params.channels: {err}") from None
    _check_columns(path, list(cells.obs.columns), columns)


def _check_columns(path: Path, present: list[str], columns: dict[str, str | None]) -> None:
    for field, column in columns.items():
        if column is not None and column not in present:
            raise ConfigError(f"params.{field}: {path.name} has no obs column {column!r}; its columns are {present}")
