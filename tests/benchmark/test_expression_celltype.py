"""Task kind expression_celltype: its helpers, a run on generated counts, and the shipped suite with --quick."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sslcell.benchmark import load_suite, run_suite
from sslcell.benchmark.tasks import expression_celltype as kind
from sslcell.cli import main
from sslcell.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "benchmarks" / "suites" / "expression.yaml"
BLADDER = REPO.parent / "shared" / "data" / "mouse_bladder_mca_2100.h5ad"
TINY = {"modality": "expression", "method": {"name": "mae"},
        "encoder": {"hidden": [32], "latent": 8, "dropout": 0.0},
        "data": {"n_top_genes": 100, "batch_size": 64},
        "train": {"max_epochs": 2, "checkpoint_every_n_steps": 100, "log_every_n_steps": 1}}


def test_stratified_subsample_keeps_every_class():
    y = np.array(["a"] * 900 + ["b"] * 90 + ["c"] * 3)
    rows = kind.stratified_subsample(y, 100, seed=0, min_per_class=10)
    counts = {c: int((y[rows] == c).sum()) for c in "abc"}
    assert counts == {"a": 91, "b": 10, "c": 3}  # a's share; b raised to the minimum; c has only 3
    assert np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(rows, kind.stratified_subsample(y, 100, seed=0, min_per_class=10))
    assert not np.array_equal(rows, kind.stratified_subsample(y, 100, seed=1, min_per_class=10))
    np.testing.assert_array_equal(kind.stratified_subsample(y, None, 0), np.arange(len(y)))
    np.testing.assert_array_equal(kind.stratified_subsample(y, 5000, 0), np.arange(len(y)))


def test_random_encoder_copies_architecture_and_inputs_not_weights(small_counts):
    from sslcell.config import RecipeConfig
    from sslcell.methods import build_method
    from sslcell.train import _prepare_expression

    config = RecipeConfig.from_dict(TINY)
    _, contract = _prepare_expression(config, small_counts, None)
    trained = build_method(config, contract)
    state = torch.random.get_rng_state()
    a, b = kind.random_encoder(trained, seed=3), kind.random_encoder(trained, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is left alone
    assert a.inputs.contract == trained.inputs.contract
    assert [p.shape for p in a.encoder.parameters()] == [p.shape for p in trained.encoder.parameters()]
    for pa, pb in zip(a.encoder.parameters(), b.encoder.parameters(), strict=True):
        assert torch.equal(pa, pb)  # seeded
    other = kind.random_encoder(trained, seed=4)
    assert not all(torch.equal(x, y) for x, y in zip(a.encoder.parameters(), other.encoder.parameters(), strict=True))


def test_scvi_row_when_not_installed(small_counts, monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scvi" else real(name, *a))
    names: dict[str, str] = {}
    ctx = kind.Context(seed=0, quick=True, workdir=tmp_path, out_dir=tmp_path, prefix="t")
    row = kind._scvi(small_counts.copy(), kind.ExpressionCelltypeParams(), ctx, names)
    assert row["entry"] == "scvi" and "not installed" in row["status"]
    assert names == {}


def test_bad_params_name_the_field(tmp_path, small_counts_file):
    suite = {"data_dir": str(small_counts_file.parent), "tasks": [
        {"name": "t", "kind": "expression_celltype", "data": small_counts_file.name, "params": {"n_splits": 1}}]}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(suite))
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.params\.n_splits"):
        load_suite(path)
    suite["tasks"][0]["params"] = {"seeds": []}
    path.write_text(yaml.safe_dump(suite))
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.params\.seeds"):
        load_suite(path)
    suite["tasks"][0]["params"] = {}
    suite["tasks"][0]["baselines"] = ["pixel_pca"]
    path.write_text(yaml.safe_dump(suite))
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.baselines\[0\].*pixel_pca"):
        load_suite(path)


def test_log_normalised_data_and_no_trained_recipe_fail_the_task(tmp_path, small_counts):
    """Baselines alone compare nothing with sslcell, and PCA of log data logged again is wrong: both fail loudly."""
    import scanpy as sc

    logged = small_counts.copy()
    sc.pp.normalize_total(logged, target_sum=1e4)
    sc.pp.log1p(logged)
    logged.write_h5ad(tmp_path / "logged.h5ad")
    small_counts.write_h5ad(tmp_path / "counts.h5ad")
    broken = {**TINY, "method": {"name": "mae", "masking": "programme"}}  # shipped programmes: no generated gene
    for data, config, message in [("logged.h5ad", TINY, "logged.h5ad: X holds non-integer values"),
                                  ("counts.h5ad", broken, "no recipe could be pretrained: broken: not run")]:
        suite = {"name": "gen", "data_dir": str(tmp_path), "out": str(tmp_path / "out"), "tasks": [{
            "name": "cells", "kind": "expression_celltype", "data": data,
            "params": {"label_key": "cell_type", "seeds": [0], "max_epochs": 1},
            "recipes": [{"name": "broken", "config": config}], "baselines": ["pca_hvg"]}]}
        path = tmp_path / "gen.yaml"
        path.write_text(yaml.safe_dump(suite))
        run = run_suite(load_suite(path), device="cpu", progress=False)
        assert run.results == {} and message in run.errors["cells"]


def test_generated_counts_end_to_end(tmp_path, small_counts_file):
    """Two recipes (one that cannot run), PCA and the random encoder on 4 well-separated generated cell types."""
    broken = {**TINY, "method": {"name": "mae", "masking": "programme"}}  # shipped programmes: no generated gene
    suite = {"name": "gen", "data_dir": str(small_counts_file.parent), "out": str(tmp_path / "out"), "tasks": [{
        "name": "cells", "kind": "expression_celltype", "data": small_counts_file.name,
        "params": {"label_key": "cell_type", "seeds": [0, 1], "max_epochs": 3},
        "recipes": [{"name": "tiny", "config": TINY}, {"name": "broken", "config": broken}],
        "baselines": ["pca_hvg", "random_encoder"]}]}
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(suite))
    run = run_suite(load_suite(path), device="cpu", progress=False)
    assert run.errors == {}
    result = run.results["cells"]
    runs = {r["entry"]: r for r in result.tables[0].rows}
    assert runs["tiny"]["epochs"] == 3 and runs["tiny"]["seconds"] > 0
    assert runs["broken"]["status"].startswith("not run")
    validation, scores = result.tables[1].rows, result.tables[2].rows
    # the validation cells: 30% of each generated type, held out of every test score
    val_cells = result.raw["validation_cells"]
    report = result.raw["report"]
    assert len(val_cells) == 120 and report["n_cells"] == 400 - 120 and report["seeds"] == [0, 1]
    assert {(r["entry"], r["protocol"]) for r in validation} == {
        (e, p) for e in ("tiny", "random_encoder", "pca_hvg")
        for p in ("logistic, 5 labels/class", "logistic (unscaled), 5 labels/class")}
    assert sum(r["chosen"] == "probe, recipe" for r in validation) == 1  # one recipe: tiny (broken did not train)
    assert result.raw["chosen_recipe"] == "tiny"
    assert {r["entry"] for r in scores} == {"tiny", "random_encoder", "pca_hvg"}
    assert len(scores) == 3 * 4  # four protocols each
    by = {(r["entry"], r["protocol"]): r for r in scores}
    # the generated types are easy: PCA-50 + logistic regression separates them
    assert by["pca_hvg", "logistic, 5-fold CV"]["macro-F1"] > 0.9
    assert by["tiny", "logistic, 5-fold CV"]["dims"] == 8 and by["pca_hvg", "kNN-15, 5-fold CV"]["dims"] == 50
    targets = {t.name: t for t in result.targets}
    ratio = targets["tiny / pca_hvg, logistic CV macro-F1"].value
    assert ratio == pytest.approx(by["tiny", "logistic, 5-fold CV"]["macro-F1"]
                                  / by["pca_hvg", "logistic, 5-fold CV"]["macro-F1"])
    chosen = {r["entry"]: r["protocol"] for r in validation if r["chosen"]}
    few = [by[e, chosen[e]]["accuracy"] for e in ("tiny", "pca_hvg")]
    assert targets["tiny / pca_hvg, few-label logistic accuracy (probes chosen on validation)"].value == \
        pytest.approx(few[0] / few[1])
    assert "tiny / random_encoder, logistic CV macro-F1" in targets
    assert (tmp_path / "out" / result.plots[0]).stat().st_size > 0


def _row(macro_f1: float, accuracy: float = 0.5) -> dict[str, float]:
    return {"macro-F1": macro_f1, "macro-F1 std": 0.0, "accuracy": accuracy, "accuracy std": 0.0}


def test_best_probe_and_targets_use_validation_choices_not_test_scores():
    validation = {("enc", kind.FEW): _row(0.70), ("enc", kind.FEW_RAW): _row(0.72),
                  ("pca_hvg", kind.FEW): _row(0.60), ("pca_hvg", kind.FEW_RAW): _row(0.60)}
    assert kind._best(validation, "enc") == (kind.FEW_RAW, 0.72)
    assert kind._best(validation, "pca_hvg")[0] == kind.FEW  # a tie keeps the scaled probe
    test = [{"entry": e, "_protocol": proto, "macro-F1": f1, "accuracy": acc}
            for e, proto, f1, acc in [("enc", "logistic_cv", 0.9, 0.9), ("pca_hvg", "logistic_cv", 0.8, 0.9),
                                      ("enc", kind.FEW, 0.9, 0.9), ("enc", kind.FEW_RAW, 0.6, 0.6),
                                      ("pca_hvg", kind.FEW, 0.5, 0.5), ("pca_hvg", kind.FEW_RAW, 0.8, 0.8)]]
    targets = {t.name: t.value for t in kind._targets(test, "enc", {"enc": kind.FEW_RAW, "pca_hvg": kind.FEW})}
    # the unscaled probe was chosen for enc on validation: its worse test score counts, not the better scaled one
    assert targets["enc / pca_hvg, few-label logistic macro-F1 (probes chosen on validation)"] == pytest.approx(1.2)
    assert targets["enc / pca_hvg, logistic CV macro-F1"] == pytest.approx(0.9 / 0.8)
    assert kind._targets(test, None, {}) == []


def test_validation_params_are_checked():
    with pytest.raises(ConfigError, match="validation_fraction"):
        kind.ExpressionCelltypeParams(validation_fraction=0.0).check()
    with pytest.raises(ConfigError, match="validation_draws"):
        kind.ExpressionCelltypeParams(validation_draws=0).check()


@pytest.mark.skipif(not BLADDER.is_file(), reason=f"shared data not available: {BLADDER}")
def test_expression_suite_quick(tmp_path):
    assert main(["benchmark", str(SUITE), "--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0
    record = json.loads((tmp_path / "expression_quick.json").read_text())
    assert record["quick"] and record["failed"] == {}
    task = record["tasks"]["bladder"]
    runs = {r["entry"]: r for r in task["tables"][0]["rows"]}
    assert runs["mae_programme"]["status"].startswith("not run")  # no gene symbols in this file
    expected = {"mae", "mae_mask75", "simclr", "byol", "barlow_twins", "vicreg", "random_encoder", "pca_hvg"}
    if importlib.util.find_spec("scvi") is not None:
        expected.add("scvi")
    else:
        assert "not installed" in runs["scvi"]["status"]
    scores = task["tables"][2]["rows"]
    assert {r["entry"] for r in scores} == expected
    assert {r["entry"] for r in task["tables"][1]["rows"]} == expected  # every entry scored on validation too
    assert {(r["entry"], r["protocol"]) for r in scores} >= {("pca_hvg", "logistic, 5-fold CV")}
    for r in scores:
        assert 0.0 <= r["macro-F1"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0
    assert task["targets"] and all(math.isfinite(t["value"]) and t["value"] > 0 for t in task["targets"])
    assert (tmp_path / "expression_quick.md").read_text().startswith("# Benchmark suite: expression (--quick)")
    assert (tmp_path / task["plots"][0]).is_file()
