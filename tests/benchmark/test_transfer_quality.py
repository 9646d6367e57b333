"""Task kind transfer_quality: the split, the targets, runs on generated counts and crops, the shipped suite --quick."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from sslcell.benchmark import load_suite, run_suite
from sslcell.benchmark.tasks import transfer_quality as kind
from sslcell.cli import main
from sslcell.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "benchmarks" / "suites" / "transfer.yaml"
SHARED = REPO.parent / "shared" / "data"
TINY_EXPRESSION = {"modality": "expression", "method": {"name": "mae"},
                   "encoder": {"hidden": [32], "latent": 8, "dropout": 0.0},
                   "data": {"n_top_genes": 100, "batch_size": 64},
                   "train": {"max_epochs": 1, "checkpoint_every_n_steps": 100, "log_every_n_steps": 1}}
TINY_IMAGE = {"modality": "image", "method": {"name": "simclr", "projection_dim": 16, "projection_hidden": 32},
              "encoder": {"name": "resnet_tiny", "options": {"base_width": 4}},
              "data": {"batch_size": 32}, "train": {"max_epochs": 1, "checkpoint_every_n_steps": 100}}


def write_suite(path: Path, data_dir: Path, task: dict) -> Path:
    path.write_text(yaml.safe_dump({"name": "t", "data_dir": str(data_dir), "out": str(path.parent / "out"),
                                    "tasks": [task]}))
    return path


@pytest.fixture(scope="module")
def crops_file(tmp_path_factory) -> Path:
    """240 two-channel 16 px crops of 3 classes (brightness of channel 1), 4 crops per image_id."""
    rng = np.random.default_rng(0)
    y = np.arange(240) % 3
    yy, xx = np.mgrid[:16, :16]
    centre = rng.uniform(5, 11, size=(240, 2))
    blob = np.exp(-((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2) / 12.5)
    images = np.stack([20 + 150 * blob, 20 + np.array([40, 100, 160])[y][:, None, None] * blob], axis=1)
    images = np.clip(images + rng.normal(0, 8, images.shape), 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("crops") / "blobs.npz"
    np.savez(path, images=images, labels=y, label_names=np.array(["dim", "mid", "bright"]),
             image_id=np.repeat(np.arange(60), 4).astype(np.int32))
    return path


def test_split_halves_keeps_groups_apart_and_stratifies():
    y = np.repeat(np.array(["a", "b", "c"]), 40)
    groups = np.arange(120) // 4
    ref, query = kind.split_halves(y, groups, seed=0)
    assert len(ref) + len(query) == 120 and not set(ref) & set(query)
    assert not set(groups[ref]) & set(groups[query])
    ref, query = kind.split_halves(y, None, seed=0)
    assert [int((y[ref] == c).sum()) for c in "abc"] == [20, 20, 20]
    assert np.all(np.diff(ref) > 0) and np.all(np.diff(query) > 0)


def test_targets_choose_votes_by_reference_cv_not_by_query():
    row = kind._row
    one = {"macro_f1": 0.0, "accuracy": 0.0}
    rows = [
        row("enc", "kNN-15 transfer", "zero-shot", [one | {"macro_f1": 0.9}], **{"reference CV macro-F1": 0.5,
                                                                                 "_votes": None}),
        row("enc", "kNN-15 transfer, balanced votes", "zero-shot", [one | {"macro_f1": 0.6}],
            **{"reference CV macro-F1": 0.7, "_votes": "balanced"}),
        row("enc", "logistic", "zero-shot", [one | {"macro_f1": 0.95}]),
        row("pca_hvg", "logistic", "zero-shot", [one | {"macro_f1": 0.5}]),
        row("pca_hvg", "logistic (unscaled)", "zero-shot", [one | {"macro_f1": 0.8}]),
        row("enc", "linear probe", "5 labels/class", [one | {"macro_f1": 0.6}, one | {"macro_f1": 0.8}]),
        row("pca_hvg", "logistic", "5 labels/class", [one | {"macro_f1": 0.35}, one | {"macro_f1": 0.45}]),
    ]
    targets = kind._targets(rows, ["enc"], ["pca_hvg"], kind.TransferQualityParams(heads=["linear probe"]))
    assert [t.value for t in targets] == pytest.approx([0.6 / 0.8, 0.7 / 0.4])
    assert "balanced votes" in targets[0].name and not targets[0].met and targets[1].met


def test_bad_params_name_the_field(tmp_path, small_counts_file):
    task = {"kind": "transfer_quality", "data": small_counts_file.name, "params": {"heads": ["linear probe", "svm"]}}
    path = write_suite(tmp_path / "s.yaml", small_counts_file.parent, task)
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.params\.heads\[1\]: unknown head 'svm'"):
        load_suite(path)
    task["params"] = {"modality": "video"}
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.params\.modality"):
        load_suite(write_suite(path, small_counts_file.parent, task))


def test_generated_counts(tmp_path, small_counts_file):
    task = {"name": "cells", "kind": "transfer_quality", "data": small_counts_file.name,
            "params": {"label_key": "cell_type", "seeds": [0, 1], "heads": ["linear probe", "MLP head"],
                       "finetune_epochs": 3},
            "recipes": [{"name": "tiny", "config": TINY_EXPRESSION}], "baselines": ["pca_hvg", "random_encoder"]}
    run = run_suite(load_suite(write_suite(tmp_path / "s.yaml", small_counts_file.parent, task)), device="cpu",
                    progress=False)
    assert run.errors == {}
    result = run.results["cells"]
    zero, few = result.tables
    assert zero.title.endswith("zero-shot") and few.title.endswith("5 labels/class")
    assert {r["representation"] for r in zero.rows} == {"tiny", "pca_hvg", "random_encoder"}
    assert len(zero.rows) == 3 * 4 and len(few.rows) == 3 * 4 + 2
    assert [r["macro-F1"] for r in zero.rows] == sorted((r["macro-F1"] for r in zero.rows), reverse=True)
    by = {(r["representation"], r["method"]): r for r in few.rows}
    assert by["tiny", "linear probe"]["draws"] == 2 and by["tiny", "MLP head"]["seconds/draw"] > 0
    zero_by = {(r["representation"], r["method"]): r for r in zero.rows}
    assert zero_by["pca_hvg", "logistic"]["macro-F1"] > 0.9  # 4 generated types: separable with every label
    assert result.raw["reference"] == result.raw["query"] == 200
    assert len(result.targets) == 2 and all(math.isfinite(t.value) for t in result.targets)


def test_generated_crops_split_by_group(tmp_path, crops_file):
    task = {"name": "crops", "kind": "transfer_quality", "data": crops_file.name,
            "params": {"group_key": "image_id", "seeds": [0], "heads": ["linear probe", "full fine-tuning"],
                       "finetune_epochs": 1},
            "recipes": [{"name": "tiny", "config": TINY_IMAGE}], "baselines": ["pixel_pca", "random_encoder"]}
    run = run_suite(load_suite(write_suite(tmp_path / "s.yaml", crops_file.parent, task)), device="cpu",
                    progress=False)
    assert run.errors == {}
    result = run.results["crops"]
    assert result.raw["modality"] == "image" and result.raw["reference"] + result.raw["query"] == 240
    reps = {r["representation"] for t in result.tables for r in t.rows}
    assert reps == {"tiny", "pixel_pca", "random_encoder"}
    few = {(r["representation"], r["method"]) for r in result.tables[1].rows}
    assert {("tiny", "linear probe"), ("tiny", "full fine-tuning")} <= few
    assert "by `image_id`" in result.notes[0]

    task["baselines"] = ["pca_hvg"]  # gene PCA on crops: refused, naming the baseline
    run = run_suite(load_suite(write_suite(tmp_path / "s.yaml", crops_file.parent, task)), device="cpu",
                    progress=False)
    assert "pca_hvg needs expression" in run.errors["crops"]


@pytest.mark.skipif(not all((SHARED / f).is_file() for f in ("mouse_bladder_mca_2100.h5ad",
                                                              "chula_rbc12_crops48.npz")),
                    reason=f"shared data not available in {SHARED}")
def test_transfer_suite_quick(tmp_path):
    assert main(["benchmark", str(SUITE), "--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0
    record = json.loads((tmp_path / "transfer_quality_quick.json").read_text())
    assert record["quick"] and record["failed"] == {}
    for name, baseline, modality in (("bladder", "pca_hvg", "expression"), ("chula", "pixel_pca", "image")):
        task = record["tasks"][name]
        assert task["raw"]["modality"] == modality
        zero, few = task["tables"]
        assert {r["representation"] for r in zero["rows"]} == {baseline, "random_encoder", "mae" if
                                                               name == "bladder" else "simclr"}
        assert {r["method"] for r in few["rows"]} >= set(kind.HEADS)
        for r in zero["rows"] + few["rows"]:
            assert 0.0 <= r["macro-F1"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0
        assert len(task["targets"]) == 2 and all(math.isfinite(t["value"]) for t in task["targets"])
        assert (tmp_path / task["plots"][0]).is_file()
