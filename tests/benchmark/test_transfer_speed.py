"""Task kind knn_transfer: the shipped suite with --quick, its data, one entry run in this process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from sslcell.benchmark import load_suite, run_suite
from sslcell.benchmark.tasks.transfer_speed import make_data, run_entry
from sslcell.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "benchmarks" / "suites" / "transfer_speed.yaml"


def test_shipped_suite_quick(tmp_path):
    run = run_suite(load_suite(SUITE, quick=True, out=tmp_path), progress=False)
    assert not run.errors, run.errors
    record = json.loads((tmp_path / "transfer_speed_quick.json").read_text())
    task = record["tasks"]["transfer"]
    rows = {r["entry"]: r for r in task["raw"]["rows"]}
    assert list(rows) == ["sslcell_ivf", "sslcell_exact", "sklearn_brute"]  # --quick forces the IVF index at 20k
    assert rows["sslcell_ivf"]["index"] == "ivf (sq8, nlist 141, nprobe 48)"  # round(sqrt(20000)) lists
    for row in rows.values():
        assert row["total_s"] == pytest.approx(row["build_s"] + row["search_s"])
        assert row["build_s"] > 0 and row["search_s"] > 0 and row["peak_rss_mib"] >= row["rss_after_imports_mib"] > 0
        # where the peak could be reset: at least the data loaded after the imports (reference 20,000 x 64 float32
        # = 4.9 MiB, queries 0.5 MiB)
        assert row["work_added_rss_mib"] is None or row["work_added_rss_mib"] > 5
        assert 0.9 <= row["accuracy_vs_cluster_label"] <= 1.0  # clusters at s.d. 1.2 in 64-d are well separated
    assert rows["sslcell_exact"]["agreement_with_exact"] == 1.0
    assert rows["sklearn_brute"]["agreement_with_exact"] > 0.99  # both exact: only ties may differ
    speed, agreement = task["targets"]
    assert speed["value"] == pytest.approx(rows["sklearn_brute"]["total_s"] / rows["sslcell_ivf"]["total_s"])
    assert speed["goal"] == 10.0 and agreement["goal"] == 0.97
    assert agreement["value"] == rows["sslcell_ivf"]["agreement_with_exact"] and agreement["met"]
    (table,) = task["tables"]
    assert all(math.isfinite(r["x scikit-learn"]) for r in table["rows"])
    md = (tmp_path / "transfer_speed_quick.md").read_text()
    assert "20,000 x 64 float32 reference embeddings" in md
    assert "How the default index was chosen" in md  # the suite's hand-written notes are kept


def test_make_data_draws_what_bench_transfer_drew(tmp_path):
    make_data(tmp_path, 300, 50, 8, seed=3)
    # benchmarks/bench_transfer.py's draws, written out: the committed results were made from these
    rng = np.random.default_rng(3)
    centres = rng.normal(0, 1.0, (100, 8)).astype(np.float32)
    for name, n in (("reference", 300), ("query", 50)):
        cluster = rng.integers(100, size=n)
        x = centres[cluster] + rng.normal(0, 1.2, (n, 8)).astype(np.float32)
        assert np.array_equal(np.load(tmp_path / f"{name}.npy"), x)
        labels = np.load(tmp_path / f"{name}_labels.npy")
        assert labels.dtype.kind == "U" and np.array_equal(labels, [f"type{c % 20}" for c in cluster])


def test_exact_entries_agree_in_process(tmp_path):
    make_data(tmp_path, 2000, 300, 8, seed=0, n_clusters=10, n_labels=4)
    for entry in ("sslcell_exact", "sklearn_brute"):
        out = run_entry({"entry": entry, "folder": str(tmp_path), "n_neighbors": 7, "index": "exact"})
        assert out["entry"] == entry and out["build_s"] >= 0 and out["search_s"] > 0
        assert out["peak_rss_mib"] >= out["rss_after_imports_mib"] > 0
        assert out["work_added_rss_mib"] is None or out["work_added_rss_mib"] >= 0
    ours, theirs = np.load(tmp_path / "pred_sslcell_exact.npy"), np.load(tmp_path / "pred_sklearn_brute.npy")
    assert ours.shape == (300,) and set(np.unique(ours)) <= {f"type{i}" for i in range(4)}
    assert np.mean(ours == theirs) > 0.99  # the same distance-weighted 7-NN vote; float ties aside


@pytest.mark.parametrize(("params", "field"), [
    ({"index": "annoy"}, "index"),
    ({"n_labels": 1}, "n_labels"),
    ({"n_reference": 10, "n_neighbors": 15}, "n_neighbors"),
    ({"spread": 0}, "spread"),
])
def test_bad_params_name_the_field(tmp_path, params, field):
    suite_file = tmp_path / "bad.yaml"
    suite_file.write_text(yaml.safe_dump({"tasks": [{"kind": "knn_transfer", "params": params}]}))
    with pytest.raises(ConfigError, match=rf"tasks\[0\]\.params\.{field}:"):
        load_suite(suite_file)
