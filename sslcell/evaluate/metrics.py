"""Scores of a classifier's predictions (linear probe, fine-tuned head, label transfer).

:func:`classification_report` gives accuracy, macro-F1, balanced accuracy, one-vs-rest ROC-AUC per class,
the confusion matrix and a per-class table (plots: ``sslcell.pl.confusion_matrix``, ``sslcell.pl.roc_curves``).
Labels are compared as strings: ``y_true``, ``y_pred`` and ``classes`` all pass through ``str()``, so ``1`` and
``"1"`` are the same class (but ``1.0`` is ``"1.0"``, not ``"1"``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from sslcell.errors import InputError


@dataclasses.dataclass
class ClassificationReport:
    """Scores of ``n`` predictions over ``K`` classes.

    ``classes``: class names in the order of the score columns and the confusion axes.
    ``roc_auc``: one-vs-rest AUC per class; ``nan`` where the class is absent from ``y_true``, is the only
    class present, or no scores were given. ``macro_roc_auc``: mean of the finite per-class AUCs (``nan`` if none).
    ``confusion``: ``(K, K)`` int64 counts, rows = true, columns = predicted.
    ``per_class``: index ``classes``; columns ``precision``, ``recall``, ``f1``, ``support`` (true count).
    """

    classes: list[str]
    accuracy: float
    macro_f1: float
    balanced_accuracy: float
    roc_auc: dict[str, float]
    macro_roc_auc: float
    confusion: np.ndarray
    per_class: pd.DataFrame
    n: int

    def to_dict(self) -> dict:
        """JSON-ready: lists, ints and floats; ``nan`` becomes ``None``.

        ``per_class`` maps each class to its ``precision``, ``recall``, ``f1``, ``support``.
        """
        per_class = {
            name: {
                "precision": _json_float(row["precision"]),
                "recall": _json_float(row["recall"]),
                "f1": _json_float(row["f1"]),
                "support": int(row["support"]),
            }
            for name, row in self.per_class.iterrows()
        }
        return {
            "classes": list(self.classes),
            "n": int(self.n),
            "accuracy": _json_float(self.accuracy),
            "macro_f1": _json_float(self.macro_f1),
            "balanced_accuracy": _json_float(self.balanced_accuracy),
            "macro_roc_auc": _json_float(self.macro_roc_auc),
            "roc_auc": {name: _json_float(v) for name, v in self.roc_auc.items()},
            "confusion": np.asarray(self.confusion, dtype=np.int64).tolist(),
            "per_class": per_class,
        }

    @classmethod
    def from_dict(cls, data: dict) -> ClassificationReport:
        """The report :meth:`to_dict` wrote (``None`` back to ``nan``)."""

        def number(value) -> float:
            return math.nan if value is None else float(value)

        classes = [str(c) for c in data["classes"]]
        rows = [data["per_class"][c] for c in classes]
        per_class = pd.DataFrame(
            {**{k: np.array([number(r[k]) for r in rows]) for k in ("precision", "recall", "f1")},
             "support": np.array([int(r["support"]) for r in rows], dtype=np.int64)},
            index=pd.Index(classes, name="class"))
        return cls(classes=classes, accuracy=number(data["accuracy"]), macro_f1=number(data["macro_f1"]),
                   balanced_accuracy=number(data["balanced_accuracy"]),
                   roc_auc={str(c): number(v) for c, v in data["roc_auc"].items()},
                   macro_roc_auc=number(data["macro_roc_auc"]),
                   confusion=np.asarray(data["confusion"], dtype=np.int64), per_class=per_class, n=int(data["n"]))

    def to_json(self, path: str | Path) -> None:
        """Write :meth:`to_dict` as JSON (strict: no ``NaN`` tokens); an existing file is replaced."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")

    def to_markdown(self, title: str | None = None) -> str:
        """A summary table (accuracy, macro-F1, balanced accuracy, macro ROC-AUC) and a per-class table.

        Values have 3 decimals; ``n/a`` marks an undefined AUC.
        """
        lines = [
            f"## {title or 'Classification report'}",
            "",
            f"{self.n} samples, {len(self.classes)} classes.",
            "",
            "| metric | value |",
            "|---|---:|",
            f"| accuracy | {_fmt(self.accuracy)} |",
            f"| macro-F1 | {_fmt(self.macro_f1)} |",
            f"| balanced accuracy | {_fmt(self.balanced_accuracy)} |",
            f"| macro ROC-AUC (one-vs-rest) | {_fmt(self.macro_roc_auc)} |",
            "",
        ]
        absent = [str(name) for name, row in self.per_class.iterrows() if int(row["support"]) == 0]
        if absent:
            lines += [f"Classes without true samples (no recall, no ROC-AUC; in the macro-F1 with F1 0 only where "
                      f"predicted): {', '.join(absent)}.", ""]
        lines += [
            "| class | precision | recall | F1 | ROC-AUC | support |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, row in self.per_class.iterrows():
            lines.append(
                f"| {str(name).replace('|', chr(92) + '|')} | {_fmt(row['precision'])} | {_fmt(row['recall'])} "
                f"| {_fmt(row['f1'])} | {_fmt(self.roc_auc[name])} | {int(row['support'])} |"
            )
        return "\n".join(lines) + "\n"


def classification_report(
    y_true: Sequence | np.ndarray | pd.Series | pd.Categorical,
    y_pred: Sequence | np.ndarray | pd.Series | pd.Categorical,
    scores: np.ndarray | None = None,
    classes: Sequence | None = None,
) -> ClassificationReport:
    """Score predictions ``y_pred`` ``(N,)`` against ``y_true`` ``(N,)``.

    Labels may be strings or integers, in any array-like or a pandas Categorical; they are compared
    as strings (``str()``). ``scores``: ``(N, K)`` class probabilities or decision scores, columns in
    ``classes`` order, used for the one-vs-rest ROC-AUC (all ``nan`` without them). ``classes``: the
    ``K`` class names; required with ``scores``; by default the sorted union of ``y_true`` and ``y_pred``
    (numerically when every label reads as a number, else as strings).

    Macro-F1 averages over the classes that occur in ``y_true`` or ``y_pred`` (scikit-learn's default: a class
    predicted but never true counts as F1 0; a listed class that occurs in neither has no F1 and is left out);
    balanced accuracy is the mean recall over the classes present in ``y_true``.
    """
    t = _labels(y_true, "y_true")
    p = _labels(y_pred, "y_pred")
    if len(t) != len(p):
        raise InputError(f"y_true has {len(t)} labels but y_pred has {len(p)}")
    if len(t) == 0:
        raise InputError("y_true and y_pred are empty: nothing to score")
    if classes is None:
        if scores is not None:
            raise InputError("classes must be given with scores: they name the score columns, in order")
        names = _sorted_labels(np.union1d(t, p))
    else:
        names = _classes(classes)
        _check_known(t, names, "y_true")
        _check_known(p, names, "y_pred")
    n = len(t)
    seen = set(t) | set(p)

    precision, recall, f1, support = precision_recall_fscore_support(t, p, labels=names, zero_division=0)
    with warnings.catch_warnings():
        # y_pred may name classes absent from y_true; they are left out of the mean recall, as documented
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true", category=UserWarning)
        balanced = balanced_accuracy_score(t, p)

    if scores is None:
        auc = {name: math.nan for name in names}
    else:
        auc = _per_class_auc(t, _scores(scores, n, names), names)
    finite = [v for v in auc.values() if math.isfinite(v)]

    return ClassificationReport(
        classes=names,
        accuracy=float(accuracy_score(t, p)),
        macro_f1=float(f1_score(t, p, labels=[c for c in names if c in seen], average="macro", zero_division=0)),
        balanced_accuracy=float(balanced),
        roc_auc=auc,
        macro_roc_auc=float(np.mean(finite)) if finite else math.nan,
        confusion=confusion_matrix(t, p, labels=names).astype(np.int64),
        per_class=pd.DataFrame(
            {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)},
            index=pd.Index(names, name="class"),
        ),
        n=n,
    )


