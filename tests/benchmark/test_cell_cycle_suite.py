"""Task kind cell_cycle: its entry names, parameter checks, runs on generated crops and expression, and the shipped
suite with --quick."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from sslcell.benchmark import load_suite, run_suite
from sslcell.benchmark.tasks import cell_cycle as kind
from sslcell.cli import main
from sslcell.errors import ConfigError
from tests.cellcycle.test_recipe import NAMES, cycling_crops

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "benchmarks" / "suites" / "cell_cycle.yaml"
JURKAT = REPO.parent / "shared" / "data" / "jurkat_cellcycle_ifc_mlcp.npz"
TINY_IMAGE = {"modality": "image", "method": {"name": "simclr", "projection_dim": 16, "projection_hidden": 32},
              "encoder": {"name": "resnet_tiny", "options": {"base_width": 4}}, "data": {"batch_size": 32},
              "train": {"max_epochs": 1, "seed": 0}}
TINY_MAE = {"modality": "expression", "method": {"name": "mae"},
            "encoder": {"hidden": [32], "latent": 8, "dropout": 0.0},
            "data": {"n_top_genes": 200, "batch_size": 64}, "train": {"max_epochs": 2, "seed": 0}}
QUARTERS = ["P1", "P2", "P3", "P4"]  # true phases of the generated crops: quarters of θ


def _write_suite(tmp_path: Path, tasks: list[dict], data_dir: Path | None = None) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"name": "gen", "data_dir": str(data_dir or tmp_path),
                                    "out": str(tmp_path / "out"), "tasks": tasks}))
    return path


def _numbers(rows: list[dict], columns: list[str]) -> list[float]:
    return [r[c] for r in rows for c in columns if r.get(c) is not None]


def test_planned_entries_per_source_and_programme():
    assert kind.planned_entries("crops", ["a", "b"], ["pixel_pca", "random_encoder"]) == [
        "pixel_pca", "a", "a+deepcycle", "b", "b+deepcycle", "random_encoder+deepcycle"]
    assert kind.planned_entries("crops", [], ["random_angle", "random_encoder"]) == ["random_angle"]
    assert kind.planned_entries("synthetic_expression", ["m"], ["cycle_gene_pca", "phase_set_scores"], "s_g2m") == [
        "cycle_gene_pca", "m", "m+deepcycle_s_g2m", "m_cycle_genes"]
    assert kind.planned_entries("synthetic_expression", ["m"], ["cycle_gene_pca", "phase_set_scores"],
                                "whitfield") == [
        "cycle_gene_pca", "cycle_gene_pca_all", "phase_set_scores", "m", "m+deepcycle_s_g2m",
        "m+deepcycle_phase_sets", "m_cycle_genes", "m_cycle_genes+deepcycle_phase_sets"]


@pytest.mark.parametrize("params,field", [
    ({"acquisitions": {"a": ["G1"], "b": ["G1", "S"]}}, "acquisitions"),  # G1 in two groups
    ({"acquisitions": {"a": ["G0"]}}, "acquisitions"),  # not a phase of order
    ({"marker_channel": 0}, "marker_channel"),  # among the channels the networks see
    ({"n_bins": 1}, "n_bins"),
    ({"programmes": ["whitfield", "g1_only"]}, "programmes"),
    ({"programmes": ["s_g2m"], "target_programme": "whitfield"}, "target_programme"),
    ({"source": "fucci"}, "source"),
])
def test_bad_params_name_the_field(tmp_path, params, field):
    path = _write_suite(tmp_path, [{"name": "t", "kind": "cell_cycle", "params": params}])
    with pytest.raises(ConfigError, match=rf"tasks\[0\]\.params\.{field}"):
        load_suite(path)


@pytest.mark.parametrize(("task", "message"), [
    ({"params": {"source": "synthetic_expression"}, "baselines": ["pixel_pca"]},
     r"tasks\[0\]\.baselines\[0\]: 'pixel_pca' is not a baseline of source synthetic_expression"),
    ({"params": {"source": "synthetic_expression"}, "recipes": [{"name": "img", "config": TINY_IMAGE}]},
     r"tasks\[0\]\.recipes\[0\]: 'img' is a recipe for image data"),
    ({"params": {"source": "synthetic_expression", "programmes": ["s_g2m"],
                 "target_entry": "m_cycle_genes+deepcycle_phase_sets"}, "recipes": [{"name": "m", "config": TINY_MAE}]},
     r"tasks\[0\]\.params\.target_entry: 'm_cycle_genes\+deepcycle_phase_sets' is not an entry of this task"),
    ({"params": {"source": "crops"}}, r"tasks\[0\]\.data: source crops reads crops with phase labels"),
    ({"params": {"source": "synthetic_expression"},
      "recipes": [{"name": "m", "config": TINY_MAE}, {"name": "m_cycle_genes", "config": TINY_MAE}]},
     r"tasks\[0\]\.recipes: the entry 'm_cycle_genes' would be made twice"),
])
def test_mismatched_baseline_recipe_target_or_data_is_refused_when_the_suite_loads(tmp_path, task, message):
    """Before any task runs (they failed when the task ran, after the tasks before it)."""
    with pytest.raises(ConfigError, match=message):
        load_suite(_write_suite(tmp_path, [{"name": "t", "kind": "cell_cycle", **task}]))


def test_generated_crops_end_to_end(tmp_path):
    """Crops whose look goes round with θ, labelled by quarter of θ; one marker channel; a tiny SimCLR."""
    cells, theta = cycling_crops(240, 11)
    phase = np.asarray(QUARTERS)[(theta // (np.pi / 2)).astype(int)]
    np.savez(tmp_path / "crops.npz", images=np.asarray(cells.images), channel_names=np.array(NAMES), phase=phase)
    task = {"name": "gen_crops", "kind": "cell_cycle", "data": "crops.npz",
            "params": {"source": "crops", "phase_key": "phase", "order": QUARTERS, "channels": ["brightfield"],
                       "marker_channel": "sg2m_marker", "acquisitions": {"early": ["P1", "P2"], "late": ["P3", "P4"]},
                       "target_entry": "pixel_pca"},
            "recipes": [{"name": "tiny", "config": TINY_IMAGE, "finetune": {"head": "full", "epochs": 2}}],
            "baselines": ["random_angle", "pixel_pca", "random_encoder"]}
    run = run_suite(load_suite(_write_suite(tmp_path, [task])), device="cpu", progress=False)
    assert run.errors == {}
    result = run.results["gen_crops"]
    rows, single = result.tables[0].rows, result.tables[1].rows
    planned = kind.planned_entries("crops", ["tiny"], task["baselines"])
    assert sorted(r["entry"] for r in rows) == sorted(planned)
    assert [r["aligned Spearman"] for r in rows] == sorted((r["aligned Spearman"] for r in rows), reverse=True)
    assert all(-1 <= v <= 1 for v in _numbers(rows, ["aligned Spearman"]))
    by = {r["entry"]: r for r in rows}
    # size and brightness go round with θ: the ring is in the pixels' first two PCs
    assert by["pixel_pca"]["aligned Spearman"] > 0.8 > by["random_angle"]["aligned Spearman"]
    for entry in ("tiny+deepcycle", "random_encoder+deepcycle"):
        assert 0 <= by[entry]["pseudo-phase accuracy"] <= 1 and by[entry]["seconds"] > 0
    assert result.raw["test"] == 48 and result.raw["train"] == 192
    # single-phase acquisitions: per recipe one row per group, arcs covering the circle, θ as placed among all
    assert [(r["recipe"], r["phase"]) for r in single] == [
        (e, g) for e in ("tiny+deepcycle", "random_encoder+deepcycle") for g in ("early", "late")]
    assert sum(r["crops"] for r in single) == 2 * 48
    for entry in ("tiny+deepcycle", "random_encoder+deepcycle"):
        assert sum(r["chance"] for r in single if r["recipe"] == entry) == pytest.approx(1.0)
    assert {r["θ as among all held-out crops"] for r in single} == {"same"}
    assert all(0 <= r["θ in the phase's arc"] <= 1 for r in single)
    assert {r["mean θ's arc"] for r in single} | {r["most crops' arc"] for r in single} <= {"early", "late"}
    for r in single:  # over half of an acquisition in its arc: that arc holds the most of its crops
        assert (r["most crops' arc"] == r["phase"]) or r["θ in the phase's arc"] <= 0.5
    (target,) = result.targets
    assert target.value == by["pixel_pca"]["aligned Spearman"] and target.goal == 0.85
    assert result.plots == ["gen_gen_crops_tiny_deepcycle.png", "gen_gen_crops_random_encoder_deepcycle.png"]
    assert all((tmp_path / "out" / p).stat().st_size > 0 for p in result.plots)


def test_generated_expression_end_to_end(tmp_path):
    task = {"name": "gen_expression", "kind": "cell_cycle",
            "params": {"source": "synthetic_expression", "programmes": ["whitfield"], "n_cells": 400,
                       "n_genes": 200, "n_cell_types": 3},
            "recipes": [{"name": "m", "config": TINY_MAE, "finetune": {"head": "mlp", "epochs": 5}}],
            "baselines": ["cycle_gene_pca", "phase_set_scores"]}
    run = run_suite(load_suite(_write_suite(tmp_path, [task])), device="cpu", progress=False)
    assert run.errors == {}
    result = run.results["gen_expression"]
    (table,) = result.tables
    rows = table.rows
    assert sorted(r["entry"] for r in rows) == sorted(kind.planned_entries(
        "synthetic_expression", ["m"], task["baselines"], "whitfield"))
    cc = ["circular correlation", "circular correlation, uniform form"]
    assert len(_numbers(rows, cc)) == 2 * len(rows) and all(-1 <= v <= 1 for v in _numbers(rows, cc))
    by = {r["entry"]: r for r in rows}
    # the phase is identifiable all round: the cycle-gene PCA on all cycle genes follows it
    assert by["cycle_gene_pca_all"]["circular correlation, uniform form"] > 0.7
    assert by["phase_set_scores"]["pseudo-phases"] == "5 phase sets"
    assert by["m_cycle_genes"]["what"] == "sslcell m on the 40 cycle genes, embedding alone"
    (target,) = result.targets  # default: the first recipe's cycle-gene embedding, first programme
    assert target.name.startswith("whitfield: m_cycle_genes:") and target.goal == 0.9
    assert target.value == by["m_cycle_genes"]["circular correlation, uniform form"]


@pytest.mark.skipif(not JURKAT.is_file(), reason=f"shared data not available: {JURKAT}")
def test_cell_cycle_suite_quick(tmp_path):
    assert main(["benchmark", str(SUITE), "--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0
    record = json.loads((tmp_path / "cycle_quick.json").read_text())
    assert record["quick"] and record["failed"] == {}
    jurkat, expression = record["tasks"]["jurkat"], record["tasks"]["expression"]
    rows = jurkat["tables"][0]["rows"]
    assert {r["entry"] for r in rows} == {"random_angle", "pixel_pca", "simclr", "simclr+deepcycle",
                                          "random_encoder+deepcycle"}
    assert all(math.isfinite(v) for v in _numbers(rows, ["aligned Spearman", "pseudo-phase accuracy", "closure"]))
    assert {r["phase"] for r in jurkat["tables"][1]["rows"]} == {"G1", "S", "G2", "M"}
    assert jurkat["raw"]["train"] + jurkat["raw"]["test"] < 400  # the --quick subsample
    assert [t["title"].split("`")[1] for t in expression["tables"]] == ["whitfield", "s_g2m"]
    assert all(math.isfinite(v) for t in expression["tables"]
               for v in _numbers(t["rows"], ["circular correlation", "circular correlation, uniform form"]))
    targets = jurkat["targets"] + expression["targets"]
    assert [t["goal"] for t in targets] == [0.85, 0.9] and all(math.isfinite(t["value"]) for t in targets)
    for plot in jurkat["plots"]:
        assert (tmp_path / plot).stat().st_size > 0


def test_cross_field_checks_see_the_recipes_that_recipes_keeps(tmp_path):
    """--recipes is applied before the checks: a clash with a dropped recipe is no clash, and a target entry made
    only by a dropped recipe is refused at load (not after the tasks before it have run)."""
    twice = {"name": "t", "kind": "cell_cycle", "params": {"source": "synthetic_expression"},
             "recipes": [{"name": "m", "config": TINY_MAE}, {"name": "m_cycle_genes", "config": TINY_MAE}]}
    path = _write_suite(tmp_path, [twice])
    with pytest.raises(ConfigError, match="would be made twice"):
        load_suite(path)
    assert [r.name for r in load_suite(path, recipes=["m"]).tasks[0].recipes] == ["m"]
    target = {"name": "t", "kind": "cell_cycle",
              "params": {"source": "synthetic_expression", "target_entry": "b_cycle_genes"},
              "recipes": [{"name": "a", "config": TINY_MAE}, {"name": "b", "config": TINY_MAE}]}
    path = _write_suite(tmp_path, [target])
    load_suite(path)
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.params\.target_entry: 'b_cycle_genes' is not an entry"):
        load_suite(path, recipes=["a"])


@pytest.mark.parametrize(("params", "message"), [
    ({"channels": ["darkfield"]}, r"tasks\[0\]\.params\.channels: "),
    ({"marker_channel": "dna"}, r"tasks\[0\]\.params\.marker_channel: "),
    ({"phase_key": "stage"}, r"tasks\[0\]\.params\.phase_key: crops.npz has no obs column 'stage'"),
])
def test_crops_without_the_named_channels_or_phases_are_refused_when_the_suite_loads(tmp_path, params, message):
    images = np.zeros((8, 3, 8, 8), np.uint8)
    np.savez(tmp_path / "crops.npz", images=images, channel_names=np.array(NAMES), phase=np.array(QUARTERS * 2))
    task = {"name": "t", "kind": "cell_cycle", "data": "crops.npz", "baselines": ["pixel_pca"],
            "params": {"source": "crops", "phase_key": "phase", "order": QUARTERS, "channels": ["brightfield"],
                       "marker_channel": "sg2m_marker", "acquisitions": {"early": ["P1", "P2"]}, **params}}
    with pytest.raises(ConfigError, match=message):
        load_suite(_write_suite(tmp_path, [task]))
