"""Predict every cell's class with a trained :class:`~sslcell.classify.CellClassifier`, and score the predictions."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from sslcell.classify.classifier import CellClassifier
from sslcell.data.expression import ExpressionDataset, open_counts
from sslcell.data.genes import missing_info
from sslcell.data.images import CellImages
from sslcell.data.labels import label_strings
from sslcell.data.shards import IN_MEMORY
from sslcell.errors import InputError, SSLCellWarning
from sslcell.evaluate.metrics import ClassificationReport, classification_report
from sslcell.inference import default_device, run_batched
from sslcell.tl._keys import check_crops, check_free, check_in_place, record, refuse


def predict(
    adata: AnnData,
    classifier: CellClassifier,
    *,
    crops: CellImages | None = None,
    label_key: str | None = None,
    key_added: str = "sslcell_pred",
    channels: Sequence[int | str] | None = None,
    layer: str | None = None,
    tta: bool = False,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    max_missing_genes: float | None = None,
    counts_are_log_normalized: bool | None = None,
    overwrite: bool = False,
    copy: bool = False,
) -> AnnData | None:
    """Predict the class of every row of ``adata``.

    Writes ``obs[key_added]`` (categorical over the classifier's classes), ``obs[f"{key_added}_confidence"]`` (the
    predicted class's probability), ``obsm[f"{key_added}_proba"]`` ``(N, K)`` (probabilities, rows sum to 1, columns
    in ``uns["sslcell"][key_added]["classes"]`` order) and, with ``label_key``, the scores of the labelled cells in
    ``uns["sslcell"][key_added]["metrics"]`` (accuracy, macro-F1, balanced accuracy, macro ROC-AUC, n; the whole
    report: :func:`score`).

    Args:
        adata: expression classifiers: cells x genes (counts in ``X`` or ``layer``); image classifiers: the AnnData
            of ``crops`` (``crops.to_anndata()`` or ``tl.embed_crops``).
        crops: image classifiers only: the crops of ``adata``'s rows; ``channels`` selects the model's channels.
        tta: image classifiers only: average the probabilities over each crop's flips and 90-degree turns; a
            warning where the classifier did not train on them (:meth:`CellClassifier.tta_caveat`).
        max_missing_genes: expression classifiers only: as in :func:`~sslcell.tl.embed` (default 0.5).
        counts_are_log_normalized: expression classifiers only: ``X`` (or ``layer``) holds log1p-normalised values
            (default: as the model was trained); read as :func:`~sslcell.tl.embed` reads them.
        overwrite: replace existing results under ``key_added``; ``copy``: return a predicted copy.
    """
    if not isinstance(classifier, CellClassifier):
        raise InputError(f"classifier must be a CellClassifier (sslcell.classify); got {type(classifier).__name__}")
    for slot, key in (("obs", key_added), ("obs", f"{key_added}_confidence"), ("obsm", f"{key_added}_proba")):
        check_free(adata, slot, key, overwrite)
    check_free(adata, "record", key_added, overwrite)
    check_in_place(adata, copy)
    if label_key is not None:
        if label_key in (key_added, f"{key_added}_confidence"):
            raise InputError(f"label_key {label_key!r} is a column this call writes (key_added {key_added!r}): the "
                             "predictions would replace the true labels and be scored against themselves")
        _labelled(adata, label_key, [str(c) for c in classifier.classes])  # before anything is written
    if copy and (adata.is_view or not adata.isbacked):  # a whole backed file is read from disk, as tl.embed does
        adata = adata.to_memory() if adata.isbacked else adata.copy()
    if classifier.inputs.modality == "image":
        if crops is None:
            raise InputError("the classifier reads image crops: pass crops=cells (one crop per row of adata)")
        refuse(layer=layer, max_missing_genes=max_missing_genes, counts_are_log_normalized=counts_are_log_normalized)
        check_crops(adata, crops)
        data: Any = classifier.inputs.align(crops, channels)
        caveat = classifier.tta_caveat() if tta else None
        if caveat:
            warnings.warn(f"tta: {caveat}; compare with tta=False on labelled cells (label_key)", SSLCellWarning,
                          stacklevel=2)
        normalize: dict[str, Any] = {}
    else:
        refuse(crops=crops, channels=channels, tta=tta)
        if counts_are_log_normalized is None:
            counts_are_log_normalized = classifier.inputs.counts_are_log_normalized
        data = open_counts(adata, classifier.inputs.genes, layer=layer, max_missing_genes=max_missing_genes,
                           counts_are_log_normalized=counts_are_log_normalized)
        normalize = {"counts_are_log_normalized": counts_are_log_normalized}  # read as tl.embed reads them
    device = default_device(device)
    classifier = classifier.to(device)
    try:
        scores = run_batched(lambda x: classifier.predict_proba(x, tta=tta, **normalize), data,
                             len(classifier.classes), batch_size=batch_size, device=device)
    finally:
        if isinstance(data, ExpressionDataset):
            data.close()  # the counts file is not held open after predicting
    classes = np.asarray(classifier.classes)
    if copy and adata.isbacked:
        adata = adata.to_memory()
    adata.obs[key_added] = pd.Categorical(classes[scores.argmax(axis=1)], categories=list(classes))
    adata.obs[f"{key_added}_confidence"] = scores.max(axis=1)
    adata.obsm[f"{key_added}_proba"] = scores
    info: dict[str, Any] = {"classifier": str(getattr(classifier, "source", "<in memory>")),
                            "classes": list(classes), "tta": bool(tta)}
    if isinstance(data, ExpressionDataset):
        info.update(missing_info(data.alignment, len(classifier.inputs.genes)))
    record(adata, key_added, info)
    if label_key is not None:
        report = score(adata, label_key, key_added)
        info["metrics"] = {name: float(getattr(report, name)) for name in
                           ("accuracy", "macro_f1", "balanced_accuracy", "macro_roc_auc")} | {"n": report.n}
        info["label_key"] = label_key
    return adata if copy else None


def score(adata: AnnData, label_key: str, key_added: str = "sslcell_pred") -> ClassificationReport:
    """Score the predictions of :func:`predict` in ``obs[key_added]`` against ``obs[label_key]`` on the labelled
    cells: accuracy, macro-F1, balanced accuracy, one-vs-rest ROC-AUC, confusion matrix (a scoring function, like
    ``sc.metrics``: ``adata`` is not modified)."""
    info = adata.uns.get("sslcell", {}).get(key_added)
    if key_added not in adata.obs.columns or f"{key_added}_proba" not in adata.obsm or info is None:
        raise InputError(f"adata holds no predictions under {key_added!r}; run sslcell.tl.predict first")
    classes = [str(c) for c in info["classes"]]
    labelled = _labelled(adata, label_key, classes)
    truth = label_strings(adata.obs[label_key], f"obs[{label_key!r}]")
    return classification_report(
        truth[labelled],
        adata.obs[key_added][labelled].astype(str).to_numpy(),
        np.asarray(adata.obsm[f"{key_added}_proba"])[labelled],
        classes=classes,
    )


def _labelled(adata: AnnData, label_key: str, classes: list[str]) -> np.ndarray:
    """The mask ``(N,)`` of cells labelled in ``obs[label_key]``; raises unless some are, all among ``classes``."""
    if label_key not in adata.obs.columns:
        where = str(adata.filename) if adata.isbacked else IN_MEMORY  # the CLI names an in-memory AnnData's file
        raise InputError(f"{where}: no obs column {label_key!r}; columns are {list(adata.obs.columns)}")
    truth = label_strings(adata.obs[label_key], f"obs[{label_key!r}]")
    labelled = np.asarray([t is not None for t in truth])
    if not labelled.any():
        raise InputError(f"obs[{label_key!r}] has no labelled cell to score")
    unknown = sorted(set(truth[labelled]) - set(classes))
    if unknown:
        raise InputError(f"labels {unknown} in obs[{label_key!r}] are not classes of the classifier {classes}")
    return labelled
