"""Class labels from an ``obs`` column or an array: one reading for training, prediction, scoring and transfer."""

from __future__ import annotations

import numpy as np
import pandas as pd

from sslcell._warn import warn_user
from sslcell.errors import InputError


def class_labels(values: pd.Series, what: str) -> pd.Series:
    """Labels ``(N,)`` as a categorical of class names, missing ones (NaN) kept as missing.

    Integer classes that pandas stored as floats beside NaN name their class ``"1"``, not ``"1.0"`` (so a classifier
    trained on the column and the column scored against its predictions agree); continuous floats are refused, as
    one class per cell would be (``what`` names the labels in the message)."""
    if pd.api.types.is_float_dtype(values.dtype):
        known = values.dropna().to_numpy()
        if (known != np.round(known)).any():
            raise InputError(f"{what} holds continuous values ({np.unique(known).size} distinct, e.g. {known[0]!r}); "
                             "labels are classes: pass a categorical or string column")
        values = values.astype("Int64")
    values = values if isinstance(values.dtype, pd.CategoricalDtype) else values.astype("category")
    like_missing = [c for c in values.cat.categories if isinstance(c, str) and c.strip() in MISSING_TEXT]
    if like_missing:
        warn_user(f"{what}: the label(s) {like_missing} are read as classes; if they mark cells without a label "
                  "(missing values written as text by astype(str)), set them to NaN first, e.g. "
                  f".replace({like_missing[0]!r}, np.nan)")
    return values


MISSING_TEXT = {"", "nan", "NaN", "None", "<NA>", "NA"}  # how missing labels read once converted to text


def label_strings(values: pd.Series, what: str) -> np.ndarray:
    """The class names :func:`class_labels` gives, as strings ``(N,)``; missing labels stay None."""
    labels = class_labels(values, what)
    return np.asarray([None if pd.isna(v) else str(v) for v in labels], dtype=object)
