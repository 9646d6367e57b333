"""Exact resume from every kind of checkpoint: a run SIGKILLed right after a checkpoint and resumed ends with the
same weights, bit for bit, as an uninterrupted run. Every run is its own process, forked from one driver
(tests/kill_run.py) that imported torch and Lightning once, with the same settings; the driver runs every case of
this file in one go."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sslcell.checkpoint import load
from sslcell.train import read_checkpoint
from tests.conftest import REPO

FULL = [("mae", 0, -1), ("mae", 2, -1), ("byol", 0, -1), ("image_simclr", 0, -1), ("image_simclr", 2, -1),
        ("mae", 0, 10), ("mae", 0, 1000)]
CASES = [
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
]


@pytest.fixture(scope="module")
def crops_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("crops") / "crops.npz"
    images = np.random.default_rng(0).integers(0, 4096, size=(72, 2, 16, 16), dtype=np.uint16)
    np.savez(path, images=images, channel_names=np.array(["a", "b"]))
    return path


@pytest.fixture(scope="module")
def runs(small_counts_file, crops_file, tmp_path_factory):
    """Every uninterrupted run and every case's killed run and its resume, through one driver. Returns
    ``{"full": {key: (global_step, state_dict)}, case: (folder, [killed status, resumed status], [logs])}``."""
    root = tmp_path_factory.mktemp("resume")

    def job(name: str, method: str, workers: int, where: str, max_steps: int) -> dict:
        data = crops_file if method.startswith("image") else small_counts_file
        return {"data": str(data), "out": str(root / name), "method": method, "workers": workers, "where": where,
                "max_steps": max_steps, "log": str(root / f"{name}.{where.replace(':', '_')}.log")}

    chains = [[job(f"full_{m}{w}_{s}", m, w, "never", s)] for m, w, s in FULL]
    chains += [[job(f"case{i}", m, w, where, s), job(f"case{i}", m, w, "resume", s)]
               for i, (m, w, where, s) in enumerate(CASES)]
    (root / "jobs.json").write_text(json.dumps(chains))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "kill_run.py"), str(root / "jobs.json")], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    codes = json.loads((root / "jobs.json").with_suffix(".done").read_text())
    result = {"full": {}}
    for (method, workers, max_steps), chain, code in zip(FULL, chains[:len(FULL)], codes[:len(FULL)], strict=True):
        assert code == [0], Path(chain[0]["log"]).read_text()[-3000:]
        model = load(chain[0]["out"])
        result["full"][method, workers, max_steps] = model.trained_info["global_step"], model.state_dict()
    for case, chain, code in zip(CASES, chains[len(FULL):], codes[len(FULL):], strict=True):
        logs = [Path(j["log"]).read_text() for j in chain]
        result[case] = Path(chain[0]["out"]), code, logs, Path(chain[0]["log"] + ".ckpt")
    return result


@pytest.mark.parametrize(("method", "workers", "where", "max_steps"), CASES)
def test_killed_and_resumed_equals_uninterrupted(runs, method, workers, where, max_steps):
    out, (killed, resumed), (killed_log, resumed_log), left = runs[method, workers, where, max_steps]
    if where.startswith("sigterm"):  # stopped after that batch, with a checkpoint of it, and says so
        assert killed == 143 and "stopped by SIGTERM at step" in killed_log, killed_log[-3000:]
        assert read_checkpoint(left)["global_step"] == int(where.split(":")[1])
    else:
        assert killed == -9, killed_log[-3000:]  # really killed, not finished
    assert left.is_file()  # the killed run left a checkpoint to resume from
    assert resumed == 0, resumed_log[-3000:]
    resumed = load(out)
    steps, reference = runs["full"][method, workers, max_steps]
    assert resumed.trained_info["global_step"] == steps
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, reference[key]), f"{where}: {key} differs after resume"
