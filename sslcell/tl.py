"""Scanpy-style tools: AnnData in, results written into it (``key_added``), ``None`` out unless ``copy=True``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anndata import AnnData

from sslcell.augment.expression import normalize_log1p
from sslcell.checkpoint import load
from sslcell.data.expression import ExpressionDataset
from sslcell.errors import OverwriteError
from sslcell.evaluate import evaluate
from sslcell.methods import SSLModule

log = logging.getLogger(__name__)


def embed(
    adata: AnnData,
    model: SSLModule | str | Path,
    *,
    key_added: str = "X_sslcell",
    layer: str | None = None,
    counts_are_log_normalized: bool | None = None,
    batch_size: int = 4096,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    copy: bool = False,
) -> AnnData | None:
    """Embed every cell with ``model`` into ``adata.obsm[key_added]`` ``(N, D)`` float32.

    The data are aligned to the model's genes by name (missing genes are zero-filled and reported) and
    normalised per chunk as the model was trained. A backed AnnData is read chunk-wise, never whole.

    Args:
        adata: cells x genes, raw counts in ``X`` or in ``layer``.
        model: a loaded model or a model / run directory.
        key_added: the ``obsm`` key to write. An existing key is refused unless ``overwrite=True``.
        counts_are_log_normalized: declare the input already log-normalised; default: as the model was trained.
        batch_size: cells per chunk.
        device: where to run the encoder (default: CUDA when available).
        copy: return an embedded copy instead of writing into ``adata``.
    """
    if key_added in adata.obsm and not overwrite:
        raise OverwriteError(f"adata.obsm[{key_added!r}] exists; pass overwrite=True or choose another key_added")
    if not isinstance(model, SSLModule):
        model = load(model)
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


__all__ = ["embed", "evaluate"]
