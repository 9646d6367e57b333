"""Shared by the tl tests: 80 labelled two-channel crops and an untrained tiny image model over them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sslcell.data.images import CellImages
from sslcell.methods import build_method
from tests.conftest import tiny_image_recipe

S, NAMES = 16, ["dna", "actin"]


def blobs(y: np.ndarray, seed: int) -> np.ndarray:
    """(n, 2, S, S) uint8 gaussian cells; class 1 brighter in "actin"."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:S, :S]
    centre = rng.uniform(5, S - 5, size=(len(y), 2))
    blob = np.exp(-((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2) / 12.5)
    x = np.stack([20 + 150 * blob, 20 + np.where(y == 1, 110, 50)[:, None, None] * blob], axis=1)
    return np.clip(x + rng.normal(0, 10, x.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def cells() -> CellImages:
    y = np.arange(80) % 2
    labels = pd.Categorical(np.array(["neg", "pos"])[y])
    return CellImages.from_array(blobs(y, 0), channel_names=NAMES, labels=labels)


@pytest.fixture(scope="module")
def model(cells):
    stats = cells.channel_stats()
    contract = {"modality": "image", "channel_names": NAMES, "channel_mean": stats["mean"],
                "channel_std": stats["std"], "image_size": [S, S], "dtype": "uint8"}
    torch.manual_seed(0)
    return build_method(tiny_image_recipe("simclr"), contract).eval()
