"""What every tool shares: refusing to replace results unless asked, and recording what wrote them."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from anndata import AnnData
from scipy import sparse

from sslcell.errors import InputError, OverwriteError

IMAGES_KEY = "sslcell_images"  # uns key of an AnnData made from crops (CellImages.to_anndata)


def check_free(adata: AnnData, slot: str, key: str, overwrite: bool) -> None:
    """Raise :class:`OverwriteError` if ``adata.<slot>[key]`` exists and ``overwrite`` is False. ``slot="record"``:
    the record :func:`record` keeps of a result in ``adata.uns["sslcell"][key]`` (another tool's, e.g. an
    embedding's model, is not replaced without asking either)."""
    if slot == "record":
        records = adata.uns.get("sslcell", {})
        if not isinstance(records, Mapping):  # checked before any work: the result would be written, its record not
            raise InputError(f"adata.uns['sslcell'] holds a {type(records).__name__}, not sslcell's records of the "
                             "models and settings behind its results; move it to another uns key")
        if key in records and not overwrite:
            raise OverwriteError(f"adata.uns['sslcell'][{key!r}] holds the record of an earlier result; pass "
                                 "overwrite=True or choose another key_added")
        return
    mapping = adata.obs if slot == "obs" else getattr(adata, slot)
    if key in mapping and not overwrite:
        raise OverwriteError(f"adata.{slot}[{key!r}] exists; pass overwrite=True or choose another key_added")


def check_in_place(adata: AnnData, copy: bool) -> None:
    """Refuse, before any work, to write results into a view of a backed AnnData (anndata would have to copy the
    view into memory, which it refuses in backed mode, after the work)."""
    if not copy and adata.isbacked and adata.is_view:
        raise InputError(f"{adata.filename}: a view of a backed AnnData (some of its cells or genes) cannot take "
                         "results in place: pass copy=True (the result is a new AnnData in memory), or "
                         "view.to_memory() first")


def refuse(**given: Any) -> None:
    """Raise for arguments that do not apply to this input (never ignore them silently)."""
    used = [name for name, value in given.items() if not (value is None or value is False)]  # arrays too
    if used:
        raise InputError(f"{', '.join(used)}: not applicable to this model's input; remove the argument")


def drop_derived(adata: AnnData, use_rep: str) -> None:
    """Remove what was computed from ``obsm[use_rep]`` (``pl.umap``'s neighbours and coordinates) once it changes."""
    neighbors = f"{use_rep}_neighbors"
    adata.obsm.pop(f"{use_rep}_umap", None)
    adata.uns.pop(neighbors, None)
    for suffix in ("connectivities", "distances"):
        adata.obsp.pop(f"{neighbors}_{suffix}", None)


def recorded(adata: AnnData, key: str) -> dict[str, Any]:
    """What :func:`record` kept of the result under ``key`` (empty where nothing was recorded)."""
    records = adata.uns.get("sslcell", {})
    made = records.get(key, {}) if isinstance(records, dict) else {}
    return made if isinstance(made, dict) else {}


def rep_id(adata: AnnData, use_rep: str) -> str | None:
    """The id of the space ``obsm[use_rep]`` lies in, where sslcell made it: the model id ``tl.embed``
    records (``model_id``), or ``cell_cycle_pca``'s id of its own axes. None for a representation made elsewhere."""
    return recorded(adata, use_rep).get("model_id")


def check_same_space(ours: str | None, theirs: str | None, what: str, reference: str, hint: str) -> None:
    """Refuse a representation (``what``, space id ``ours``) recorded as made in another space than the
    ``reference`` it is compared with (``theirs``): another model's weights, or a PCA of other cells. Where either
    side recorded none (:func:`rep_id`), nothing can be checked. A model's id is ``"<weights>+<contract>"``
    (:func:`sslcell.checkpoint.model_id`); one recorded before the contract joined it (the weights' alone) is
    compared with the weights' part of the other."""
    if ours and theirs and not _same_space(str(ours), str(theirs)):  # a hand-edited record may hold another type
        raise InputError(f"{what} lies in another space ({ours}) than {reference} ({theirs}): {hint}")


def _same_space(ours: str, theirs: str) -> bool:
    if "+" in ours and "+" in theirs:
        return ours == theirs
    return ours.partition("+")[0] == theirs.partition("+")[0]


def record(adata: AnnData, key: str, info: dict[str, Any]) -> None:
    """``adata.uns["sslcell"][key] = info``: the model and settings behind a result."""
    adata.uns.setdefault("sslcell", {})[key] = info


def check_crops(adata: AnnData, crops: Any) -> None:
    """Raise unless ``crops`` are :class:`~sslcell.data.images.CellImages` holding the rows of ``adata``, in order."""
    from sslcell.data.images import CellImages

    if not isinstance(crops, CellImages):
        raise InputError(f"crops must be CellImages (sslcell.read_images); got {type(crops).__name__}")
    if len(crops) != adata.n_obs or not crops.obs.index.equals(adata.obs_names):
        raise InputError(
            f"crops ({len(crops)} cells from {crops.source}) do not match the rows of adata ({adata.n_obs}): pass the "
            "AnnData made from these crops (crops.to_anndata(), or tl.embed_crops)"
        )
    _check_pixels(adata, crops)


def _check_pixels(adata: AnnData, crops: Any) -> None:
    """Raise if the cells whose pixels ``adata`` recorded (``to_anndata``) hold other pixels in ``crops``: other
    crops with the same ids (default ids are row numbers) would be scored in their place. Cells and channels the
    crops no longer hold (a subset) are not compared."""
    images = adata.uns.get(IMAGES_KEY)
    sample = images.get("pixel_sample") if isinstance(images, dict) else None
    names = images.get("channel_names") if isinstance(sample, dict) else None
    if names is None or not crops.obs.index.is_unique:
        return  # an AnnData from an older sslcell, or not from crops; crops with repeated ids are not looked up
    cells = [str(c) for c in np.asarray(sample.get("cells", [])).tolist()]
    digests = np.asarray(sample.get("digests", []), dtype=str).reshape(len(cells), -1) if cells else None
    present = [i for i, c in enumerate(cells) if c in crops.obs.index]
    shared = [(j, crops.channel_names.index(str(n))) for j, n in enumerate(names) if str(n) in crops.channel_names]
    if not present or not shared or digests is None or digests.shape[1] != len(names):
        return
    now = crops.pixel_digests([cells[i] for i in present])
    for k, i in enumerate(present):
        for j, c in shared:
            if now[k][c] != digests[i, j]:
                raise InputError(
                    f"crops from {crops.source} are not the crops adata was made from "
                    f"({images.get('source')}): cell {cells[i]!r}, channel {names[j]!r} holds other "
                    "pixels. Pass the crops of adata's rows (an AnnData made from other crops gets its own "
                    "crops.to_anndata())")


def is_crops(adata: AnnData) -> bool:
    """Whether ``adata`` was made from crops (one row per crop, no expression matrix)."""
    return IMAGES_KEY in adata.uns


def fingerprint(values: np.ndarray) -> str:
    """A short hash of an array's shape, dtype and values: tells whether derived results are still current."""
    values = values.toarray() if sparse.issparse(values) else np.asarray(values)
    digest = hashlib.blake2b(digest_size=12)
    digest.update(repr((values.shape, values.dtype.str)).encode())
    digest.update(np.ascontiguousarray(values).tobytes())
    return digest.hexdigest()
