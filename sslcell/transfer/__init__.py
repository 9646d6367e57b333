"""Label transfer on embeddings: exact faiss kNN search, a kNN classifier, a neighbours transformer.

Probes, protocols and baselines moved to :mod:`sslcell.evaluate` (still importable from here for one release).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from sslcell._namespace import public_dir
from sslcell.transfer.knn import FaissKNNClassifier, FaissNeighbors, knn_transfer
from sslcell.transfer.reference import ReferenceIndex

__all__ = ["FaissKNNClassifier", "FaissNeighbors", "ReferenceIndex", "knn_transfer"]

_MOVED = {
    "cross_validated_scores": "protocols",
    "few_label_scores": "protocols",
    "few_label_split": "protocols",
    "make_probe": "probes",
    "pca_baseline": "baselines",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(f"sslcell.transfer.{name} moved to sslcell.evaluate", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(f"sslcell.evaluate.{_MOVED[name]}"), name)
    raise AttributeError(f"module 'sslcell.transfer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return public_dir(globals())
