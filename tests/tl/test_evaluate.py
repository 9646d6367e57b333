from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from sslcell.errors import ConfigError, InputError
from sslcell.evaluate import EvaluationReport, evaluate

DATA = Path(__file__).parents[2] / ".." / "shared" / "data"


def _adata(n_per_type=60, n_genes=200, seed=0) -> ad.AnnData:
    """3 cell types: Poisson counts with 15 marker genes per type, a separated and a random embedding."""
    rng = np.random.default_rng(seed)
    types = np.repeat(np.arange(3), n_per_type)
    rates = rng.gamma(0.5, 2.0, size=(3, n_genes))
    rates[:, :45] *= np.repeat(np.eye(3) * 10 + 0.1, 15, axis=1)
    counts = sparse.csr_matrix(rng.poisson(rates[types] * rng.lognormal(0, 0.3, (len(types), 1))), dtype=np.float32)
    adata = ad.AnnData(counts, obs=pd.DataFrame(index=[f"cell{i}" for i in range(len(types))]))
    adata.obs["cell_type"] = pd.Categorical(np.array(["T cell", "B cell", "NK cell"])[types])
    adata.obsm["X_sslcell"] = rng.normal(scale=15, size=(3, 16))[types] + rng.normal(size=(len(types), 16))
    adata.obsm["X_random"] = rng.normal(size=(len(types), 16))
    return adata


def test_end_to_end_scores_and_outputs(tmp_path):
    adata = _adata()
    report = evaluate(adata, "cell_type", ["X_sslcell", "X_random"], n_splits=5)
    df = report.to_dataframe()
    assert list(df.columns) == [
        "representation", "dims", "protocol", "macro_f1", "macro_f1_std", "accuracy", "accuracy_std", "n_cells",
        "n_classes",
    ]  # fmt: skip
    assert len(df) == 12 and set(df.representation) == {"X_sslcell", "X_random", "pca"}
    assert set(df.protocol) == {"knn_cv", "logistic_cv", "logistic_few_label", "logistic_few_label_raw"}
    assert (df.n_cells == 180).all() and (df.n_classes == 3).all()
    by_rep = df.groupby("representation").macro_f1
    assert by_rep.min()["X_sslcell"] == 1.0  # separated clusters: every protocol is perfect
    pca = df[df.representation == "pca"].set_index("protocol").macro_f1
    assert pca["knn_cv"] > 0.95 and pca["logistic_cv"] > 0.95  # strong marker programmes survive the pipeline
    assert pca["logistic_few_label"] > 0.45  # above chance; standardised noise PCs hurt with 15 labels
    assert pca["logistic_few_label_raw"] > pca["logistic_few_label"]  # unscaled, the strong PCs dominate
    assert by_rep.max()["X_random"] < 0.6  # chance is 1/3
    assert df.set_index("representation").dims.to_dict() == {"X_sslcell": 16, "X_random": 16, "pca": 50}
    assert (report.n_missing_labels, report.dropped_classes, report.seeds) == (0, {}, [0, 1, 2, 3, 4])

    md = report.to_markdown()
    assert "| representation | dims | protocol | macro-F1 | accuracy |" in md
    assert "| X_sslcell | 16 | kNN-15, 5-fold CV | 1.000 ± 0.000 | 1.000 ± 0.000 |" in md
    assert "logistic, 5 labels/class, 5 draws" in md and "scikit-learn" in md

    path = tmp_path / "report.json"
    report.to_json(path)
    assert json.loads(path.read_text())["label_key"] == "cell_type"
    assert EvaluationReport.from_json(path) == report


def test_missing_labels_and_rare_classes_are_dropped_and_counted():
    adata = _adata()
    labels = adata.obs["cell_type"].astype(object)
    labels.iloc[[3, 70, 150]] = None
    labels.iloc[[0, 1, 2]] = "rare type"
    adata.obs["cell_type"] = labels
    with pytest.warns(UserWarning, match="rare type"):
        report = evaluate(adata, "cell_type", "X_sslcell", baselines=())
    assert report.n_missing_labels == 3 and report.dropped_classes == {"rare type": 3}
    assert report.n_cells == 174 and report.n_classes == 3
    assert {r["n_cells"] for r in report.rows} == {174}
    assert "3 cells without a label" in report.to_markdown() and "`rare type` (3)" in report.to_markdown()


