from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
from sklearn.base import clone
from sklearn.neighbors import KNeighborsClassifier, KNeighborsTransformer

from sslcell.errors import ConfigError, InputError
from sslcell.transfer.knn import FaissKNNClassifier, FaissNeighbors, knn_transfer
from sslcell.transfer.reference import IVFSettings, _IVFIndex


def _data(n=400, m=150, d=10, n_classes=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    q = rng.normal(size=(m, d)).astype(np.float32)
    y = np.array([f"type_{i}" for i in rng.integers(0, n_classes, n)])
    return x, y, q


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("weights", ["uniform", "distance"])
def test_classifier_matches_sklearn(metric, weights):
    x, y, q = _data()
    ours = FaissKNNClassifier(15, metric=metric, weights=weights).fit(x, y)
    ref = KNeighborsClassifier(15, metric=metric, weights=weights, algorithm="brute").fit(x, y)
    np.testing.assert_array_equal(ours.classes_, ref.classes_)
    np.testing.assert_allclose(ours.predict_proba(q), ref.predict_proba(q), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ours.predict(q), ref.predict(q))
    d_ours, i_ours = ours.kneighbors(q)
    d_ref, i_ref = ref.kneighbors(q)
    np.testing.assert_array_equal(i_ours, i_ref)
    np.testing.assert_allclose(d_ours, d_ref, rtol=1e-5, atol=1e-6)


def test_distances_precise_far_from_origin():
    # |x| ~ 4000, neighbours ~0.2 apart; with many queries faiss takes its BLAS path, |q|^2 + |x|^2 - 2 q.x
    # in float32, which alone is off by ~1 in d^2 here
    rng = np.random.default_rng(1)
    x = (1000 + 0.1 * rng.normal(size=(300, 16))).astype(np.float32)
    q = (1000 + 0.1 * rng.normal(size=(10000, 16))).astype(np.float32)
    d_ours, i_ours = FaissKNNClassifier(10).fit(x, np.zeros(300)).kneighbors(q)
    d_ref, i_ref = KNeighborsClassifier(10, algorithm="brute").fit(x.astype(np.float64), np.zeros(300)).kneighbors(q)
    np.testing.assert_allclose(d_ours, d_ref, rtol=1e-4)
    np.testing.assert_array_equal(i_ours, i_ref)


def test_zero_distance_takes_the_vote_with_distance_weights():
    x = np.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.1, 0.1]], dtype=np.float32)
    y = np.array(["a", "b", "b", "b"])
    clf = FaissKNNClassifier(4, weights="distance").fit(x, y)
    np.testing.assert_array_equal(clf.predict_proba(x[:1]), [[1.0, 0.0]])
    assert FaissKNNClassifier(4).fit(x, y).predict(x[:1])[0] == "b"


def test_training_points_vote_for_themselves_with_distance_weights():
    # as in sklearn, a query at distance 0 takes only its duplicates' votes; faiss alone gives ~1e-3, not 0
    rng = np.random.default_rng(2)
    x = (10 * rng.normal(size=(300, 16))).astype(np.float32)
    y = rng.integers(0, 3, 300)
    proba = FaissKNNClassifier(15, weights="distance").fit(x, y).predict_proba(np.tile(x, (30, 1)))
    np.testing.assert_array_equal(proba, np.eye(3)[np.tile(y, 30)])


def test_batched_queries_equal_unbatched():
    x, y, q = _data(m=101)
    full = FaissKNNClassifier(15).fit(x, y).predict_proba(q)
    batched = FaissKNNClassifier(15, batch_size=7).fit(x, y).predict_proba(q)
    np.testing.assert_array_equal(full, batched)


def test_candidates_an_approximate_index_cannot_find_come_back_at_infinite_distance():
    class OneList(_IVFIndex):  # 40 lists of ~10 cells, 1 searched: fewer than the 30 candidates asked for
        settings = IVFSettings(codec="flat", lists_per_sqrt_n=2.0, probe_divisor=10**6, min_nprobe=1)

    x = np.random.default_rng(0).normal(size=(400, 8)).astype(np.float32)
    dist, idx = OneList(x, "euclidean", 64).search(x[:50], 15)
    missing = idx < 0
    assert missing.any() and np.isinf(dist[missing]).all()
    true = np.linalg.norm(x[np.where(missing, 0, idx)] - x[:50, None, :], axis=2)
    np.testing.assert_allclose(dist[~missing], true[~missing], rtol=1e-5, atol=1e-6)
    assert (idx[:, 0] == np.arange(50)).all() and (dist[:, 1:] >= dist[:, :-1]).all()


def test_integer_labels_and_clone():
    x, _, q = _data()
    y = np.arange(400) % 3 * 10
    clf = clone(FaissKNNClassifier(5, weights="distance"))
    assert clf.get_params()["n_neighbors"] == 5
    assert set(clf.fit(x, y).predict(q)) <= {0, 10, 20}


