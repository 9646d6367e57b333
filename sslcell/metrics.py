"""Deprecated module, kept for one release: the metrics moved to :mod:`sslcell.evaluate.metrics` and the plots to
:mod:`sslcell.pl` (``pl.confusion_matrix``, ``pl.roc_curves``, which return the figure)."""

from __future__ import annotations

import warnings
from pathlib import Path

from sslcell.evaluate.metrics import ClassificationReport, classification_report

warnings.warn(
    "sslcell.metrics is deprecated: use sslcell.evaluate (metrics) and sslcell.pl (plots)",
    DeprecationWarning,
    stacklevel=2,
)


def plot_confusion_matrix(report: ClassificationReport, path: str | Path, *, normalize: bool = True,
                          title: str | None = None) -> Path:
    """Deprecated: ``sslcell.pl.confusion_matrix(report, path=...)``. Writes the PNG and returns its path."""
    from sslcell.pl import confusion_matrix

    confusion_matrix(report, normalize=normalize, title=title, path=path)
    return Path(path)


def plot_roc_curves(y_true, scores, classes, path: str | Path, *, title: str | None = None) -> Path:
    """Deprecated: ``sslcell.pl.roc_curves(y_true, scores, classes, path=...)``. Writes the PNG, returns its path."""
    from sslcell.pl import roc_curves

    roc_curves(y_true, scores, classes, title=title, path=path)
    return Path(path)


__all__ = ["ClassificationReport", "classification_report", "plot_confusion_matrix", "plot_roc_curves"]