def _labels(y, name: str) -> np.ndarray:
    """Labels as a 1-D array of ``str``; missing labels (None/NaN) and other shapes are refused."""
    values = np.asarray(y, dtype=object)
    if values.ndim != 1:
        raise InputError(f"{name} must be 1-D (N,); got shape {values.shape}")
    missing = pd.isna(values)
    if missing.any():
        raise InputError(f"{name} has {int(missing.sum())} missing labels (first at index {int(np.argmax(missing))})")
    return values.astype(str)


def _classes(classes: Sequence) -> list[str]:
    names = [str(c) for c in classes]
    if not names:
        raise InputError("classes is empty")
    duplicated = sorted({c for c in names if names.count(c) > 1})
    if duplicated:
        raise InputError(f"classes has duplicates (as strings): {duplicated}")
    return names


def _sorted_labels(labels: np.ndarray) -> list[str]:
    """Numeric order when every label reads as a number (so ``2`` precedes ``10``), else string order."""
    try:
        keys = [(float(v), str(v)) for v in labels]
    except ValueError:
        return sorted(str(v) for v in labels)
    if not all(math.isfinite(x) for x, _ in keys):
        return sorted(str(v) for v in labels)
    return [v for _, v in sorted(keys)]


def _check_known(labels: np.ndarray, names: list[str], field: str) -> None:
    unknown = np.setdiff1d(labels, np.asarray(names, dtype=str))
    if unknown.size:
        raise InputError(
            f"{field} has labels not in classes: {unknown[:10].tolist()}"
            + (f" (and {unknown.size - 10} more)" if unknown.size > 10 else "") + f"; classes: {names}"
        )


def _scores(scores, n: int, names: list[str]) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape != (n, len(names)):
        raise InputError(f"scores must have shape (N, K) = ({n}, {len(names)}) (labels x classes); got {s.shape}")
    bad = ~np.isfinite(s)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise InputError(
            f"scores has {int(bad.sum())} NaN or inf values (first at row {row}, column {col} = {names[col]!r})"
        )
    return s


def _per_class_auc(t: np.ndarray, s: np.ndarray, names: list[str]) -> dict[str, float]:
    """One-vs-rest AUC of column ``k`` for class ``names[k]``; nan when that class is absent or alone in ``t``."""
    out = {}
    for k, name in enumerate(names):
        positive = t == name
        n_pos = int(np.count_nonzero(positive))
        out[name] = float(roc_auc_score(positive, s[:, k])) if 0 < n_pos < len(t) else math.nan
    return out


def _json_float(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _fmt(value) -> str:
    value = float(value)
    return f"{value:.3f}" if math.isfinite(value) else "n/a"
