"""Apply a :class:`CellClassifier` to crops: predictions into ``obs``, and metrics and plots where labels are known."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from sslcell.classify.classifier import CellClassifier
from sslcell.data.images import CellImages
from sslcell.errors import InputError
from sslcell.metrics import ClassificationReport, classification_report, plot_confusion_matrix, plot_roc_curves


def predict(
    classifier: CellClassifier,
    cells: CellImages,
    *,
    channels: Any = None,
    key_added: str = "sslcell",
    label_key: str | None = None,
    batch_size: int = 512,
    tta: bool = False,
    device: str | torch.device | None = None,
) -> tuple[AnnData, ClassificationReport | None]:
    """Predict every crop's class.

    Returns a new AnnData (one row per cell, the crops' ``obs``) with ``obs[f"{key_added}_pred"]`` (categorical,
    the classifier's classes) and ``obs[f"{key_added}_score_{class}"]`` (probabilities, rows sum to 1), plus
    the scores ``(N, K)`` in ``obsm[f"{key_added}_scores"]``. With ``label_key`` (an ``obs`` column), the labelled
    cells are scored: a :class:`ClassificationReport` is returned too (``None`` otherwise). ``tta`` averages the
    scores over the crop's flips and 90-degree turns (:meth:`CellClassifier.predict_proba`).
    """
    cells = classifier.inputs.align(cells, channels)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    classifier = classifier.to(device)
    scores = np.empty((len(cells), len(classifier.classes)), dtype=np.float32)
    for start in range(0, len(cells), batch_size):
        rows = np.arange(start, min(start + batch_size, len(cells)))
        scores[rows] = classifier.predict_proba(torch.from_numpy(cells.batch(rows)), tta=tta).cpu().numpy()
    adata = cells.to_anndata()
    classes = np.asarray(classifier.classes)
    adata.obs[f"{key_added}_pred"] = pd.Categorical(classes[scores.argmax(axis=1)], categories=list(classes))
    for k, name in enumerate(classes):
        adata.obs[f"{key_added}_score_{name}"] = scores[:, k]
    adata.obsm[f"{key_added}_scores"] = scores
    adata.uns.setdefault("sslcell", {})[f"{key_added}_classes"] = list(classes)
    adata.uns["sslcell"][f"{key_added}_tta"] = bool(tta)
    report = None
    if label_key is not None:
        if label_key not in adata.obs.columns:
            raise InputError(f"{cells.source}: no obs column {label_key!r}; columns are {list(cells.obs.columns)}")
        truth = adata.obs[label_key]
        labelled = ~truth.isna().to_numpy()
        unknown = sorted(set(truth[labelled].astype(str)) - set(classes))
        if unknown:
            raise InputError(f"{cells.source}: labels {unknown} in obs[{label_key!r}] are not classes of the classifier {list(classes)}")
        report = classification_report(
            truth[labelled].astype(str).to_numpy(),
            adata.obs[f"{key_added}_pred"][labelled].astype(str).to_numpy(),
            scores[labelled],
            classes=list(classes),
        )
    return adata, report


def write_report(report: ClassificationReport, adata: AnnData, label_key: str, out: str | Path, key_added: str = "sslcell") -> list[Path]:
    """``metrics.json``, ``metrics.md``, ``confusion_matrix.png`` and ``roc_curves.png`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report.to_json(out / "metrics.json")
    (out / "metrics.md").write_text(report.to_markdown(title="Prediction metrics"))
    labelled = ~adata.obs[label_key].isna().to_numpy()
    files = [out / "metrics.json", out / "metrics.md", plot_confusion_matrix(report, out / "confusion_matrix.png")]
    truth = adata.obs[label_key][labelled].astype(str).to_numpy()
    if len(np.unique(truth)) > 1:
        files.append(plot_roc_curves(truth, adata.obsm[f"{key_added}_scores"][labelled], report.classes, out / "roc_curves.png"))
    return files
