"""Figures of a classifier's scores: the confusion matrix and one-vs-rest ROC curves.

Both draw on a ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot state, no backend change).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from sslcell.errors import InputError
from sslcell.evaluate.metrics import ClassificationReport, _check_known, _classes, _labels, _scores
from sslcell.pl._utils import save


def confusion_matrix(
    report: ClassificationReport, *, normalize: bool = True, title: str | None = None, path: str | Path | None = None
) -> Figure:
    """The confusion matrix of ``report``; saved as PNG at ``path`` when given (replaced if present).

    Colours: each row divided by its true count (the recall of that class; a row without true samples
    stays 0) when ``normalize``, else raw counts. Every cell is annotated with its raw count.
    """
    if not isinstance(report, ClassificationReport):
        raise InputError(f"report: a ClassificationReport (from tl.score(adata, label_key)); got "
                         f"{type(report).__name__}")
    counts = np.asarray(report.confusion, dtype=np.int64)
    k = len(report.classes)
    if normalize:
        rows = counts.sum(axis=1, keepdims=True)
        values = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
        vmax, bar_label = 1.0, "fraction of true class"
    else:
        values = counts.astype(float)
        vmax, bar_label = max(float(values.max()), 1.0), "count"

    side = max(4.0, 0.55 * k + 2.5)
    fig = Figure(figsize=(side + 1.0, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=bar_label)

    digits = len(str(int(counts.max(initial=0))))
    fontsize = float(np.clip(50 / digits, 6, 12))  # cells are >= ~0.5 inch wide: up to 4 digits fit at 12 pt
    ii, jj = np.indices(counts.shape)
    for i, j, c, v in zip(ii.ravel(), jj.ravel(), counts.ravel(), values.ravel(), strict=True):
        ax.text(j, i, str(c), ha="center", va="center", fontsize=fontsize,
                color="white" if v > 0.5 * vmax else "black")  # fmt: skip

    ax.set_xticks(np.arange(k), labels=report.classes, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(np.arange(k), labels=report.classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"Confusion matrix (n={report.n}, accuracy {report.accuracy:.3f})")
    return save(fig, path)


def roc_curves(
    y_true: Sequence | np.ndarray | pd.Series | pd.Categorical,
    scores: np.ndarray,
    classes: Sequence,
    *,
    title: str | None = None,
    path: str | Path | None = None,
) -> Figure:
    """One-vs-rest ROC curves; saved as PNG at ``path`` when given (replaced if present).

    ``y_true`` ``(N,)`` labels, ``scores`` ``(N, K)`` with columns in ``classes`` order (labels compared
    as strings). One curve per class present in ``y_true`` (legend with its AUC), plus the chance diagonal.
    """
    t = _labels(y_true, "y_true")
    if len(t) == 0:
        raise InputError("y_true is empty: no ROC curve to draw")
    names = _classes(classes)
    _check_known(t, names, "y_true")
    s = _scores(scores, len(t), names)
    drawable = [k for k, name in enumerate(names) if 0 < np.count_nonzero(t == name) < len(t)]
    if not drawable:
        raise InputError(f"y_true holds a single class ({t[0]!r}): one-vs-rest ROC curves need at least two")

    fig = Figure(figsize=(7.5 if len(drawable) > 10 else 6.0, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["tab10" if len(drawable) <= 10 else "tab20"]
    colors = [cmap(i % cmap.N) for i in range(len(drawable))]
    for color, k in zip(colors, drawable, strict=True):
        positive = t == names[k]
        fpr, tpr, _ = roc_curve(positive, s[:, k])
        auc = roc_auc_score(positive, s[:, k])
        ax.plot(fpr, tpr, color=color, linewidth=1.5, label=f"{names[k]} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.5", linewidth=1, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title or f"One-vs-rest ROC (n={len(t)})")
    if len(drawable) > 10:
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7, frameon=False)
    else:
        ax.legend(loc="lower right", fontsize=8)
    return save(fig, path)
