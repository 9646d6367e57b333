"""Scanpy-style tools: AnnData in, results written into it under ``key_added``, ``None`` out unless ``copy=True``;
an existing key is refused unless ``overwrite=True``. Scoring functions (:func:`evaluate`, :func:`score`) leave the
AnnData as it is and return a report.

* :func:`embed` -> ``obsm[key_added]``; :func:`embed_crops`: crops -> a new AnnData with the embedding.
* :func:`predict` -> ``obs[key_added]``, ``obs[f"{key_added}_confidence"]``, ``obsm[f"{key_added}_proba"]``;
  :func:`score` -> a :class:`~sslcell.evaluate.ClassificationReport` of those predictions.
* :func:`evaluate` -> an :class:`~sslcell.evaluate.EvaluationReport` of embeddings against labels and baselines.
* :func:`cell_cycle` -> ``obs[f"{key_added}_theta"]`` (and ``_phase`` with anchors): each cell's position on a
  closed trajectory fitted through an embedding; from expression, :func:`score_cell_cycle` (S / G2M scores and
  phase pseudo-labels) and :func:`cell_cycle_pca` (the cycle-gene PCA baseline).
* :func:`transfer_labels` -> ``obs[f"{label_key}_pred"]``, ``obs[f"{label_key}_confidence"]`` from a labelled
  reference (an AnnData, or a saved :func:`build_reference` index), with no training.
"""

from __future__ import annotations

import warnings
from typing import Any

from sslcell._namespace import public_dir
from sslcell.tl._cellcycle import cell_cycle, cell_cycle_pca, score_cell_cycle
from sslcell.tl._embed import embed, embed_crops
from sslcell.tl._evaluate import evaluate
from sslcell.tl._predict import predict, score
from sslcell.tl._transfer import build_reference, transfer_labels

__all__ = [
    "build_reference", "cell_cycle", "cell_cycle_pca", "embed", "embed_crops", "evaluate", "predict", "score",
    "score_cell_cycle", "transfer_labels",
]


def __getattr__(name: str) -> Any:
    if name == "embed_array":  # the pre-0.2 array-level helper, kept for one release
        warnings.warn("tl.embed_array is deprecated; use sslcell.inference.embed_rows(model, cells)",
                      DeprecationWarning, stacklevel=2)
        return _embed_array
    raise AttributeError(f"module 'sslcell.tl' has no attribute {name!r}")


def _embed_array(model, cells, *, batch_size: int = 512, device=None):
    from sslcell.inference import embed_rows

    return embed_rows(model, cells, batch_size=batch_size, device=device)


def __dir__() -> list[str]:
    return public_dir(globals())
