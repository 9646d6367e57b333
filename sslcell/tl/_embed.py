"""Embed cells with a pretrained model into ``adata.obsm[key_added]``."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anndata import AnnData

from sslcell.checkpoint import load, model_id
from sslcell.data.expression import open_counts
from sslcell.data.genes import missing_info
from sslcell.data.images import CellImages
from sslcell.errors import InputError, SSLCellWarning
from sslcell.inference import embed_rows
from sslcell.methods import SSLModule
from sslcell.tl._keys import check_crops, check_free, check_in_place, drop_derived, record, refuse

EXPRESSION_BATCH, CROPS_BATCH = 4096, 512


def embed(
    adata: AnnData,
    model: SSLModule | str | Path,
    *,
    crops: CellImages | None = None,
    key_added: str = "X_sslcell",
    layer: str | None = None,
    counts_are_log_normalized: bool | None = None,
    channels: Sequence[int | str] | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    max_missing_genes: float | None = None,
    overwrite: bool = False,
    copy: bool = False,
) -> AnnData | None:
    """Embed every cell with ``model`` into ``adata.obsm[key_added]`` ``(N, D)`` float32.

    Expression models read the counts of ``adata`` (``X`` or ``layer``): aligned to the model's genes by name
    (missing genes are zero-filled and reported in ``uns["sslcell"][key_added]``) and normalised per chunk as the
    model was trained. A backed AnnData is read chunk-wise, never whole.

    Image models read ``crops`` ``(N, C, H, W)``, one per row of ``adata`` in the same order (an AnnData made by
    ``crops.to_anndata()``, or :func:`embed_crops`, which makes it); the model's channels are selected by name, or
    by ``channels``.

    Args:
        adata: cells x genes (raw counts, or log-normalised ones), or the AnnData of ``crops``.
        model: a loaded model or a model / run directory.
        crops: image models only: the crops of ``adata``'s rows.
        key_added: the ``obsm`` key to write. An existing key is refused unless ``overwrite=True``; replacing it
            also drops what ``pl.umap`` computed from it.
        layer, counts_are_log_normalized: expression only: read counts from ``layer``; declare the input already
            log-normalised (default: as the model was trained).
        max_missing_genes: expression only: the largest share of the model's genes that may be missing from
            ``adata`` (default 0.5; more is refused, 1 accepts any overlap).
        channels: image models only: channels (indices or names) to feed the model, in its order.
        batch_size: cells per chunk (default 4096 for expression, 512 for crops).
        device: where to run the encoder (default: CUDA when available).
        copy: return an embedded copy instead of writing into ``adata``.
    """
    if isinstance(adata, CellImages):  # the pre-0.2 call for crops, kept for one release
        warnings.warn(
            "tl.embed(cells, model) is deprecated; use tl.embed_crops(cells, model), or tl.embed(adata, model, "
            "crops=cells)",
            DeprecationWarning,
            stacklevel=2,
        )
        refuse(copy=copy, overwrite=overwrite, layer=layer, counts_are_log_normalized=counts_are_log_normalized)
        return embed_crops(adata, model, key_added=key_added, channels=channels, batch_size=batch_size, device=device)
    if not isinstance(adata, AnnData):
        raise InputError(f"adata must be an AnnData (or use tl.embed_crops for crops); got {type(adata).__name__}")
    model = model if isinstance(model, SSLModule) else load(model)
    check_free(adata, "obsm", key_added, overwrite)
    check_free(adata, "record", key_added, overwrite)
    check_in_place(adata, copy)
    if model.inputs.modality == "image":
        if crops is None:
            raise InputError(
                "the model reads image crops: pass crops=cells (one crop per row of adata), or use "
                "tl.embed_crops(cells, model)"
            )
        refuse(layer=layer, counts_are_log_normalized=counts_are_log_normalized, max_missing_genes=max_missing_genes)
    else:
        refuse(crops=crops, channels=channels)
    if batch_size is None:
        batch_size = CROPS_BATCH if model.inputs.modality == "image" else EXPRESSION_BATCH
    if copy and (adata.is_view or not adata.isbacked):  # a whole backed file is read from disk (errors name it)
        adata = adata.to_memory() if adata.isbacked else adata.copy()
    if model.inputs.modality == "image":
        embedding, info = _embed_crops(adata, crops, model, channels, batch_size, device)
    else:
        embedding, info = _embed_expression(adata, model, layer, counts_are_log_normalized, batch_size, device,
                                            max_missing_genes)
    if copy and adata.isbacked:
        adata = adata.to_memory()
    drop_derived(adata, key_added)
    adata.obsm[key_added] = embedding
    record(adata, key_added, {"model": str(getattr(model, "source", "<in memory>")), "model_id": model_id(model),
                              "method": model.config.method.name, **info})
    return adata if copy else None


def embed_crops(
    cells: CellImages,
    model: SSLModule | str | Path,
    *,
    key_added: str = "X_sslcell",
    channels: Sequence[int | str] | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
) -> AnnData:
    """Crops -> a new AnnData: one row per crop with the crops' ``obs`` (``cells.to_anndata()``) and the embedding
    ``(N, D)`` in ``obsm[key_added]``. The one way from crops to an AnnData with an embedding."""
    if not isinstance(cells, CellImages):
        raise InputError(f"embed_crops reads CellImages (sslcell.read_images); got {type(cells).__name__}")
    adata = cells.to_anndata()
    embed(adata, model, crops=cells, key_added=key_added, channels=channels, batch_size=batch_size, device=device)
    return adata


def _embed_expression(adata: AnnData, model: SSLModule, layer: str | None, log_normalized: bool | None,
                      batch_size: int, device: Any, max_missing: float | None) -> tuple[Any, dict[str, Any]]:
    contract = model.inputs.contract
    if log_normalized is None:
        log_normalized = contract.counts_are_log_normalized
    dataset = open_counts(adata, contract.genes, layer=layer, counts_are_log_normalized=log_normalized,
                          max_missing_genes=max_missing)
    empty = [0]

    def count_empty(x: torch.Tensor) -> None:
        empty[0] += int((x.sum(dim=1) == 0).sum())

    with dataset:
        out = embed_rows(model, dataset, batch_size=batch_size, device=device, inspect=count_empty,
                         counts_are_log_normalized=log_normalized)
    if empty[0]:
        warnings.warn(
            f"{empty[0]} of {len(out)} cells have no counts over the model's {contract.n_genes} genes: they all get "
            "the same embedding (filter empty cells, or check that the gene names match the model's)",
            SSLCellWarning, stacklevel=3,
        )
    return out, {**missing_info(dataset.alignment, contract.n_genes), "n_empty_cells": empty[0]}


def _embed_crops(adata: AnnData, crops: CellImages, model: SSLModule, channels: Any, batch_size: int,
                 device: Any) -> tuple[Any, dict[str, Any]]:
    check_crops(adata, crops)
    cells = model.inputs.align(crops, channels)
    out = embed_rows(model, cells, batch_size=batch_size, device=device)
    # the crops' own names of the channels read (unnamed crops selected by position take the model's names)
    read = crops.select_channels(channels).channel_names if channels is not None else cells.channel_names
    return out, {"channel_names": list(cells.channel_names), "crop_channels": list(read)}

