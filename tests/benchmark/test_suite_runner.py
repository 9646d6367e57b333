"""The benchmark runner: suite validation (errors name the field), outputs, provenance, failures, --quick."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from sslcell.benchmark import Table, Target, TaskKind, TaskResult, load_suite, register, run_suite
from sslcell.benchmark.registry import TASKS
from sslcell.cli import main
from sslcell.errors import ConfigError, OverwriteError, SSLCellWarning


@dataclass
class ToyParams:
    n: int = 10
    fail: bool = False
    plot: bool = False  # write a plot (its bytes: "n=<n>")

    def check(self) -> None:
        if self.n < 1:
            raise ConfigError(f"n: must be >= 1, got {self.n}")


def _toy_run(task, ctx) -> TaskResult:
    if task.params.fail:
        raise RuntimeError("toy failure")
    total = sum(range(task.params.n))
    size = task.path.stat().st_size if task.data else 0
    plots = []
    if task.params.plot:
        plots.append(f"{ctx.prefix}_p.png")
        (ctx.out_dir / plots[0]).write_text(f"n={task.params.n}")
    return TaskResult(plots=plots, tables=[Table("sums", ["n", "sum", "bytes"], [{"n": task.params.n, "sum": total,
                                                                     "bytes": size}])],
                      targets=[Target("sum at least 10", float(total), 10.0)], notes=[f"seed {ctx.seed}"],
                      raw={"baselines": task.baselines, "recipes": [r.name for r in task.recipes]})


TOY = TASKS.get("toy_sum") or register(TaskKind(
    name="toy_sum", params=ToyParams, run=_toy_run, summary="sum of range(n)", baselines=("zero",),
    peers=("python",), takes_recipes=True, quick={"n": 3}))


def _write(tmp_path, suite: dict, name: str = "suite.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(suite))
    return path


def _suite(**task):
    return {"name": "toy", "seed": 7, "out": "results", "tasks": [{"name": "a", "kind": "toy_sum", **task}]}


def test_run_writes_markdown_json_with_provenance(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"12345")
    path = _write(tmp_path, _suite(params={"n": 6}, data="x.bin", baselines=["zero"], peers=["python"]) |
                  {"data_dir": "."})
    run = run_suite(load_suite(path), progress=False)
    assert run.results["a"].tables[0].rows == [{"n": 6, "sum": 15, "bytes": 5}]
    record = json.loads(run.json_path.read_text())
    assert run.json_path == tmp_path / "results" / "toy.json"
    assert record["seed"] == 7 and record["quick"] is False
    assert record["git"]["commit"] and record["hardware"]["cpu_count"] >= 1
    assert record["versions"]["torch"] != "not installed" and "sslcell" in record["versions"]
    assert record["tasks"]["a"]["targets"][0]["met"] is True
    assert record["suite"]["tasks"][0]["params"] == {"n": 6, "fail": False, "plot": False}
    text = run.markdown_path.read_text()
    assert text.startswith("# Benchmark suite: toy") and "| 6 | 15 | 5 |" in text and "seed 7" in text


def test_quick_applies_kind_and_suite_overrides_and_writes_beside(tmp_path):
    path = _write(tmp_path, _suite(params={"n": 100}))
    assert load_suite(path, quick=True).tasks[0].params.n == 3
    suite = load_suite(_write(tmp_path, _suite(params={"n": 100}, quick={"n": 5}), "s2.yaml"), quick=True)
    assert suite.tasks[0].params.n == 5
    run = run_suite(suite, progress=False)
    assert run.markdown_path.name == "toy_quick.md" and "(--quick)" in run.markdown_path.read_text()
    assert run.targets_missed == []  # sum(range(5)) = 10: goals are inclusive
    assert Target("x", 10.0, 10.0).met and not Target("x", 11.0, 10.0, higher_is_better=False).met
    assert not Target("x", float("nan"), 0.0).met


def test_failed_task_is_recorded_and_others_still_run(tmp_path):
    suite = _suite(params={"fail": True})
    suite["tasks"].append({"name": "b", "kind": "toy_sum"})
    run = run_suite(load_suite(_write(tmp_path, suite)), progress=False)
    assert set(run.results) == {"b"} and "toy failure" in run.errors["a"]
    record = json.loads(run.json_path.read_text())
    assert "RuntimeError" in record["failed"]["a"]["traceback"]
    assert "**Failed**: RuntimeError: toy failure" in run.markdown_path.read_text()


def test_a_failing_run_keeps_the_earlier_results(tmp_path):
    good = run_suite(load_suite(_write(tmp_path, _suite(params={"n": 4}))), progress=False)
    before = good.markdown_path.read_text(), good.json_path.read_text()
    failed = run_suite(load_suite(_write(tmp_path, _suite(params={"fail": True}))), progress=False)
    assert (good.markdown_path.read_text(), good.json_path.read_text()) == before
    assert failed.markdown_path.name == "toy_failed.md" and failed.json_path.name == "toy_failed.json"
    assert "toy failure" in failed.markdown_path.read_text()
    again = run_suite(load_suite(_write(tmp_path, _suite(params={"n": 5}))), progress=False)
    assert again.markdown_path == good.markdown_path and again.markdown_path.read_text() != before[0]


@pytest.mark.parametrize(("task", "field"), [
    ({"kind": "nope"}, "tasks[0].kind: unknown task kind 'nope'"),
    ({"kind": "toy_sum", "baselines": ["zero", "pca"]}, "tasks[0].baselines[1]: unknown baseline 'pca'"),
    ({"kind": "toy_sum", "peers": ["anndata"]}, "tasks[0].peers[0]: unknown peer 'anndata'"),
    ({"kind": "toy_sum", "params": {"m": 1}}, "tasks[0].params.m: unknown field"),
    ({"kind": "toy_sum", "params": {"n": "many"}}, "tasks[0].params.n: expected an integer"),
    ({"kind": "toy_sum", "params": {"n": 0}}, "tasks[0].params.n: must be >= 1"),
    ({"kind": "toy_sum", "data": "missing.h5ad"}, "tasks[0].data: no such file or folder"),
    ({"kind": "toy_sum", "recipes": ["nowhere.yaml"]}, "tasks[0].recipes[0].config: "),
    ({"kind": "toy_sum", "recipes": [{"config": {"modality": "sound"}}]}, "tasks[0].recipes[0].config.modality"),
    ({"kind": "toy_sum", "colour": "red"}, "tasks[0].colour: unknown field"),
    ({"kind": "expression_memory", "recipes": [{"config": {"modality": "image", "method": {"name": "simclr"},
                                                           "encoder": {"name": "resnet_tiny"}}}]},
     "tasks[0].recipes[0]: 'recipe0' is a recipe for image data; task kind expression_memory reads expression"),
    ({"name": "a b", "kind": "toy_sum"}, "tasks[0].name"),
    ({"kind": "toy_sum", "quick": {"n": 0}}, "tasks[0].quick.n: must be >= 1"),
    ({"kind": "toy_sum", "recipes": [{"name": "zero", "config": {}}]},
     "tasks[0].recipes[0].name: 'zero' is already a baseline's name in task kind toy_sum"),
    ({"kind": "toy_sum", "recipes": [{"name": "m", "config": {}}, {"name": "m", "config": {}}]},
     "tasks[0].recipes[1].name: 'm' is already recipes[0]'s name"),
    ({"kind": "toy_sum", "recipes": [{"name": "../m", "config": {}}]}, "tasks[0].recipes[0].name: '../m' may hold"),
    ({"kind": ["toy_sum"]}, "tasks[0].kind: expected a string"),
    ({"name": 3, "kind": "toy_sum"}, "tasks[0].name: expected a string"),
    ({"kind": "toy_sum", "data": ""}, "tasks[0].data: an empty path"),
    ({"kind": "toy_sum", "data": 5}, "tasks[0].data: expected a path, or a mapping of role -> path; got 5"),
    ({"kind": "crop_classification", "data": "."}, "tasks[0]: recipes, baselines: the task lists neither"),
    ({"kind": "crop_classification", "data": ".", "baselines": ["pixel_pca"], "params": {"probe_only": ["m"]}},
     "tasks[0].params.probe_only: no recipe named 'm' in this task; its recipes are []"),
    ({"kind": "crop_classification", "data": ".", "baselines": ["pixel_pca"],
      "params": {"label_fractions": [1.0, 1.0]}}, "tasks[0].params.label_fractions: each fraction once"),
    ({"kind": "toy_sum", "params": {1: 2, "n": 3}}, "tasks[0].params.1: field names are text, got int 1"),
    ({"kind": "toy_sum", "params": []}, "tasks[0].params: expected a mapping, got []"),
    ({"kind": "knn_transfer", "params": {"spread": float("nan")}},
     "tasks[0].params.spread: expected a finite number, got nan"),
    ({"kind": "knn_transfer", "quick": {"spread": float("inf")}},
     "tasks[0].quick.spread: expected a finite number, got inf"),
    ({"kind": "knn_transfer", "params": {"agreement_target": 5.0}},
     "tasks[0].params.agreement_target: a share of calls, must lie in (0, 1], got 5.0"),
    ({"kind": "knn_transfer", "params": {"speed_target": -1}}, "tasks[0].params.speed_target: a speed-up, must be"),
    ({"kind": "expression_celltype", "params": {"seeds": [0, -1]}},
     "tasks[0].params.seeds[1]: expected an integer >= 0, got -1"),  # --quick's seeds would have hidden it
    ({"kind": "expression_celltype", "params": {"validation_seed": -3}},
     "tasks[0].params.validation_seed: expected an integer >= 0, got -3"),
    ({"kind": "knn_transfer", "data": "."}, "tasks[0].data: task kind knn_transfer reads no data (it makes its own)"),
    ({"kind": "crop_classification", "data": {"train": "."}, "baselines": ["pixel_pca"]},
     "tasks[0].data.train: task kind crop_classification reads one file (data: <path>)"),
    ({"kind": "crop_augmentation", "data": {"rbg": "."}},
     "tasks[0].data.rbg: task kind crop_augmentation reads the roles ['rgb', 'uint16']"),
    ({"kind": "cell_cycle", "params": {"source": "crops"}, "baselines": ["pixel_pca"]},
     "tasks[0].data: source crops reads crops with phase labels"),
])
def test_bad_suite_names_the_field(tmp_path, task, field):
    path = _write(tmp_path, {"tasks": [task]})
    with pytest.raises(ConfigError, match=f"^{str(path)}: " + __import__("re").escape(field)):
        load_suite(path)


def test_quick_runs_read_the_full_params_too(tmp_path):
    """--quick replaces n, but a bad n is still refused: a suite that passes --quick must not fail the full run."""
    path = _write(tmp_path, _suite(params={"n": 0}))
    with pytest.raises(ConfigError, match=r"tasks\[0\].params.n: must be >= 1"):
        load_suite(path, quick=True)


def test_suite_names_name_files_inside_out(tmp_path):
    with pytest.raises(ConfigError, match=r"name: '../escaped' may hold only"):
        load_suite(_write(tmp_path, _suite() | {"name": "../escaped"}))
    unnamed = {k: v for k, v in _suite().items() if k != "name"}
    assert load_suite(_write(tmp_path, unnamed, "my.suite v2.yaml")).name == "my_suite_v2"  # a stem, made safe


def test_results_are_readable_as_files_written_by_open(tmp_path):
    """Written atomically, with the umask's mode (mkstemp's owner-only 0600 hid shared results)."""
    import os

    mask = os.umask(0o022)
    try:
        run = run_suite(load_suite(_write(tmp_path, _suite(params={"plot": True}))), progress=False)
    finally:
        os.umask(mask)
    for path in (run.markdown_path, run.json_path, tmp_path / "results" / "toy_a_p.png"):
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_a_plot_listed_but_not_written_is_left_out_not_fatal(tmp_path, caplog):
    @dataclass
    class P:
        pass

    kind = TASKS.get("toy_lister") or register(TaskKind(
        name="toy_lister", params=P, summary="lists a plot it never writes",
        run=lambda task, ctx: TaskResult(plots=[f"{ctx.prefix}_none.png"])))
    run = run_suite(load_suite(_write(tmp_path, {"name": "l", "tasks": [{"kind": kind.name}]})), progress=False)
    assert run.results["toy_lister"].plots == [] and run.json_path.is_file()
    assert "lists the plot l_toy_lister_none.png but did not write it" in caplog.text


@pytest.mark.parametrize("text", ["[" * 100_000, '{"suite": {}, "quick": 0, "started": 0, "seconds": 0, '
                                  '"tasks": [], "failed": {}}'])
def test_malformed_json_beside_the_results_is_not_ours(tmp_path, text):
    out = tmp_path / "results"
    out.mkdir()
    (out / "toy.json").write_text(text)
    with pytest.raises(OverwriteError, match="toy.json exists and was not written by sslcell benchmark"):
        run_suite(load_suite(_write(tmp_path, _suite())), progress=False)
    (out / "toy.json").unlink()
    (out / "other.json").write_text(text)  # read when looking for the records that list plots
    (out / "toy_a_p.png").write_text("mine")
    with pytest.raises(OverwriteError, match="toy_a_p.png exists and was not written"):
        run_suite(load_suite(_write(tmp_path, _suite(params={"plot": True}))), progress=False)


def test_bad_suite_files(tmp_path):
    with pytest.raises(ConfigError, match="no such suite file"):
        load_suite(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [kind: toy_sum\n  name: x")
    with pytest.raises(ConfigError, match="not valid YAML.*line"):
        load_suite(bad)
    with pytest.raises(ConfigError, match="tasks: expected a non-empty list"):
        load_suite(_write(tmp_path, {"name": "x"}))
    with pytest.raises(ConfigError, match=r"tasks\[1\].name: 'a' is used twice"):
        load_suite(_write(tmp_path, {"tasks": [{"name": "a", "kind": "toy_sum"}] * 2}))


@pytest.mark.parametrize(("task", "message"), [
    ({"kind": "crop_classification", "data": "crops.npz", "params": {"label_key": "fate"}},
     "tasks[1].params.label_key: crops.npz has no obs column 'fate'; its columns are ['label']"),
    ({"kind": "crop_classification", "data": "crops.npz", "params": {"channels": [7]}},
     "tasks[1].params.channels: channel index 7 out of range for 3 channels"),
    ({"kind": "crop_classification", "data": "broken.npz"}, "tasks[1].data: "),
    ({"kind": "expression_celltype", "data": "broken.h5ad"}, "tasks[1].data: "),
    ({"kind": "expression_celltype", "data": "folder"}, "tasks[1].data: "),
    ({"kind": "expression_celltype", "data": "cells.h5ad", "params": {"label_key": "type"}},
     "tasks[1].params.label_key: cells.h5ad has no obs column 'type'"),
    ({"kind": "transfer_quality", "data": "cells.h5ad", "params": {"group_key": "donor"}},
     "tasks[1].params.group_key: cells.h5ad has no obs column 'donor'"),
])
def test_data_that_cannot_be_read_as_the_task_reads_it_is_refused_before_any_task_runs(tmp_path, task, message):
    """Each failed only when its task ran, after the tasks before it (hours, in a full suite)."""
    import anndata as ad
    import numpy as np

    np.savez(tmp_path / "crops.npz", images=np.zeros((6, 3, 8, 8), np.uint8), label=np.array(["a", "b"] * 3))
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    (tmp_path / "broken.h5ad").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    (tmp_path / "folder").mkdir()
    ad.AnnData(np.ones((4, 3), np.float32), obs={"label": list("abab")}).write_h5ad(tmp_path / "cells.h5ad")
    baselines = {"crop_classification": ["pixel_pca"], "expression_celltype": ["pca_hvg"],
                 "transfer_quality": ["pca_hvg"]}
    suite = {"tasks": [{"name": "first", "kind": "toy_sum"},
                       {"name": "second", "baselines": baselines[task["kind"]], **task}]}
    with pytest.raises(ConfigError, match=f"^{tmp_path / 'suite.yaml'}: " + __import__("re").escape(message)):
        load_suite(_write(tmp_path, suite))


def test_a_top_level_key_that_is_not_text_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"suite.1: field names are text, got int 1"):
        load_suite(_write(tmp_path, {1: "x", **_suite()}))


def test_a_device_this_machine_lacks_is_refused_before_any_task(tmp_path, capsys):
    import torch

    path = _write(tmp_path, _suite())
    assert main(["benchmark", str(path), "--device", "gpu"]) == 2
    assert "--device: 'gpu' is not a device; give auto, cpu, cuda or cuda:<index>" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["benchmark", str(path), "--device", "cuda"]) == 2
        assert "--device cuda: no CUDA device is available on this machine" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()  # nothing ran, nothing was written


def test_bad_seeds_and_duplicate_keys_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="seed: expected an integer >= 0, got -1"):
        load_suite(_write(tmp_path, _suite() | {"seed": -1}))
    twice = tmp_path / "twice.yaml"
    twice.write_text("tasks:\n  - kind: toy_sum\n    params: {n: 3, n: 5}\n")
    with pytest.raises(ConfigError, match="key 'n' is given twice in one mapping"):
        load_suite(twice)


def test_data_paths_resolve_beside_the_suite_without_a_data_dir(tmp_path, monkeypatch):
    """As out and recipe paths do; the current folder holding a file of the same name is not read."""
    (tmp_path / "suites").mkdir()
    (tmp_path / "suites" / "x.bin").write_bytes(b"12")
    (tmp_path / "x.bin").write_bytes(b"1")
    monkeypatch.chdir(tmp_path)
    assert load_suite(_write(tmp_path / "suites", _suite(data="x.bin"))).tasks[0].path == tmp_path / "suites" / "x.bin"


def test_another_suite_file_with_the_same_name_never_replaces_its_results(tmp_path):
    first = run_suite(load_suite(_write(tmp_path, _suite(), "mine.yaml")), progress=False)
    kept = first.markdown_path.read_text()
    with pytest.raises(OverwriteError, match="holds the results of suite file mine.yaml, not copy.yaml"):
        run_suite(load_suite(_write(tmp_path, _suite(params={"n": 4}), "copy.yaml")), progress=False)
    assert first.markdown_path.read_text() == kept
    assert run_suite(load_suite(_write(tmp_path, _suite(params={"n": 4}), "mine.yaml")), progress=False).errors == {}


def test_data_paths_are_normalised(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"1")
    (tmp_path / "suites").mkdir()
    path = _write(tmp_path / "suites", _suite(data="../x.bin") | {"data_dir": "../suites"})
    task = load_suite(path).tasks[0]
    assert task.path == tmp_path / "x.bin" and ".." not in task.path.parts  # records and model cards read clean


def test_recipes_resolve_relative_to_the_suite(tmp_path):
    path = _write(tmp_path, _suite(recipes=["configs/expression_mae.yaml"]))
    with pytest.raises(ConfigError, match="no such config file"):
        load_suite(path)
    import shutil
    from pathlib import Path

    (tmp_path / "configs").mkdir()
    shutil.copy(Path(__file__).parents[2] / "configs" / "expression_mae.yaml", tmp_path / "configs")
    task = load_suite(path).tasks[0]
    assert task.recipes[0].name == "expression_mae" and task.recipes[0].config.method.name == "mae"


def _refused_and_kept(tmp_path, name: str, text: str, match: str, suite: dict | None = None) -> None:
    """A user's file ``results/<name>`` where a run would write: the run is refused and the file kept as it was."""
    out = tmp_path / "results"
    out.mkdir(exist_ok=True)
    (out / name).write_text(text)
    with pytest.raises(OverwriteError, match=match):
        run_suite(load_suite(_write(tmp_path, suite or _suite())), progress=False)
    assert (out / name).read_text() == text


