"""Evaluation, in one place: probes, protocols, baselines, metrics and reports (array level).

* :mod:`~sslcell.evaluate.probes`: the one logistic probe and the kNN probe, with their defaults; class weights.
* :mod:`~sslcell.evaluate.protocols`: k-fold CV, the few-label protocol, labelled-fraction splits.
* :mod:`~sslcell.evaluate.baselines`: PCA of counts, PCA of raw pixels.
* :mod:`~sslcell.evaluate.metrics`: :func:`classification_report` -> :class:`ClassificationReport`.
* :mod:`~sslcell.evaluate.cycle_metrics`: scores of a cell-cycle position θ (circular correlation, cyclic Spearman,
  phase-arc accuracy, closure).
* :mod:`~sslcell.evaluate.report`: :class:`EvaluationReport`, what ``sslcell.tl.evaluate`` returns.

The AnnData-level entry point is :func:`sslcell.tl.evaluate`; figures are in :mod:`sslcell.pl`.
"""

from __future__ import annotations

import warnings
from typing import Any

from sslcell._namespace import public_dir
from sslcell.evaluate.baselines import pca_baseline, pixel_pca_baseline
from sslcell.evaluate.cycle_metrics import circular_correlation, closure, cyclic_spearman, phase_arc_accuracy
from sslcell.evaluate.metrics import ClassificationReport, classification_report
from sslcell.evaluate.probes import class_weight, logistic_probe, make_probe
from sslcell.evaluate.protocols import cross_validated_scores, few_label_scores, few_label_split, label_fraction_split
from sslcell.evaluate.report import EvaluationReport

__all__ = [
    "ClassificationReport",
    "EvaluationReport",
    "circular_correlation",
    "class_weight",
    "classification_report",
    "closure",
    "cross_validated_scores",
    "cyclic_spearman",
    "few_label_scores",
    "few_label_split",
    "label_fraction_split",
    "logistic_probe",
    "make_probe",
    "phase_arc_accuracy",
    "pca_baseline",
    "pixel_pca_baseline",
]


def __getattr__(name: str) -> Any:
    if name == "evaluate":  # `from sslcell.evaluate import evaluate`, before it moved to sslcell.tl (one release)
        warnings.warn("sslcell.evaluate.evaluate moved to sslcell.tl.evaluate", DeprecationWarning, stacklevel=2)
        from sslcell.tl import evaluate

        return evaluate
    raise AttributeError(f"module 'sslcell.evaluate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return public_dir(globals())
