"""Scanpy-style tools: AnnData in, results written into it (``key_added``), ``None`` out unless ``copy=True``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anndata import AnnData

from sslcell.augment.expression import normalize_log1p
from sslcell.checkpoint import load
from sslcell.data.expression import ExpressionDataset
from sslcell.data.images import CellImages
from sslcell.errors import InputError, OverwriteError
from sslcell.evaluate import evaluate
from sslcell.methods import SSLModule

log = logging.getLogger(__name__)


def embed(
    adata: AnnData | CellImages,
    model: SSLModule | str | Path,
    *,
    key_added: str = "X_sslcell",
    layer: str | None = None,
    counts_are_log_normalized: bool | None = None,
    channels: Sequence[int | str] | None = None,
    batch_size: int = 4096,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    copy: bool = False,
) -> AnnData | None:
    """Embed every cell with ``model`` into ``adata.obsm[key_added]`` ``(N, D)`` float32.

    Expression: the data are aligned to the model's genes by name (missing genes are zero-filled and reported)
    and normalised per chunk as the model was trained. A backed AnnData is read chunk-wise, never whole.

    Images: ``adata`` is a :class:`CellImages` (crops hold no AnnData yet); the model's channels are selected by
    name (or ``channels``), and a new AnnData is returned, one row per cell, with the crops' ``obs`` and the
    embedding in ``obsm[key_added]``.

    Args:
        adata: cells x genes, raw counts in ``X`` or in ``layer``; or crops (:class:`CellImages`).
        model: a loaded model or a model / run directory.
        key_added: the ``obsm`` key to write. An existing key is refused unless ``overwrite=True``.
        counts_are_log_normalized: declare the input already log-normalised; default: as the model was trained.
        channels: images: channels (indices or names) to feed the model, in its order.
        batch_size: cells per chunk.
        device: where to run the encoder (default: CUDA when available).
        copy: return an embedded copy instead of writing into ``adata``.
    """
    if not isinstance(model, SSLModule):
        model = load(model)
    if isinstance(adata, CellImages):
        return _embed_images(adata, model, key_added=key_added, channels=channels, batch_size=batch_size, device=device)
    if model.inputs.modality != "expression":
        raise InputError(f"the model reads {model.inputs.modality} data; pass CellImages (sslcell.read_images)")
    if key_added in adata.obsm and not overwrite:
        raise OverwriteError(f"adata.obsm[{key_added!r}] exists; pass overwrite=True or choose another key_added")
    if copy:
        adata = adata.copy() if not adata.isbacked else adata.to_memory()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device)
    contract = model.inputs.contract()
    if counts_are_log_normalized is None:
        counts_are_log_normalized = contract["counts_are_log_normalized"]
    source: Any = adata.filename if adata.isbacked else adata
    dataset = ExpressionDataset.open(
        source, layer=layer, genes=contract["genes"], counts_are_log_normalized=counts_are_log_normalized
    )
    out = np.empty((dataset.n_obs, model.embed_dim), dtype=np.float32)
    for start, stop, chunk in dataset.iter_chunks(batch_size):
        x = torch.from_numpy(chunk.toarray()).to(device, non_blocking=True)
        x = x.float() if counts_are_log_normalized else normalize_log1p(x.float(), contract["target_sum"])
        out[start:stop] = model.embed(model.inputs.scale(x), normalized=True).cpu().numpy()
    adata.obsm[key_added] = out
    info = dataset.alignment
    adata.uns.setdefault("sslcell", {})[key_added] = {
        "model": str(getattr(model, "source", "<in memory>")),
        "method": model.config.method.name,
        "n_model_genes": len(contract["genes"]),
        "n_missing_genes": int(info.n_missing) if info is not None else 0,
    }
    return adata if copy else None


def embed_array(
    model: SSLModule, cells: CellImages, *, batch_size: int = 512, device: str | torch.device | None = None
) -> np.ndarray:
    """Crops (already aligned to the model's channels) -> embeddings ``(N, D)`` float32, in batches."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device)
    out = np.empty((len(cells), model.embed_dim), dtype=np.float32)
    for start in range(0, len(cells), batch_size):
        rows = np.arange(start, min(start + batch_size, len(cells)))
        out[rows] = model.embed(torch.from_numpy(cells.batch(rows))).cpu().numpy()
    return out


def _embed_images(
    cells: CellImages,
    model: SSLModule,
    *,
    key_added: str,
    channels: Sequence[int | str] | None,
    batch_size: int,
    device: str | torch.device | None,
) -> AnnData:
    if model.inputs.modality != "image":
        raise InputError(f"the model reads {model.inputs.modality} data, not image crops")
    cells = model.inputs.align(cells, channels)
    adata = cells.to_anndata()
    adata.obsm[key_added] = embed_array(model, cells, batch_size=min(batch_size, 1024), device=device)
    adata.uns.setdefault("sslcell", {})[key_added] = {
        "model": str(getattr(model, "source", "<in memory>")),
        "method": model.config.method.name,
        "channel_names": list(cells.channel_names),
    }
    return adata


__all__ = ["embed", "embed_array", "evaluate"]