def test_never_overwrites_a_file_it_did_not_write(tmp_path):
    _refused_and_kept(tmp_path, "toy.md", "my notes\n", "not written by sslcell benchmark")


def test_out_naming_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OverwriteError, match=r"notes.txt: is a file; the suite's out \(or --out\) names the folder"):
        run_suite(load_suite(_write(tmp_path, _suite()), out=tmp_path / "notes.txt"), progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_pretraining_stopped_by_sigterm_stops_the_suite(tmp_path, monkeypatch, capsys):
    """It was recorded as a failed task (or a recipe 'not run') and the suite went on training."""
    from sslcell.errors import RunInterrupted

    ran = []

    def interrupted(task, ctx):
        ran.append(task.name)
        raise RunInterrupted("stopped by SIGTERM at step 3")

    import dataclasses

    monkeypatch.setitem(TASKS, "toy_sum", dataclasses.replace(TOY, run=interrupted))
    suite = _suite()
    suite["tasks"].append({"name": "b", "kind": "toy_sum"})
    path = _write(tmp_path, suite)
    with pytest.raises(RunInterrupted):
        run_suite(load_suite(path), progress=False)
    assert ran == ["a"] and not (tmp_path / "results" / "toy.md").exists()
    assert main(["benchmark", str(path)]) == 143 and "stopped by SIGTERM" in capsys.readouterr().err


def test_workdir_must_be_new_empty_or_the_runners_own(tmp_path):
    """Tasks replace the model folders in --workdir: a user's folder with files in it is refused and kept."""
    mine = tmp_path / "mine"
    (mine / "a").mkdir(parents=True)
    (mine / "a" / "model.txt").write_text("my model")
    with pytest.raises(OverwriteError, match=r"mine: the folder holds files but was not made by sslcell benchmark"):
        run_suite(load_suite(_write(tmp_path, _suite())), workdir=mine, progress=False)
    assert [p.name for p in mine.rglob("*")] == ["a", "model.txt"] and not (tmp_path / "results").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OverwriteError, match="is a file"):
        run_suite(load_suite(_write(tmp_path, _suite())), workdir=tmp_path / "file", progress=False)
    work = tmp_path / "work"
    for _ in range(2):  # a new folder becomes the runner's; an earlier run's is used again
        assert run_suite(load_suite(_write(tmp_path, _suite())), workdir=work, progress=False).errors == {}
    assert (work / "sslcell_benchmark_workdir.json").is_file() and (work / "a").is_dir()


