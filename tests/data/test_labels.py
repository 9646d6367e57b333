"""sslcell.data.labels: one reading of class labels for training, prediction, scoring and transfer."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from sslcell.data.labels import class_labels
from sslcell.errors import SSLCellWarning


def test_missing_labels_written_as_text_warn_but_are_kept_as_classes():
    text = pd.Series(["a", "b", np.nan, None]).astype(str)  # 'nan' and 'None'
    with pytest.warns(SSLCellWarning, match=r"obs\['x'\]: the label\(s\) \['None', 'nan'\] are read as classes"):
        labels = class_labels(text, "obs['x']")
    assert list(labels.cat.categories) == ["None", "a", "b", "nan"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        class_labels(pd.Series(["a", None, "b"]), "obs['x']")  # real missing values: nothing to say
