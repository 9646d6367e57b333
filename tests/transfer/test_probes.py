from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from sslcell.errors import ConfigError, InputError
from sslcell.transfer.probes import cross_validated_scores, few_label_scores, few_label_split


def _clusters(n_per_class=40, n_classes=4, d=8, spread=20.0, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat([f"c{i}" for i in range(n_classes)], n_per_class)
    centres = rng.normal(scale=spread, size=(n_classes, d))
    return centres[np.repeat(np.arange(n_classes), n_per_class)] + rng.normal(size=(len(y), d)), y


@pytest.mark.parametrize("probe", ["knn", "logistic"])
def test_separated_clusters_score_perfectly(probe):
    x, y = _clusters()
    cv = cross_validated_scores(x, y, probe=probe)
    assert cv["macro_f1"] == 1.0 and cv["accuracy"] == 1.0 and cv["macro_f1_std"] == 0.0
    assert (cv["n_cells"], cv["n_classes"], len(cv["macro_f1_per_split"])) == (160, 4, 5)
    few = few_label_scores(x, y, probe=probe)
    assert few["macro_f1"] == 1.0 and few["accuracy"] == 1.0


@pytest.mark.parametrize("probe", ["knn", "logistic"])
def test_random_labels_score_at_chance(probe):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(900, 8)), rng.integers(0, 3, 900)
    for res in (cross_validated_scores(x, y, probe=probe), few_label_scores(x, y, probe=probe)):
        assert 0.2 < res["macro_f1"] < 0.45 and 0.2 < res["accuracy"] < 0.45


def _hand_cv(x, y, make_model, standardise, seed=0):
    f1s, accs = [], []
    for train, test in StratifiedKFold(5, shuffle=True, random_state=seed).split(x, y):
        xtr, xte = x[train], x[test]
        if standardise:  # fit on the training fold only
            scaler = StandardScaler().fit(xtr)
            xtr, xte = scaler.transform(xtr), scaler.transform(xte)
        pred = make_model().fit(xtr, y[train]).predict(xte)
        f1s.append(f1_score(y[test], pred, average="macro"))
        accs.append(accuracy_score(y[test], pred))
    return np.array(f1s), np.array(accs)


def test_cv_matches_hand_written_loops():
    x, y = _clusters(n_per_class=50, spread=1.0, seed=2)  # overlapping: scores well below 1
    x = x * np.arange(1, 9)  # uneven feature scales: standardisation matters for logistic
    for probe, make_model, standardise in [
        ("knn", lambda: KNeighborsClassifier(15, algorithm="brute"), False),
        ("logistic", lambda: LogisticRegression(max_iter=1000), True),
    ]:
        res = cross_validated_scores(x, y, probe=probe, seed=3)
        f1s, accs = _hand_cv(x.astype(np.float32), y, make_model, standardise, seed=3)
        assert res["macro_f1"] < 0.95
        np.testing.assert_allclose(res["macro_f1_per_split"], f1s, atol=1e-6)
        np.testing.assert_allclose(res["accuracy_per_split"], accs, atol=1e-6)
        assert res["macro_f1"] == pytest.approx(f1s.mean()) and res["macro_f1_std"] == pytest.approx(f1s.std())


def test_cv_rejects_classes_smaller_than_n_splits():
    x, y = _clusters()
    y[:37] = "rare"  # 'c0' keeps 3 cells
    with pytest.raises(InputError, match=r"'c0': 3"):
        cross_validated_scores(x, y, n_splits=5)
    assert cross_validated_scores(x, y, n_splits=3)["n_classes"] == 5
    with pytest.raises(InputError, match="at least 2 classes"):
        cross_validated_scores(x, np.zeros(len(y)))
    with pytest.raises(ConfigError, match="probe"):
        cross_validated_scores(x, y, probe="svm")


def test_few_label_split_rule():
    y = np.array(["a"] * 20 + ["b"] * 5 + ["c"] * 3 + ["d"])
    train = few_label_split(y, n_per_class=5, seed=0)
    for label, n_train, n_test in [("a", 5, 15), ("b", 4, 1), ("c", 2, 1), ("d", 1, 0)]:
        assert (train[y == label].sum(), (~train[y == label]).sum()) == (n_train, n_test)
    np.testing.assert_array_equal(train, few_label_split(y, 5, seed=0))
    draws = {tuple(np.flatnonzero(few_label_split(y, 5, seed=s) & (y == "a"))) for s in range(10)}
    assert len(draws) == 10  # different seeds draw different cells


def test_few_label_scores_deterministic_and_reference():
    x, y = _clusters(n_per_class=30, spread=1.5, seed=4)
    x, y = np.concatenate([x, x[:1] + 100]), np.append(y, "single")  # a class with one cell
    res = few_label_scores(x, y, n_per_class=3, seeds=(5, 6))
    assert res == few_label_scores(x, y, n_per_class=3, seeds=(5, 6))
    assert res["n_untested_classes"] == 1 and res["seeds"] == [5, 6]
    f1s = []
    for seed in (5, 6):  # reference: scores over the classes that have test cells
        train = few_label_split(y, 3, seed)
        scaler = StandardScaler().fit(x[train])
        model = LogisticRegression(max_iter=1000).fit(scaler.transform(x[train]), y[train])
        pred = model.predict(scaler.transform(x[~train]))
        f1s.append(f1_score(y[~train], pred, labels=np.unique(y[~train]), average="macro", zero_division=0))
    np.testing.assert_allclose(res["macro_f1_per_split"], f1s, atol=1e-6)


def test_few_label_knn_caps_k_at_n_per_class():
    x, y = _clusters(n_per_class=10, n_classes=2, spread=1.5, seed=5)
    res = few_label_scores(x, y, n_per_class=3, probe="knn", k=15, seeds=(1,))  # 6 training cells
    train = few_label_split(y, 3, seed=1)
    pred = KNeighborsClassifier(3).fit(x[train], y[train]).predict(x[~train])
    assert res["accuracy"] == pytest.approx(accuracy_score(y[~train], pred))