def test_a_users_file_where_a_failed_run_would_write_is_refused_before_any_work(tmp_path):
    """Checked after the run, it lost the run's results; now checked first."""
    _refused_and_kept(tmp_path, "toy_failed.md", "my notes",
                      "toy_failed.md exists and was not written by sslcell benchmark", _suite(params={"n": 4}))
    assert not (tmp_path / "results" / "toy.md").exists()


def test_a_json_file_it_did_not_write_is_never_replaced(tmp_path):
    """A user's JSON whose first lines mention a seed (even the suite file itself) is not a results record."""
    _refused_and_kept(tmp_path, "toy.json", '{"seed": 42, "notes": "mine"}',
                      "toy.json exists and was not written by sslcell benchmark")


def test_plots_never_replace_a_users_file_nor_a_kept_runs_plot(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "toy_a_p.png").write_text("my figure")
    with pytest.raises(OverwriteError, match="toy_a_p.png exists and was not written by sslcell benchmark"):
        run_suite(load_suite(_write(tmp_path, _suite(params={"plot": True}))), progress=False)
    assert (out / "toy_a_p.png").read_text() == "my figure" and not (out / "toy.md").exists()
    (out / "toy_a_p.png").unlink()

    suite = _suite(params={"plot": True, "n": 4})
    suite["tasks"].append({"name": "b", "kind": "toy_sum"})
    good = run_suite(load_suite(_write(tmp_path, suite)), progress=False)
    assert good.results["a"].plots == ["toy_a_p.png"] and (out / "toy_a_p.png").read_text() == "n=4"
    assert "![a](toy_a_p.png)" in good.markdown_path.read_text()
    again = run_suite(load_suite(_write(tmp_path, suite)), progress=False)  # its own plot: replaced
    assert again.markdown_path == good.markdown_path
    suite["tasks"][0]["params"]["n"], suite["tasks"][1]["params"] = 5, {"fail": True}
    failed = run_suite(load_suite(_write(tmp_path, suite)), progress=False)
    assert (out / "toy_a_p.png").read_text() == "n=4"  # the kept results' plot
    assert failed.results["a"].plots == ["toy_failed_a_p.png"] and (out / "toy_failed_a_p.png").read_text() == "n=5"
    assert "![a](toy_failed_a_p.png)" in failed.markdown_path.read_text()


