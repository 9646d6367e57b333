"""Deprecated module, kept for one release: prediction moved to :func:`sslcell.tl.predict` (AnnData in, results
under ``key_added``) and :func:`sslcell.tl.score`; plots to :mod:`sslcell.pl`."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anndata import AnnData

from sslcell.classify.classifier import CellClassifier
from sslcell.data.images import CellImages
from sslcell.errors import InputError
from sslcell.evaluate.metrics import ClassificationReport

log = logging.getLogger(__name__)

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
    """Deprecated: ``adata = cells.to_anndata(); sslcell.tl.predict(adata, classifier, crops=cells, ...)``.

    Returns the old layout: a new AnnData with ``obs[f"{key_added}_pred"]``, ``obs[f"{key_added}_score_{class}"]``,
    ``obsm[f"{key_added}_scores"]``, and the report (or ``None`` without ``label_key``).
    """
    from sslcell.tl import predict as tl_predict
    from sslcell.tl import score

    warnings.warn("classify.predict is deprecated; use sslcell.tl.predict(adata, classifier, crops=cells)",
                  DeprecationWarning, stacklevel=2)
    if label_key is not None and label_key not in cells.obs.columns:
        raise InputError(f"cells have no obs column {label_key!r}; columns are {list(cells.obs.columns)}")
    cells = classifier.inputs.align(cells, channels)
    adata = cells.to_anndata()
    new = f"{key_added}_pred"
    tl_predict(adata, classifier, crops=cells, key_added=new, tta=tta, batch_size=batch_size, device=device)
    report = score(adata, label_key, new) if label_key is not None else None
    scores = adata.obsm.pop(f"{new}_proba")
    del adata.obs[f"{new}_confidence"]
    info = adata.uns["sslcell"].pop(new)
    for k, name in enumerate(info["classes"]):
        adata.obs[f"{key_added}_score_{name}"] = scores[:, k]
    adata.obsm[f"{key_added}_scores"] = scores
    adata.uns["sslcell"][f"{key_added}_classes"] = list(info["classes"])
    adata.uns["sslcell"][f"{key_added}_tta"] = bool(tta)
    return adata, report


def write_report(report: ClassificationReport, adata: AnnData, label_key: str, out: str | Path,
                 key_added: str = "sslcell") -> list[Path]:
    """Deprecated: ``metrics.json``, ``metrics.md``, ``confusion_matrix.png`` and ``roc_curves.png`` into ``out``,
    for the layout of the deprecated :func:`predict`."""
    warnings.warn("classify.predict.write_report is deprecated", DeprecationWarning, stacklevel=2)
    labelled = ~adata.obs[label_key].isna().to_numpy()
    truth = adata.obs[label_key][labelled].astype(str).to_numpy()
    return write_metrics(report, truth, np.asarray(adata.obsm[f"{key_added}_scores"])[labelled], out)


METRIC_FILES = ("metrics.json", "metrics.md", "confusion_matrix.png", "roc_curves.png")  # what write_metrics writes


def write_metrics(report: ClassificationReport, truth: np.ndarray, scores: np.ndarray, out: str | Path) -> list[Path]:
    """``metrics.json``, ``metrics.md``, ``confusion_matrix.png`` and (with two or more true classes)
    ``roc_curves.png`` into ``out``; ``truth`` ``(n,)`` and ``scores`` ``(n, K)`` are the scored cells'."""
    from sslcell import pl

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report.to_json(out / "metrics.json")
    (out / "metrics.md").write_text(report.to_markdown(title="Prediction metrics"))
    pl.confusion_matrix(report, path=out / "confusion_matrix.png")
    files = [out / "metrics.json", out / "metrics.md", out / "confusion_matrix.png"]
    if len(np.unique(truth)) > 1:
        pl.roc_curves(truth, scores, report.classes, path=out / "roc_curves.png")
        files.append(out / "roc_curves.png")
    else:
        log.info("roc_curves.png not drawn: every labelled cell is %r (one-vs-rest ROC needs two true classes)",
                 str(truth[0]))
    return files
