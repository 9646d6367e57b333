from __future__ import annotations

import os

# One BLAS / OpenMP thread, set before numpy and torch load, in the test process and in every process it starts
# (the CLI tour, benchmark children, DataLoader workers, DDP's ranks), which inherit the environment: the models are
# tiny, and those processes then share CI's two cores without spinning thread pools. Measured on the 2-core machine:
# the suite in 681 s in one process, 1,332 s in two pytest-xdist workers. A value already set is kept.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

torch.set_num_threads(1)  # in case torch was imported before this file


@pytest.fixture(scope="session")
def small_counts():
    """A small synthetic raw-count AnnData (400 cells x 200 genes, 4 cell types, 2 batches)."""
    from sslcell.data.synthetic import make_expression

    return make_expression(n_cells=400, n_genes=200, n_cell_types=4, n_batches=2, seed=1)


@pytest.fixture(scope="session")
def small_counts_file(small_counts, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "counts.h5ad"
    small_counts.write_h5ad(path)
    return path


def tiny_recipe(name: str = "mae", **overrides):
    """A recipe small enough to train in seconds on a CPU."""
    from sslcell.config import RecipeConfig

    values = {
        "modality": "expression",
        "method": {"name": name, "projection_dim": 16, "projection_hidden": 32},
        "encoder": {"hidden": [32, 16], "latent": 8, "dropout": 0.0},
        "data": {"n_top_genes": 100, "batch_size": 64, "block_size": 32, "buffer_blocks": 4},
        "train": {"max_epochs": 2, "seed": 0, "progress_bar": False, "checkpoint_every_n_steps": 3,
                  "accelerator": "cpu", "log_every_n_steps": 1},
    }
    for section, fields in overrides.items():
        values.setdefault(section, {}).update(fields)
    return RecipeConfig.from_dict(values)


TINY_IMAGE_ENCODERS = {
    "resnet": {"name": "resnet_tiny", "options": {"base_width": 4}},
    "vit": {"name": "vit_tiny", "options": {"patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2}},
}


def tiny_image_recipe(name: str = "simclr", kind: str = "resnet", **overrides):
    """An image recipe (32-cell batches, 32-wide encoders, 1 epoch, CPU) that trains in seconds."""
    from sslcell.config import RecipeConfig

    values = {
        "modality": "image",
        "method": {"name": name, "projection_dim": 16, "projection_hidden": 32, "bottleneck_dim": 8,
                   "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2},
        "encoder": dict(TINY_IMAGE_ENCODERS[kind]),
        "data": {"batch_size": 32},
        "train": {"max_epochs": 1, "seed": 0, "progress_bar": False, "accelerator": "cpu"},
    }
    for section, fields in overrides.items():
        values.setdefault(section, {}).update(fields)
    return RecipeConfig.from_dict(values)
