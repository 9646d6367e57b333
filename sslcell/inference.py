"""Batched inference, the one loop every consumer uses: embeddings (``tl.embed``, linear probes) and class
probabilities (``tl.predict``), for crops and for expression.

Rows are read in chunks (a :class:`~sslcell.data.images.CellImages` batch ``(B, C, H, W)`` in its stored dtype, or
a CSR chunk of an :class:`~sslcell.data.expression.ExpressionDataset` made dense ``(B, G)``), moved to the device,
passed through ``fn`` and written into one preallocated ``(N, K)`` float32 array. The model's own ``normalize``
runs inside ``fn``, on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sslcell.errors import InputError


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or CUDA when available, else CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def iter_batches(data: Any, batch_size: int) -> Iterator[tuple[int, int, Tensor]]:
    """``(start, stop, batch)`` over the rows of ``data``: crops ``(B, C, H, W)`` or dense counts ``(B, G)``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch_size: must be a whole number >= 1, got {batch_size!r}")
    if hasattr(data, "iter_chunks"):  # ExpressionDataset: sparse chunks read in order
        for start, stop, chunk in data.iter_chunks(batch_size):
            yield start, stop, torch.from_numpy(chunk.toarray())
        return
    n = len(data)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        yield start, stop, torch.from_numpy(data.batch(np.arange(start, stop)))


@torch.no_grad()
def run_batched(
    fn: Callable[[Tensor], Tensor],
    data: Any,
    width: int,
    *,
    batch_size: int,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Apply ``fn`` (a batch on ``device`` -> ``(B, width)``) to every row of ``data`` -> ``(N, width)`` float32."""
    device = default_device(device)
    n = data.n_obs if hasattr(data, "n_obs") else len(data)
    out = np.empty((n, width), dtype=np.float32)
    for start, stop, batch in iter_batches(data, batch_size):
        out[start:stop] = fn(batch.to(device, non_blocking=True)).float().cpu().numpy()
    return out


def embed_rows(
    model: Any,
    data: Any,
    *,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    inspect: Callable[[Tensor], None] | None = None,
    **normalize: Any,
) -> np.ndarray:
    """Embeddings ``(N, D)`` float32 of ``data`` (crops aligned to the model's channels, or an expression dataset
    aligned to its genes) by a pretrained ``model``, in eval mode; ``normalize`` goes to ``inputs.normalize``.
    ``inspect`` sees each raw batch (on ``device``) first, e.g. to count empty cells."""

    def encode(x: Tensor) -> Tensor:
        if inspect is not None:
            inspect(x)
        return model.encoder(model.inputs.normalize(x, **normalize))

    device = default_device(device)
    model = model.to(device)
    was_training = model.training
    model.eval()
    try:
        return run_batched(
            encode,
            data,
            model.embed_dim,
            batch_size=batch_size,
            device=device,
        )
    finally:
        model.train(was_training)
