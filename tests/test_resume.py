"""Exact resume from every kind of checkpoint: a run SIGKILLed (in a subprocess) right after a checkpoint and
resumed ends with the same weights, bit for bit, as an uninterrupted run. Every run is its own process
(tests/kill_run.py) with the same settings."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sslcell.checkpoint import load
from sslcell.train import read_checkpoint
from tests.conftest import REPO


@pytest.fixture(scope="module")
def crops_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("crops") / "crops.npz"
    images = np.random.default_rng(0).integers(0, 4096, size=(72, 2, 16, 16), dtype=np.uint16)
    np.savez(path, images=images, channel_names=np.array(["a", "b"]))
    return path


def run(data, out, method: str, workers: int, where: str, max_steps: int = -1) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "tests" / "kill_run.py"), str(data), str(out), method,
                           str(workers), where, str(max_steps)], env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(small_counts_file, crops_file, tmp_path_factory):
    runs = {}
    for method, workers, max_steps in (("mae", 0, -1), ("mae", 2, -1), ("byol", 0, -1), ("image_simclr", 0, -1),
                                       ("image_simclr", 2, -1), ("mae", 0, 10), ("mae", 0, 1000)):
        out = tmp_path_factory.mktemp("full") / f"{method}{workers}_{max_steps}"
        done = run(crops_file if method.startswith("image") else small_counts_file, out, method, workers, "never",
                   max_steps)
        assert done.returncode == 0, done.stderr[-3000:]
        model = load(out)
        runs[method, workers, max_steps] = model.trained_info["global_step"], model.state_dict()
    return runs


@pytest.mark.parametrize(("method", "workers", "where", "max_steps"), [
    ("mae", 0, "epoch_end:0", -1),   # the checkpoint written at the end of the first epoch
    ("mae", 2, "epoch_end:1", -1),   # ... with loader workers
    ("byol", 0, "epoch_end:0", -1),  # a momentum method
    ("mae", 0, "step:4", -1),        # mid-epoch (every 4 steps)
    ("mae", 0, "step:12", -1),       # a step checkpoint on the epoch's last batch, killed before the epoch ends
    ("mae", 2, "step:6", -1),        # mid-epoch, second epoch, with workers (4 batches an epoch: 2 per worker)
    ("mae", 0, "epoch_end:2", -1),   # the last epoch: the run's final checkpoint, before its model is written
    ("image_simclr", 0, "epoch_end:0", -1),  # crops: 72 crops, batch 16 -> 4 batches an epoch
    ("image_simclr", 2, "epoch_end:1", -1),
    ("image_simclr", 0, "step:6", -1),       # mid-epoch
    # max_steps set: Lightning restored an epoch-end checkpoint as an unfinished epoch (a batch trained twice)
    ("mae", 0, "epoch_end:0", 10),    # max_steps binds (3 epochs of 4 batches would be 12 steps)
    ("mae", 0, "epoch_end:1", 1000),  # max_epochs binds
    ("mae", 0, "sigterm:6", -1),      # SIGTERM (a scheduler's time limit): a checkpoint at once, exit status 143
    ("mae", 2, "sigterm:5", -1),
])
def test_killed_and_resumed_equals_uninterrupted(uninterrupted, small_counts_file, crops_file, tmp_path, method,
                                                  workers, where, max_steps):
    out, data = tmp_path / "run", crops_file if method.startswith("image") else small_counts_file
    killed = run(data, out, method, workers, where, max_steps)
    if where.startswith("sigterm"):  # stopped after that batch, with a checkpoint of it, and says so
        assert killed.returncode == 143 and "stopped by SIGTERM at step" in killed.stderr, killed.stderr[-3000:]
        assert read_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] == int(where.split(":")[1])
    else:
        assert killed.returncode == -9, killed.stderr[-3000:]  # really killed, not finished
    assert (out / "checkpoints" / "last.ckpt").is_file()
    resumed = run(data, out, method, workers, "resume", max_steps)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed = load(out)
    steps, reference = uninterrupted[method, workers, max_steps]
    assert resumed.trained_info["global_step"] == steps
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, reference[key]), f"{where}: {key} differs after resume"
