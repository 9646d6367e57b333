"""Task kinds expression_loader / _pretrain_backed / _memory / _scaling: the shipped suite with --quick, the chunk-wise
synthetic file, the parameter checks and the bench_loader wrapper."""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import yaml

from sslcell.benchmark import load_suite
from sslcell.benchmark.registry import Context
from sslcell.benchmark.tasks import expression_speed as es
from sslcell.cli import main
from sslcell.data.expression import ExpressionDataset
from sslcell.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "benchmarks" / "suites" / "expression_speed.yaml"


def _finite_numbers(table: dict) -> list[float]:
    return [v for row in table["rows"] for v in row.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]


def test_shipped_suite_quick(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the probes' processes: one thread each, as this test process
    assert main(["benchmark", str(SUITE), "--quick", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "expression_speed_quick.json").read_text())
    assert not record["failed"] and set(record["tasks"]) == {"loader", "pretrain_backed", "memory", "scaling"}
    for name, task in record["tasks"].items():
        numbers = [v for table in task["tables"] for v in _finite_numbers(table)]
        assert numbers and all(math.isfinite(v) for v in numbers), name
        assert all(math.isfinite(t["value"]) for t in task["targets"]), name

    for name in ("loader", "memory", "scaling"):  # their probes forked from a preloading process: said so
        assert any(note.startswith("--quick: each probe was forked") for note in record["tasks"][name]["notes"])
    loader = record["tasks"]["loader"]
    medians = loader["raw"]["cells_per_s_median"]
    assert set(medians) == {"sslcell", "in_memory", "annloader", "sslcell_workers"}
    by_name = {t["name"]: t for t in loader["targets"]}
    assert by_name["sslcell / annloader cells/s"]["value"] == pytest.approx(medians["sslcell"] / medians["annloader"])
    assert by_name["sslcell / in_memory cells/s"]["goal"] == 0.5
    half, full = loader["raw"]["memory"]
    assert (half["n_obs"], full["n_obs"]) == (10_000, 20_000) and half["batches"] == 39  # 10,000 // 256
    assert full["x_csr_float32_gb"] == pytest.approx(2 * half["x_csr_float32_gb"], rel=0.05)

    backed = record["tasks"]["pretrain_backed"]
    raw = backed["raw"]["expression_mae"]
    assert raw["same_batches"] and raw["batch_size"] == 64  # configs/expression_mae.yaml
    (target,) = backed["targets"]
    assert target["goal"] == 0.9
    assert target["value"] == pytest.approx(raw["medians"]["backed"]["steps_per_s"]
                                            / raw["medians"]["in_memory"]["steps_per_s"])
    for run in (run for runs in raw["runs"].values() for run in runs):
        assert 0 <= run["fetch_share"] < 1
        assert run["fetch_ms_per_step"] == pytest.approx(1e3 * run["fetch_share"] / run["steps_per_s"])
        assert run["cells_per_s"] == pytest.approx(64 * run["steps_per_s"])

    memory = record["tasks"]["memory"]
    raw = memory["raw"]["expression_mae"]
    assert memory["raw"]["data"]["n_obs"] == 20_000
    assert raw["embed"]["embedding_shape"] == [20_000, 64] and raw["embed"]["finite"]
    for probe in (raw["pretrain"], raw["embed"]):
        assert 0 < probe["rss_imported_gb"] <= probe["peak_rss_gb"] < 3.0  # tiny data: far under the bound
    assert [t["goal"] for t in memory["targets"]] == [3.0, 3.0]
    assert not any(t["higher_is_better"] for t in memory["targets"])
    assert [step for step, _ in raw["pretrain"]["rss"]] == [3, 6, 9, 12, 15, 18, 21]  # every 23 // 6 steps

    scaling = record["tasks"]["scaling"]
    size_rows, batch_rows = (t["rows"] for t in scaling["tables"])
    assert [(r["cells"], r["batch size"]) for r in size_rows] == [(2000, 64)] * 2 + [(4000, 64)] * 2
    assert [(r["cells"], r["batch size"]) for r in batch_rows] == [(2000, 32)] * 2 + [(2000, 64)] * 2
    assert len(scaling["raw"]["points"]) == 6  # (2000, 64) measured once, shared by both axes
    assert scaling["raw"]["files"]["2000"]["nnz"] < scaling["raw"]["files"]["4000"]["nnz"]
    for plot in scaling["plots"]:
        assert (tmp_path / plot).stat().st_size > 0
    md = (tmp_path / "expression_speed_quick.md").read_text()
    assert "## memory" in md and "GB on disk" in md


def test_count_chunks_prefix_density_and_counts():
    big = sp.vstack(list(es.count_chunks(23_456, 40, 0.1, seed=3)), format="csr")
    small = sp.vstack(list(es.count_chunks(12_345, 40, 0.1, seed=3)), format="csr")
    assert big.shape == (23_456, 40) and big.dtype == np.int32 and big.has_sorted_indices
    assert (big[:12_345] != small).nnz == 0  # a smaller file is the first rows of a larger one
    assert big.nnz / np.prod(big.shape) == pytest.approx(0.1, rel=0.05)
    assert big.data.min() >= 1 and big.data.mean() == pytest.approx(2.5, rel=0.05)  # geometric, p = 0.4
    other = sp.vstack(list(es.count_chunks(12_345, 40, 0.1, seed=4)), format="csr")
    assert (other != small).nnz > 0


def test_write_counts_and_prefix_copy(tmp_path):
    matrix = sp.vstack(list(es.count_chunks(25_000, 30, 0.2, seed=0)), format="csr")
    path = es.write_counts(tmp_path / "c.h5ad", es.count_chunks(25_000, 30, 0.2, seed=0), 25_000, 30)
    back = ad.read_h5ad(path)
    assert back.X.dtype == np.int32 and (back.X != matrix).nnz == 0
    assert back.obs_names[-1] == "cell24999" and back.var_names[0] == "gene0"
    with ExpressionDataset.open(path) as dataset:
        assert dataset.shape == (25_000, 30) and np.array_equal(dataset.read_rows(100, 200).toarray(),
                                                                matrix[100:200].toarray())
    prefix = es.write_counts(tmp_path / "p.h5ad", es.file_chunks(path, 15_000), 15_000, 30)
    assert (ad.read_h5ad(prefix).X != matrix[:15_000]).nnz == 0
    info = es.describe_file(path)
    assert info["nnz"] == matrix.nnz and info["x_csr_float32_gb"] == matrix.nnz * 8 / 1e9
    with pytest.raises(ValueError, match="14000 rows, expected 15000"):
        es.write_counts(tmp_path / "bad.h5ad", es.file_chunks(path, 14_000), 15_000, 30)
    assert not list(tmp_path.glob("*bad*"))  # no partial file left behind


def test_counts_file_shared_by_the_suite_tasks(tmp_path):
    ctx = Context(seed=1, quick=True, workdir=tmp_path / "run" / "task_a", out_dir=tmp_path, prefix="x")
    first = es.counts_file(ctx, 3000, 20, 0.1)
    again = es.counts_file(Context(seed=1, quick=True, workdir=tmp_path / "run" / "task_b", out_dir=tmp_path,
                                   prefix="y"), 3000, 20, 0.1)
    assert again == first and first.parent == tmp_path / "run" / "expression_counts"
    prefix = es.counts_file(ctx, 1000, 20, 0.1, prefix_of=first)
    drawn = sp.vstack(list(es.count_chunks(1000, 20, 0.1, seed=1)), format="csr")
    assert (ad.read_h5ad(prefix).X != drawn).nnz == 0


def test_window_must_fit_in_one_epoch(tmp_path):
    from sslcell.config import load_config

    path = es.write_counts(tmp_path / "c.h5ad", es.count_chunks(2048, 20, 0.2, seed=0), 2048, 20)
    config = es.bench_config(load_config(REPO / "configs" / "expression_mae.yaml"), "cpu", batch_size=64)
    assert config.train.accelerator == "cpu" and not config.train.progress_bar
    assert es._check_window(path, config, 2, 30, "params") == 32  # 2 blocks of 1024 rows, batches of 64
    with pytest.raises(ConfigError, match=r"params: warmup \+ steps = 33 exceed one epoch \(32 batches of 64"):
        es._check_window(path, config, 3, 30, "params")


@pytest.mark.parametrize("kind, params, message", [
    ("expression_loader", {"density": 0}, "tasks[0].params.density: must lie in (0, 0.5]"),
    ("expression_pretrain_backed", {"steps": 0}, "tasks[0].params.steps: must be >= 1"),
    ("expression_scaling", {"sizes": [1000], "batch_axis_size": 2000}, "tasks[0].params.batch_axis_size: 2000"),
    ("expression_scaling", {"batch_sizes": []}, "tasks[0].params.batch_sizes: must be >= 1"),
])
def test_bad_params_name_the_field(tmp_path, kind, params, message):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"tasks": [{"kind": kind, "params": params}]}))
    with pytest.raises(ConfigError) as err:
        load_suite(path)
    assert message in str(err.value)


def test_bench_loader_runs_the_loader_task(monkeypatch):
    seen = []
    monkeypatch.setattr("sslcell.cli.main", lambda argv: seen.append(argv) or 0)
    monkeypatch.setattr("sys.argv", ["bench_loader.py", "--quick", "--out", "/some/dir"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / "benchmarks" / "bench_loader.py"), run_name="__main__")
    assert done.value.code == 0
    assert seen == [["benchmark", str(SUITE), "--only", "loader", "--quick", "--out", "/some/dir"]]