def test_label_types_give_identical_scores():
    adata = _adata(n_per_type=30)
    codes = adata.obs["cell_type"].cat.codes.to_numpy()
    results = []
    for labels in (adata.obs["cell_type"], adata.obs["cell_type"].astype(str), codes, codes.astype(float)):
        adata.obs["label"] = labels
        rows = evaluate(adata, "label", "X_random", baselines=()).rows
        results.append([(r["macro_f1"], r["accuracy"]) for r in rows])
    assert all(res == results[0] for res in results)


def test_deterministic():
    adata = _adata(n_per_type=30)
    assert evaluate(adata, "cell_type", "X_random").rows == evaluate(adata, "cell_type", "X_random").rows
    other_folds = evaluate(adata, "cell_type", "X_random", baselines=(), seed=1).rows
    assert other_folds != evaluate(adata, "cell_type", "X_random", baselines=()).rows


def test_bad_input():
    adata = _adata(n_per_type=30)
    with pytest.raises(InputError, match=r"'celltype'.*available: \['cell_type'\]"):
        evaluate(adata, "celltype", baselines=())
    with pytest.raises(InputError, match=r"'X_scvi'.*available: \['X_sslcell', 'X_random'\]"):
        evaluate(adata, "cell_type", ["X_sslcell", "X_scvi"])
    with pytest.raises(ConfigError, match="umap"):
        evaluate(adata, "cell_type", baselines=("pca", "umap"))
    with pytest.raises(InputError, match="layer 'counts': only the 'pca' baseline reads counts"):
        evaluate(adata, "cell_type", "X_sslcell", baselines=(), layer="counts")  # was ignored
    adata.obsm["X_sslcell"][[5, 9]] = np.nan
    with pytest.raises(InputError, match=r"obsm\['X_sslcell'\].*2 cells.*'cell5'"):
        evaluate(adata, "cell_type", baselines=())
    adata.obs["one"] = "T cell"
    with pytest.raises(InputError, match="need at least 2"):
        evaluate(adata, "one", "X_random", baselines=())


def test_mouse_bladder_pca_knn_reference():
    """PCA-50 + kNN-15, 5-fold CV macro-F1 on real counts (the product team quotes ~0.72; we measure 0.793)."""
    path = DATA / "mouse_bladder_mca_2100.h5ad"
    if not path.exists():
        pytest.skip(f"{path} not present")
    from sslcell.transfer import cross_validated_scores, pca_baseline

    adata = ad.read_h5ad(path)
    res = cross_validated_scores(pca_baseline(adata), adata.obs["label"], probe="knn", k=15, n_splits=5, seed=0)
    assert res["n_classes"] == 16 and res["n_cells"] == 2100
    assert res["macro_f1"] == pytest.approx(0.793, abs=0.02)


def test_a_class_smaller_than_n_per_class_is_warned_about():
    """n_per_class=80 on classes of 60 cells: 59 train, 1 tests, though the report says "80 labels/class"."""
    adata = _adata()
    with pytest.warns(UserWarning, match="n_per_class=80: 3 of 3 classes have 80 cells or fewer") as caught:
        evaluate(adata, "cell_type", "X_sslcell", baselines=[], n_per_class=80)
    names = sorted(adata.obs["cell_type"].unique())
    assert all(name in str(caught[0].message) for name in names)  # the classes' names, not their codes


def test_integer_classes_stored_as_floats_are_named_as_integers_and_a_rep_named_like_a_baseline_refused():
    adata = _adata(n_per_type=30)
    codes = adata.obs["cell_type"].cat.codes.astype(float)
    codes.iloc[[0, 1]] = 7.0  # a rare class, dropped
    codes.iloc[2] = np.nan
    adata.obs["code"] = codes
    with pytest.warns(UserWarning, match=r"\{'7': 2\}"):
        report = evaluate(adata, "code", "X_random", baselines=())
    assert report.dropped_classes == {"7": 2}
    adata.obsm["pca"] = adata.obsm["X_random"]
    with pytest.raises(InputError, match="use_rep 'pca' has the name of a baseline"):
        evaluate(adata, "cell_type", ["X_random", "pca"])
    assert len(evaluate(adata, "cell_type", ["pca"], baselines=()).rows) == 4


def test_too_few_cells_for_the_pca_baseline_say_how_to_go_on():
    adata = _adata(n_per_type=12)  # 36 cells: PCA-50 cannot be fitted
    with pytest.raises(InputError, match=r"the 'pca' baseline: n_comps=50 .*pass baselines=\(\) to score without it"):
        evaluate(adata, "cell_type", "X_sslcell", n_splits=3)
    assert evaluate(adata, "cell_type", "X_sslcell", baselines=(), n_splits=3, n_per_class=5).rows
