"""Task kind crop_augmentation: the shipped suite with --quick, the synthetic fallback, the pieces it is built from."""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sslcell.benchmark import load_suite, run_suite
from sslcell.benchmark.tasks.augment_speed import ROWS, images_per_second, load_crops, median_ratio
from sslcell.cli import main
from sslcell.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "benchmarks" / "suites" / "crop_speed.yaml"
SHARED_DATA = REPO.parent / "shared" / "data"


def test_shipped_suite_quick(tmp_path):
    if not all((SHARED_DATA / f).exists() for f in ("chula_rbc12_crops48.npz", "jurkat_cellcycle_ifc_mlcp.npz")):
        pytest.skip(f"{SHARED_DATA} lacks the suite's crops")
    assert main(["benchmark", str(SUITE), "--quick", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "crop_speed_quick.json").read_text())
    task = record["tasks"]["augment"]
    raw = task["raw"]
    ips = raw["images_per_second"]
    assert set(ips) == set(ROWS) - {"sslcell_cuda"}  # peer, numerator and the three info rows; no GPU in CI
    assert all(len(v) == 1 and math.isfinite(v[0]) and v[0] > 0 for v in ips.values())
    # the verdict is the median of the per-round ratios of the numerator to the peer, against the suite's goal
    (target,) = task["targets"]
    assert target["value"] == pytest.approx(statistics.median(
        [a / b for a, b in zip(ips["sslcell"], ips["lightly"], strict=True)]))
    assert target["goal"] == 10.0 and target["met"] == (target["value"] >= 10.0)
    speed, stages = task["tables"]
    assert [r["pipeline"] for r in speed["rows"]] == [ROWS[k] for k in ROWS if k in ips]
    assert all(r["ms"] > 0 for r in stages["rows"])
    # the measurement ran in a child process with OpenMP's passive wait (unless the caller chose otherwise)
    assert raw["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    assert raw["torch_threads"] == 2 and "lightly" in raw["versions"]
    assert raw["data"]["rgb_uint8"].startswith("chula_rbc12_crops48.npz images[:512]")
    assert "channels 0, 2" in raw["data"]["uint16"]
    md = (tmp_path / "crop_speed_quick.md").read_text()
    assert "OMP_WAIT_POLICY" in md and "SimCLRTransform(input_size=64)" in md


def test_synthetic_crops_without_the_peer(tmp_path):
    suite_file = tmp_path / "aug.yaml"
    suite_file.write_text(yaml.safe_dump({"name": "aug", "tasks": [{
        "kind": "crop_augmentation", "params": {"n_images": 128, "batch_size": 32, "size": 32, "workers": 1,
                                                "augment": {"rotation_p": 1.0}},
        "quick": {"breakdown_reps": 0}}]}))  # a task's quick settings go over the kind's
    run = run_suite(load_suite(suite_file, quick=True, out=tmp_path / "out"), progress=False)
    assert not run.errors, run.errors
    result = run.results["crop_augmentation"]
    assert not result.targets  # no lightly, no ratio
    (table,) = result.tables  # no breakdown with breakdown_reps 0
    assert [r["pipeline"] for r in table.rows] == [ROWS[k] for k in ("sslcell", "sslcell_workers",
                                                                      "sslcell_simclr_like", "sslcell_uint16")]
    assert "x lightly (median per round)" not in table.columns
    assert result.raw["data"]["rgb_uint8"].startswith("synthetic uniform uint8")
    assert result.raw["config"]["rotation_p"] == 1.0 and result.raw["config"]["output_size"] == 32


@pytest.mark.parametrize(("params", "field"), [
    ({"n_images": 100, "batch_size": 64}, "n_images"),
    ({"augment": {"hflip": 2.0}}, "augment.hflip"),
    ({"augment": {"no_such_op": 1}}, "augment.no_such_op"),
    ({"rounds": 0}, "rounds"),
])
def test_bad_params_name_the_field(tmp_path, params, field):
    suite_file = tmp_path / "bad.yaml"
    suite_file.write_text(yaml.safe_dump({"tasks": [{"kind": "crop_augmentation", "params": params}]}))
    with pytest.raises(ConfigError, match=rf"tasks\[0\]\.params\..*{field}"):
        load_suite(suite_file)


def test_load_crops_resizes_repeats_and_checks_dtype(tmp_path):
    path = tmp_path / "crops.npz"
    images = np.random.default_rng(0).integers(0, 65536, (5, 3, 8, 8)).astype(np.uint16)
    np.savez(path, images=images)
    out, source = load_crops(str(path), 12, 16, np.uint16, 0, channels=[0, 2])
    assert out.shape == (12, 2, 16, 16) and out.dtype == np.uint16
    assert np.array_equal(out[:5], out[5:10]) and np.array_equal(out[10:], out[:2])  # repeated in order
    assert out[:5].mean() == pytest.approx(images[:, [0, 2]].mean(), rel=0.02)  # bilinear keeps the level
    assert "channels 0, 2" in source and "8x8 -> 16x16" in source and "repeated to 12" in source
    same, _ = load_crops(str(path), 5, 8, np.uint16, 0, channels=None)
    assert np.array_equal(same, images)  # no resize at the stored size
    with pytest.raises(ConfigError, match="needs uint8"):
        load_crops(str(path), 5, 8, np.uint8, 0, channels=None)
    synthetic, source = load_crops(None, 4, 8, np.uint8, 0, channels=None)
    assert synthetic.shape == (4, 3, 8, 8) and synthetic.dtype == np.uint8 and "synthetic" in source


def test_images_per_second_counts_from_the_first_batch():
    clock = iter([10.0, 12.0]).__next__  # first batch received at 10 s, last at 12 s
    batches = [(torch.zeros(3, 1), None), (torch.zeros(5, 1), None), (torch.zeros(7, 1), None)]
    assert images_per_second(iter(batches), clock=clock) == (5 + 7) / 2  # the first batch only starts the clock
    with pytest.raises(ValueError, match="two batches"):
        images_per_second(iter(batches[:1]))


def test_median_ratio():
    value, ratios = median_ratio([10.0, 30.0, 20.0], [1.0, 2.0, 4.0])
    assert ratios == [10.0, 15.0, 5.0] and value == 10.0


def test_unknown_data_role_is_refused_by_name_before_any_task_runs(tmp_path):
    np.savez(tmp_path / "crops.npz", images=np.zeros((4, 3, 8, 8), np.uint8))
    suite_file = tmp_path / "roles.yaml"
    suite_file.write_text(yaml.safe_dump({"name": "roles", "tasks": [{
        "kind": "crop_augmentation", "data": {"images": str(tmp_path / "crops.npz")}}]}))
    with pytest.raises(ConfigError, match=r"tasks\[0\].data.images: task kind crop_augmentation reads the roles "
                                          r"\['rgb', 'uint16'\]"):
        load_suite(suite_file, quick=True, out=tmp_path / "out")
