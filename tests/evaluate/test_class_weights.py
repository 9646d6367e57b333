"""Class balancing: one formula for the fine-tuning loss (array) and the logistic probes (scikit-learn dict)."""

from __future__ import annotations

import numpy as np
import pytest

from sslcell.evaluate.probes import balanced_class_weights, class_weight


def test_balanced_class_weights_and_the_probe_class_weight_agree():
    weights = balanced_class_weights(np.array([0, 0, 0, 1]), 3)
    np.testing.assert_allclose(weights, [4 / 6, 2.0, 0.0])  # n / (K_present * count_k); 0 for an absent class
    np.testing.assert_allclose(balanced_class_weights(np.array([0, 0, 0, 1]), 3, 0.5), [(4 / 6) ** 0.5, 2**0.5, 0.0])
    assert class_weight(np.array(["b", "b", "b", "a"]), 1.0) == "balanced"
    assert class_weight(np.array(["b", "b", "b", "a"]), False) is None
    assert class_weight(np.array(["b", "b", "b", "a"]), 0.5) == pytest.approx({"a": 2**0.5, "b": (4 / 6) ** 0.5})
