"""Cell-centred crops from whole fields of view, and a label-free segmentation to find the cells.

A crop of side ``size`` puts the cell's (rounded) centroid at pixel ``(size // 2, size // 2)``; windows that
leave the field are padded (``pad_mode``: ``"constant"`` zeros, ``"reflect"``, ``"symmetric"`` or ``"edge"``).
The field is padded once and all crops are cut with one fancy index into a sliding-window view.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from sslcell.data.images import CellImages
from sslcell.errors import InputError

PAD_MODES = ("constant", "reflect", "symmetric", "edge")
THRESHOLDS = ("otsu", "li", "yen", "triangle", "mean")


def _as_chw(fov: Any, where: str = "fov") -> np.ndarray:
    fov = np.asarray(fov)
    if fov.ndim == 2:
        return fov[None]
    if fov.ndim != 3:
        raise InputError(f"{where} must be (C, H, W) or (H, W); got shape {fov.shape}")
    if fov.shape[2] <= 4 < min(fov.shape[:2]):  # (H, W, C), as image readers return an RGB field
        raise InputError(f"{where} of shape {fov.shape} looks channels-last (H, W, C) = {fov.shape[2]} channels of "
                         f"{fov.shape[0]} x {fov.shape[1]} px; sslcell reads (C, H, W): np.moveaxis(fov, -1, 0)")
    return fov


def _centres_from_masks(masks: Any, hw: tuple[int, int], where: str) -> pd.DataFrame:
    """Label image (H, W) -> one row per label: label_id, centroid_row, centroid_col, area."""
    from skimage.measure import regionprops_table

    masks = np.asarray(masks)
    if masks.shape != hw:
        raise InputError(f"{where}: masks has shape {masks.shape}; the field of view is {hw} (H, W)")
    if masks.dtype.kind not in "iu":
        raise InputError(
            f"{where}: masks must be an integer label image (0 = background), got {masks.dtype}; "
            "label a boolean mask with skimage.measure.label"
        )
    if masks.size and masks.min() < 0:
        raise InputError(f"{where}: masks has negative labels (min {masks.min()})")
    props = regionprops_table(masks, properties=("label", "centroid", "area"))
    return pd.DataFrame(
        {
            "label_id": props["label"].astype(np.int64),
            "centroid_row": props["centroid-0"],
            "centroid_col": props["centroid-1"],
            "area": props["area"].astype(np.int64),
        }
    )


def _cut(chw: np.ndarray, rows: np.ndarray, cols: np.ndarray, size: int, pad_mode: str) -> np.ndarray:
    """Crops ``(K, C, size, size)`` centred on integer pixels ``(rows, cols)`` inside the field."""
    half = size // 2
    padded = np.pad(chw, ((0, 0), (half, size - half), (half, size - half)), mode=pad_mode)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size), axis=(1, 2))  # (C, H+1, W+1, s, s)
    return np.ascontiguousarray(windows[:, rows, cols].transpose(1, 0, 2, 3))


def _crops_and_obs(
    fov: Any, masks: Any, centroids: Any, size: int, pad_mode: str, fov_id: Any, where: str
) -> tuple[np.ndarray, pd.DataFrame]:
    chw = _as_chw(fov, where)
    h, w = chw.shape[1:]
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise InputError(f"size must be a positive integer; got {size!r}")
    if pad_mode not in PAD_MODES:
        raise InputError(f"pad_mode {pad_mode!r} is not one of {PAD_MODES}")
    if (masks is None) == (centroids is None):
        raise InputError(f"{where}: give exactly one of masks (H, W) or centroids (K, 2)")
    if masks is not None:
        obs = _centres_from_masks(masks, (h, w), where)
    else:
        centroids = np.asarray(centroids, dtype=np.float64)
        if centroids.ndim != 2 or centroids.shape[1] != 2:
            raise InputError(f"{where}: centroids must be (K, 2) as (row, col); got shape {centroids.shape}")
        obs = pd.DataFrame({"centroid_row": centroids[:, 0], "centroid_col": centroids[:, 1]})
    rows = np.floor(obs["centroid_row"].to_numpy() + 0.5).astype(np.intp)
    cols = np.floor(obs["centroid_col"].to_numpy() + 0.5).astype(np.intp)
    finite = np.isfinite(obs["centroid_row"].to_numpy()) & np.isfinite(obs["centroid_col"].to_numpy())
    outside = ~finite | (rows < 0) | (rows >= h) | (cols < 0) | (cols >= w)
    if outside.any():
        k = int(np.flatnonzero(outside)[0])
        raise InputError(
            f"{where}: centroid {k} ({obs['centroid_row'].iloc[k]}, {obs['centroid_col'].iloc[k]}) lies outside "
            f"the {h}x{w} field ({int(outside.sum())} such centroids)"
        )
    fov_id = 0 if fov_id is None else fov_id
    obs.insert(0, "fov_id", fov_id)
    suffix = obs["label_id"] if masks is not None else pd.Series(range(len(obs)))
    obs.index = pd.Index([f"{fov_id}_{s}" for s in suffix])
    return _cut(chw, rows, cols, int(size), pad_mode), obs


def extract_crops(
    fov: Any,
    *,
    masks: Any = None,
    centroids: Any = None,
    size: int = 64,
    pad_mode: str = "constant",
    channel_names: Sequence[str] | None = None,
    fov_id: Any = None,
) -> CellImages:
    """Cut ``(K, C, size, size)`` cell-centred crops from one field of view ``(C, H, W)`` or ``(H, W)``.

    Cells come from ``masks`` (H, W) integer labels (0 = background; one crop per label, centred on its
    centroid) or from ``centroids`` (K, 2) as (row, col). ``obs`` gets ``fov_id`` (default 0), ``centroid_row``,
    ``centroid_col`` and, with masks, ``label_id`` and ``area`` (pixels); cell ids are ``"{fov_id}_{label_id}"``
    (masks) or ``"{fov_id}_{k}"`` (centroids). Crops keep the field's dtype.
    """
    crops, obs = _crops_and_obs(fov, masks, centroids, size, pad_mode, fov_id, "fov")
    if len(crops) == 0:
        raise InputError("fov: no cells (masks has no labels other than 0, or centroids is empty)")
    return CellImages.from_array(crops, channel_names=channel_names, obs=obs, source="fields of view")


def segment_cells(
    fov: Any,
    *,
    channel: int = 0,
    threshold: str | float = "otsu",
    min_area: int = 20,
    max_area: int | None = None,
    invert: bool = False,
    smooth_sigma: float = 1.0,
) -> np.ndarray:
    """Label-free segmentation of one channel of a field ``(C, H, W)`` or ``(H, W)`` -> ``(H, W)`` int32 labels.

    Steps (scikit-image / scipy): Gaussian smoothing (``smooth_sigma`` px, 0 = off); a global threshold,
    ``"otsu"`` (or ``"li"``, ``"yen"``, ``"triangle"``, ``"mean"``) or a number in intensity units; foreground is
    above it (below with ``invert=True``, for dark cells on a bright background); holes filled; connected
    components (8-connectivity); components smaller than ``min_area`` (debris) or larger than ``max_area``
    (clusters; ``None`` = no upper limit) removed; labels renumbered 1..K. Touching cells are not split.
    """
    from scipy import ndimage as ndi
    from skimage import filters, measure, segmentation

    chw = _as_chw(fov)
    if not -chw.shape[0] <= channel < chw.shape[0]:
        raise InputError(f"channel {channel} out of range for a field with {chw.shape[0]} channels")
    image = chw[channel].astype(np.float32)
    if smooth_sigma > 0:
        image = filters.gaussian(image, sigma=smooth_sigma, preserve_range=True)
    if isinstance(threshold, str):
        if threshold not in THRESHOLDS:
            raise InputError(f"threshold {threshold!r} is not a number or one of {THRESHOLDS}")
        value = getattr(filters, f"threshold_{threshold}")(image)
    else:
        value = float(threshold)
    foreground = ndi.binary_fill_holes(image < value if invert else image > value)
    labels = measure.label(foreground, connectivity=2)
    areas = np.bincount(labels.ravel())
    keep = areas >= min_area
    if max_area is not None:
        keep &= areas <= max_area
    keep[0] = False
    labels, _, _ = segmentation.relabel_sequential(np.where(keep[labels], labels, 0))
    return labels.astype(np.int32)


def crops_from_fields(
    fovs: Sequence[Any],
    masks: Sequence[Any] | None = None,
    size: int = 64,
    *,
    pad_mode: str = "constant",
    channel_names: Sequence[str] | None = None,
    fov_ids: Sequence[Any] | None = None,
    **segment_kwargs: Any,
) -> CellImages:
    """Crops from many fields of view -> one CellImages (fields are visited one at a time).

    ``masks``: one label image per field, or ``None`` to run :func:`segment_cells` (``segment_kwargs``) on each.
    ``fov_ids`` (default 0..F-1) fill ``obs["fov_id"]`` and prefix the cell ids. Fields must share channel count
    and dtype; a field without cells contributes nothing.
    """
    if masks is not None and segment_kwargs:
        raise InputError(f"segmentation options {sorted(segment_kwargs)} given together with masks")
    n_fovs = len(fovs)
    if masks is not None and len(masks) != n_fovs:
        raise InputError(f"{len(masks)} masks for {n_fovs} fields of view")
    fov_ids = list(range(n_fovs)) if fov_ids is None else list(fov_ids)
    if len(fov_ids) != n_fovs or len(set(map(str, fov_ids))) != n_fovs:
        raise InputError(f"fov_ids must be {n_fovs} unique ids; got {fov_ids}")
    crops, tables, first = [], [], None
    for i, fov in enumerate(fovs):
        chw = _as_chw(fov, f"field {i}")
        if first is None:
            first = chw
        elif chw.shape[0] != first.shape[0] or chw.dtype != first.dtype:
            raise InputError(
                f"field {i} has {chw.shape[0]} channels of {chw.dtype}; field 0 has {first.shape[0]} of {first.dtype}"
            )
        mask = masks[i] if masks is not None else segment_cells(chw, **segment_kwargs)
        c, obs = _crops_and_obs(chw, mask, None, size, pad_mode, fov_ids[i], f"field {i}")
        crops.append(c)
        tables.append(obs)
    images = np.concatenate(crops) if crops else np.empty((0,))
    if len(images) == 0:
        raise InputError(f"no cells found in {n_fovs} field(s) of view")
    return CellImages.from_array(images, channel_names=channel_names, obs=pd.concat(tables), source="fields of view")