def test_classifier_bad_input():
    x, y, q = _data()
    bad = x.copy()
    bad[7, 3] = np.nan
    with pytest.raises(InputError, match="row 7"):
        FaissKNNClassifier().fit(bad, y)
    with pytest.raises(InputError, match="k=500"):
        FaissKNNClassifier(500).fit(x, y).predict(q)
    with pytest.raises(InputError, match="features"):
        FaissKNNClassifier().fit(x, y).predict(q[:, :5])
    with pytest.raises(InputError, match="shape"):
        FaissKNNClassifier().fit(x, y[:-1])
    with pytest.raises(ConfigError, match="metric"):
        FaissKNNClassifier(metric="manhattan").fit(x, y)


@pytest.mark.parametrize("mode", ["distance", "connectivity"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_neighbors_graph_matches_sklearn_transformer(mode, metric):
    x, _, q = _data()
    for ours, ref in [
        (FaissNeighbors(15, mode=mode, metric=metric).fit_transform(x),
         KNeighborsTransformer(mode=mode, n_neighbors=15, metric=metric, algorithm="brute").fit_transform(x)),
        (FaissNeighbors(15, mode=mode, metric=metric).fit(x).transform(q),
         KNeighborsTransformer(mode=mode, n_neighbors=15, metric=metric, algorithm="brute").fit(x).transform(q)),
    ]:  # fmt: skip
        assert ours.shape == ref.shape and ours.nnz == ref.nnz
        k = ours.nnz // ours.shape[0]
        assert k == 15 + (mode == "distance")
        np.testing.assert_array_equal(ours.indices.reshape(-1, k), ref.indices.reshape(-1, k))
        np.testing.assert_allclose(ours.data, ref.data, rtol=1e-5, atol=1e-5)


def test_fit_transform_puts_self_first_despite_duplicates():
    x, _, _ = _data(n=60)
    x = np.concatenate([x, x, x])  # every point has two exact duplicates
    g = FaissNeighbors(5).fit_transform(x)
    rows = g.indices.reshape(180, 6)
    np.testing.assert_array_equal(rows[:, 0], np.arange(180))
    np.testing.assert_array_equal(g.data.reshape(180, 6)[:, :3], 0.0)  # self and its two copies
    assert all(len(set(r)) == 6 for r in rows)


def test_scanpy_neighbors_accepts_transformer():
    x, _, _ = _data(n=300, d=12)
    ours, default, sk = (ad.AnnData(obsm={"X_emb": x}, shape=(300, 5)) for _ in range(3))
    sc.pp.neighbors(ours, use_rep="X_emb", transformer=FaissNeighbors(n_neighbors=15))
    sc.pp.neighbors(default, use_rep="X_emb", n_neighbors=15)  # exact sklearn search below 4096 cells
    sc.pp.neighbors(sk, use_rep="X_emb", transformer=KNeighborsTransformer(n_neighbors=15, algorithm="brute"))
    assert ours.uns["neighbors"]["params"]["n_neighbors"] == 15
    conn = ours.obsp["connectivities"].toarray()
    np.testing.assert_allclose(conn, default.obsp["connectivities"].toarray(), atol=1e-5)
    np.testing.assert_allclose(ours.obsp["distances"].toarray(), sk.obsp["distances"].toarray(), atol=1e-5)


def test_knn_transfer_votes_and_confidence():
    ref = np.arange(10, dtype=np.float32)[:, None]
    labels = np.array(["a"] * 6 + ["b"] * 4)
    query = np.array([[0.0], [9.0], [5.4]], dtype=np.float32)  # 5.4: neighbours 5 (a), 6 (b), 4 (a)
    pred, conf = knn_transfer(ref, labels, query, k=3)
    np.testing.assert_array_equal(pred, ["a", "b", "a"])
    np.testing.assert_allclose(conf, [1.0, 1.0, 2 / 3])
    pred, conf = knn_transfer(ref, labels, query, k=15)  # capped at 10: every reference cell votes
    np.testing.assert_array_equal(pred, ["a", "a", "a"])
    np.testing.assert_allclose(conf, 0.6)


def test_knn_transfer_recovers_clusters():
    rng = np.random.default_rng(3)
    centres = rng.normal(scale=10, size=(5, 16))
    ref_y, query_y = rng.integers(0, 5, 500), rng.integers(0, 5, 200)
    ref = centres[ref_y] + rng.normal(size=(500, 16))
    query = centres[query_y] + rng.normal(size=(200, 16))
    pred, conf = knn_transfer(ref, ref_y, query)
    np.testing.assert_array_equal(pred, query_y)
    assert conf.min() > 0.99