def test_results_json_is_strict(tmp_path):
    """NaN scores are written as null: strict JSON readers (jq, JavaScript) reject NaN."""
    @dataclass
    class P:
        pass

    kind = TASKS.get("toy_nan") or register(TaskKind(
        name="toy_nan", params=P, summary="NaN", run=lambda task, ctx: TaskResult(
            tables=[Table("t", ["x"], [{"x": float("nan")}])], raw={"y": [1.0, float("inf")]})))
    run = run_suite(load_suite(_write(tmp_path, {"name": "n", "tasks": [{"kind": kind.name}]})), progress=False)
    text = run.json_path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["tasks"]["toy_nan"]["raw"] == {"y": [1.0, None]}
    assert "| nan |" in run.markdown_path.read_text()  # the Markdown reads the scores as they were


def test_cli_runs_lists_and_reports_errors(tmp_path, capsys):
    path = _write(tmp_path, _suite())
    assert main(["benchmark", str(path), "--quick", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "toy_quick.json").exists()
    assert "target not met: a: sum at least 10" in capsys.readouterr().out
    assert main(["benchmark", "--list"]) == 0
    assert "toy_sum: sum of range(n)" in capsys.readouterr().out
    assert main(["benchmark", str(tmp_path / "none.yaml")]) == 2
    assert "no such suite file" in capsys.readouterr().err
    failing = _write(tmp_path, _suite(params={"fail": True}), "f.yaml")
    assert main(["benchmark", str(failing), "--out", str(tmp_path / "f")]) == 1
    assert main(["benchmark", str(path), "--out", str(tmp_path / "o"), "--resume"]) == 2  # nothing to resume from
    assert "--resume: give the --workdir" in capsys.readouterr().err
    assert main(["benchmark", str(path), "--out", str(tmp_path / "o"), "--workdir", str(tmp_path / "w"),
                 "--resume"]) == 0


def test_only_runs_some_tasks_into_their_own_files(tmp_path):
    suite = _suite()
    suite["tasks"] += [{"name": "b", "kind": "toy_sum"}, {"name": "c", "kind": "toy_sum"}]
    path = _write(tmp_path, suite)
    run = run_suite(load_suite(path), progress=False, only=["c", "a"])
    assert set(run.results) == {"a", "c"} and run.markdown_path.name == "toy_a-c.md"
    assert not (tmp_path / "results" / "toy.md").exists()  # the whole suite's results are not replaced
    with pytest.raises(ConfigError, match="--only: no task named 'z'"):
        run_suite(load_suite(path), progress=False, only=["z"])


def test_only_at_load_time_skips_the_other_tasks_data(tmp_path):
    suite = _suite()
    suite["tasks"].append({"name": "b", "kind": "toy_sum", "data": "absent.npz"})
    path = _write(tmp_path, suite)
    with pytest.raises(ConfigError, match=r"tasks\[1\].data: no such file"):
        load_suite(path)
    loaded = load_suite(path, only=["a"])
    assert [t.name for t in loaded.tasks] == ["a"]
    assert run_suite(loaded, progress=False).markdown_path.name == "toy_a.md"
    with pytest.raises(ConfigError, match="--only: no task named 'c'"):
        load_suite(path, only=["c"])


def test_recipes_keeps_some_recipes_into_their_own_files(tmp_path, capsys):
    (tmp_path / "r1.yaml").write_text("modality: expression\nmethod: {name: mae}\n")
    (tmp_path / "r2.yaml").write_text("modality: expression\nmethod: {name: simclr}\n")
    suite = _suite(recipes=["r1.yaml", "r2.yaml"], baselines=["zero"])
    suite["tasks"].append({"name": "b", "kind": "toy_sum", "recipes": ["r1.yaml"]})
    path = _write(tmp_path, suite)
    loaded = load_suite(path, only=["a"], recipes=["r2"])
    assert [r.name for r in loaded.tasks[0].recipes] == ["r2"] and loaded.recipes == ["r2"]
    run = run_suite(loaded, progress=False)
    assert run.results["a"].raw == {"baselines": ["zero"], "recipes": ["r2"]}  # baselines still run
    assert run.markdown_path.name == "toy_a_r2.md"
    assert not (tmp_path / "results" / "toy_a.md").exists()  # the task's full results are not replaced
    assert load_suite(path, recipes=["r1"]).recipes == ["r1"]  # every task has r1
    with pytest.raises(ConfigError, match=r"--recipes: task b of suite toy has none of \['r2'\]; its recipes "
                                          r"are \['r1'\]"):
        load_suite(path, recipes=["r2"])
    with pytest.raises(ConfigError, match="--recipes: no kept task of suite toy has a recipe named 'zz'"):
        load_suite(path, only=["a"], recipes=["r1", "zz"])
    assert main(["benchmark", str(path), "--only", "a", "--recipes", "r1", "--out", str(tmp_path / "o")]) == 0
    assert "toy_a_r1.md" in capsys.readouterr().out


def test_ctrl_c_ends_the_cli_with_a_hint_not_a_traceback(tmp_path, monkeypatch, capsys):
    import sslcell.benchmark as benchmark

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(benchmark, "run_suite", interrupted)
    assert main(["benchmark", str(_write(tmp_path, _suite()))]) == 130
    err = capsys.readouterr().err
    assert "sslcell benchmark: interrupted; run it again with the same --workdir and --resume" in err
    assert "Traceback" not in err


def _checked_kind() -> TaskKind:
    """A toy kind whose load-time check refuses n > 100 (naming params.n) and n == 50 (naming no field)."""

    def check_task(task) -> None:
        if task.params.n > 100:
            raise ConfigError(f"params.n: at most 100, got {task.params.n}")
        if task.params.n == 50:
            raise ConfigError("recipes: none of them works with n 50")

    return TASKS.get("toy_checked") or register(TaskKind(
        name="toy_checked", params=ToyParams, run=_toy_run, summary="sum of range(n), checked", check_task=check_task,
        quick={"n": 3}))


@pytest.mark.parametrize("quick", [False, True])
def test_a_bad_quick_setting_is_named_under_quick(tmp_path, quick):
    """Both settings are checked whichever runs; a failure of the quick ones names quick:, not params:."""
    _checked_kind()
    bad_quick = _write(tmp_path, {"tasks": [{"kind": "toy_checked", "params": {"n": 5}, "quick": {"n": 200}}]})
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.quick\.n: at most 100, got 200"):
        load_suite(bad_quick, quick=quick)
    bad_full = _write(tmp_path, {"tasks": [{"kind": "toy_checked", "params": {"n": 200}}]})
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.params\.n: at most 100, got 200"):
        load_suite(bad_full, quick=quick)
    cross = _write(tmp_path, {"tasks": [{"kind": "toy_checked", "params": {"n": 5}, "quick": {"n": 50}}]})
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.recipes: none of them works with n 50 \(with the task's "
                                          r"--quick settings"):
        load_suite(cross, quick=quick)


def test_data_that_no_task_reads_warns_and_a_missing_data_folder_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.bin").write_bytes(b"1")
    own = _write(tmp_path, _suite())
    with pytest.warns(UserWarning, match=r"--data .*d is not used: no task of suite.yaml reads a relative data path"):
        load_suite(own, data_dir=tmp_path / "d")
    absolute = _write(tmp_path, _suite(data=str(tmp_path / "d" / "x.bin")), "abs.yaml")
    with pytest.warns(UserWarning, match="is not used"):
        load_suite(absolute, data_dir=tmp_path / "d")
    relative = _write(tmp_path, _suite(data="x.bin"), "rel.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_suite(relative, data_dir=tmp_path / "d").tasks[0].path == tmp_path / "d" / "x.bin"
        load_suite(own)  # no --data, nothing to say
    with pytest.raises(ConfigError, match=r"--data: no such folder: .*absent"):
        load_suite(relative, data_dir=tmp_path / "absent")
    with pytest.raises(ConfigError, match="--data: no such folder"):
        load_suite(own, data_dir=tmp_path / "d" / "x.bin")  # a file, not a folder


def test_the_cli_prints_sslcells_warnings_as_its_own_lines(tmp_path):
    """As a user runs it: one line, the flags' names, not the console script's line."""
    suite = Path(__file__).parents[2] / "benchmarks" / "suites" / "transfer_speed.yaml"  # makes its own data
    command = ["-m", "sslcell", "benchmark", str(suite), "--data", str(tmp_path), "--recipes", "none"]
    shown = subprocess.run([sys.executable, *command], capture_output=True, text=True)
    assert shown.returncode == 2  # --recipes none: refused after the warning
    assert f"sslcell benchmark: warning: --data {tmp_path} is not used" in shown.stderr
    assert "UserWarning" not in shown.stderr and "main()" not in shown.stderr



def test_under_w_error_an_sslcell_warning_is_an_error_line_not_a_traceback(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    path = _write(tmp_path, _suite())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as python -W error sets it
        assert main(["benchmark", str(path), "--data", str(tmp_path / "d"), "--out", str(tmp_path / "out")]) == 2
    assert f"sslcell benchmark: error: --data {tmp_path / 'd'} is not used" in capsys.readouterr().err


def test_in_process_the_cli_leaves_warnings_to_the_callers_recorders_and_filters(tmp_path):
    (tmp_path / "d").mkdir()
    path = _write(tmp_path, _suite())
    formatter, filters = warnings.formatwarning, list(warnings.filters)
    with pytest.warns(SSLCellWarning, match="is not used"):  # recorded, as any warning raised in a call
        assert main(["benchmark", str(path), "--data", str(tmp_path / "d"), "--out", str(tmp_path / "out")]) == 0
    assert warnings.formatwarning is formatter and warnings.filters == filters
