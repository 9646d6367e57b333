"""Shared test data for the cell-crop tests (containers and readers)."""

from __future__ import annotations

import numpy as np
import pytest

NAMES = ["brightfield", "fluorescence", "darkfield"]


def make_images(n=12, c=3, h=8, w=10, dtype=np.uint16, seed=0) -> np.ndarray:
    """Random crops using the full range of ``dtype`` (uint16 values far above 255, 65535 included)."""
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max if np.dtype(dtype).kind == "u" else 1.0
    x = rng.integers(0, int(top) + 1, size=(n, c, h, w)) if np.dtype(dtype).kind == "u" else rng.random((n, c, h, w))
    x = x.astype(dtype)
    if np.dtype(dtype).kind == "u":
        x.flat[0] = top
    return x


@pytest.fixture
def x16():
    return make_images()
