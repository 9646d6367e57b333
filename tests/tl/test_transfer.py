"""tl.transfer_labels: the vote against scikit-learn's, unknown calls, leave-one-out, HNSW and IVF against exact
search (IVF also on overlapping clusters), saved references, the CLI, and each bad input of the issue."""

from __future__ import annotations

import json

import anndata as ad
import faiss
import numpy as np
import pandas as pd
import pytest
from sklearn.neighbors import KNeighborsClassifier

from sslcell import tl
from sslcell.cli import main
from sslcell.errors import ConfigError, FileFormatError, InputError, OverwriteError, SSLCellWarning
from sslcell.transfer.knn import vote
from sslcell.transfer.reference import ReferenceIndex


def _cells(n: int, seed: int, dim: int = 8, n_types: int = 4) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    y = rng.integers(n_types, size=n)
    centres = np.random.default_rng(99).normal(0, 3, (n_types, dim))
    x = (centres[y] + rng.normal(0, 1.5, (n, dim))).astype(np.float32)
    obs = pd.DataFrame({"cell_type": np.array(list("ABCD"))[y]}, index=[f"c{seed}_{i}" for i in range(n)])
    adata = ad.AnnData(obs=obs)
    adata.obsm["X_sslcell"] = x
    return adata


def test_matches_scikit_learns_distance_weighted_vote():
    ref, query = _cells(600, 0), _cells(300, 1)
    assert tl.transfer_labels(query, ref, "cell_type") is None
    knn = KNeighborsClassifier(15, weights="distance").fit(ref.obsm["X_sslcell"], ref.obs["cell_type"])
    np.testing.assert_array_equal(query.obs["cell_type_pred"].astype(str), knn.predict(query.obsm["X_sslcell"]))
    np.testing.assert_allclose(query.obs["cell_type_confidence"], knn.predict_proba(query.obsm["X_sslcell"]).max(1),
                               rtol=1e-5)
    truth = query.obs["cell_type"].to_numpy()
    assert (query.obs["cell_type_pred"].astype(str) == truth).mean() > 0.8
    info = query.uns["sslcell"]["cell_type_pred"]
    assert (info["index"], info["n_reference"], info["n_neighbors"]) == ("exact", 600, 15)
    with pytest.raises(OverwriteError, match="cell_type_pred"):
        tl.transfer_labels(query, ref, "cell_type")


def test_low_confidence_calls_are_unknown_and_copy_leaves_the_query():
    ref, query = _cells(600, 0), _cells(300, 1)
    out = tl.transfer_labels(query, ref, "cell_type", min_confidence=0.9, copy=True, key_added="t")
    assert "t_pred" not in query.obs
    unknown = out.obs["t_pred"] == "unknown"
    assert 0 < unknown.sum() < len(out)
    assert (out.obs["t_confidence"][unknown] < 0.9).all() and (out.obs["t_confidence"][~unknown] >= 0.9).all()
    assert out.uns["sslcell"]["t_pred"]["n_unknown"] == int(unknown.sum())


def test_a_class_named_like_the_unknown_label_is_never_mixed_with_low_confidence_calls():
    ref, query = _cells(600, 0), _cells(300, 1)
    ref.obs["cell_type"] = ref.obs["cell_type"].replace({"A": "unknown"})
    with pytest.raises(InputError, match="a class named 'unknown'.*unknown_label="):
        tl.transfer_labels(query, ref, "cell_type", min_confidence=0.9)
    tl.transfer_labels(query, ref, "cell_type", min_confidence=0.9, unknown_label="low confidence")
    rejected = query.obs["cell_type_pred"] == "low confidence"
    assert 0 < rejected.sum() == query.uns["sslcell"]["cell_type_pred"]["n_unknown"]
    assert (query.obs["cell_type_pred"] == "unknown").sum() > 0  # confident calls of the class "unknown"
    tl.transfer_labels(query, ref, "cell_type", key_added="all")  # no threshold: nothing is rejected
    with pytest.raises(InputError, match="leave_one_out: the reference holds 600 labelled cells; ask for at most 599"):
        tl.transfer_labels(ref, ref, "cell_type", n_neighbors=600, leave_one_out=True, key_added="loo")


def test_copy_of_a_backed_query_is_made_in_memory(tmp_path):
    ref, query = _cells(600, 0), _cells(300, 1)
    query = ad.AnnData(np.zeros((300, 2), np.float32), obs=query.obs, obsm=dict(query.obsm))  # backed needs an X
    query.write_h5ad(tmp_path / "q.h5ad")
    backed = ad.read_h5ad(tmp_path / "q.h5ad", backed="r")
    out = tl.transfer_labels(backed, ref, "cell_type", copy=True)
    assert not out.isbacked and "cell_type_pred" in out.obs and "cell_type_pred" not in backed.obs
    backed.file.close()


def test_a_cell_is_its_own_neighbour_unless_leave_one_out():
    ref = _cells(400, 0)
    ref.obs.loc[ref.obs_names[::7], "cell_type"] = None  # unlabelled cells are not in the index, but are labelled
    tl.transfer_labels(ref, ref, "cell_type", n_neighbors=1, key_added="self")
    labelled = ref.obs["cell_type"].notna().to_numpy()
    np.testing.assert_array_equal(ref.obs["self_pred"].astype(str)[labelled], ref.obs["cell_type"][labelled])
    tl.transfer_labels(ref, ref, "cell_type", n_neighbors=5, leave_one_out=True, key_added="loo")
    x, y = ref.obsm["X_sslcell"][labelled], ref.obs["cell_type"].to_numpy()[labelled]
    rows = np.flatnonzero(labelled)
    for i in (0, 3, 10):  # by hand: the 5 nearest other labelled cells
        d = np.linalg.norm(x - ref.obsm["X_sslcell"][rows[i]], axis=1)
        d[i] = np.inf
        near = np.argsort(d)[:5]
        w = pd.Series(1 / d[near]).groupby(y[near]).sum()
        assert ref.obs["loo_pred"].iloc[rows[i]] == w.idxmax()
    with pytest.raises(ConfigError, match="pass the same AnnData twice"):
        tl.transfer_labels(_cells(10, 3), ref, "cell_type", leave_one_out=True)


def test_hnsw_agrees_with_exact_search_and_a_saved_reference_reloads(tmp_path):
    ref, query = _cells(20_000, 0, dim=16), _cells(2_000, 1, dim=16)
    exact = tl.transfer_labels(query, ref, "cell_type", index="exact", copy=True)
    for kind in ("ivf", "hnsw"):
        approx = tl.transfer_labels(query, ref, "cell_type", index=kind, copy=True)
        agree = (exact.obs["cell_type_pred"].astype(str) == approx.obs["cell_type_pred"].astype(str)).mean()
        assert agree >= 0.97 and approx.uns["sslcell"]["cell_type_pred"]["index"] == kind
    built = tl.build_reference(ref, "cell_type", index="hnsw")
    built.save(tmp_path / "ref")
    with pytest.raises(OverwriteError, match="already holds reference.json, vectors.npy, labels.npy"):
        built.save(tmp_path / "ref")
    loaded = ReferenceIndex.load(built.save(tmp_path / "ref", overwrite=True))
    again = tl.transfer_labels(query, loaded, "cell_type", copy=True)
    np.testing.assert_array_equal(again.obs["cell_type_pred"].astype(str), approx.obs["cell_type_pred"].astype(str))
    np.testing.assert_allclose(again.obs["cell_type_confidence"], approx.obs["cell_type_confidence"], rtol=1e-5)


@pytest.mark.parametrize("damage,message", [
    ("short_labels", r"labels.npy \(10,\) does not match the 300 vectors"),
    ("long_labels", r"labels.npy \(600,\) does not match the 300 vectors"),
    ("no_kind", r"reference.json: missing \['kind'\]"),
    ("bad_metric", r"reference.json: unknown metric 'manhattan'"),
    ("vectors", r"vectors.npy \(300, 3\) does not match reference.json"),
    ("no_index", r"ref: cannot read the reference"),
    # files that fit together but are not this reference's: another reference's index, shuffled labels, an edited
    # record (the model check would pass), each read back silently before
    ("small_index", r"index.faiss holds a IndexHNSWFlat of 100 x 8 vectors.*reference.json says a hnsw index of 300"),
    ("ivf_index", r"index.faiss holds a IndexIVFScalarQuantizer of 300 x 8 .*says a hnsw index"),
    ("cosine_index", r"index.faiss holds .*metric inner product; reference.json says .*metric euclidean"),
    ("shuffled_labels", r"do not match the digest recorded when the reference was saved"),
    ("model_id", r"do not match the digest"),
    ("single_class", r"labels.npy holds a single class \('A'\)"),
    ("same_shape_index", r"do not match the digest"),  # the same cells embedded by another model: kind, size fit
])
def test_a_damaged_saved_reference_is_refused_naming_the_file(tmp_path, damage, message):
    ref = _cells(300, 0)
    path = tl.build_reference(ref, "cell_type", index="hnsw").save(tmp_path / "ref")
    meta = json.loads((path / "reference.json").read_text())
    labels = np.load(path / "labels.npy")
    if damage == "short_labels":
        np.save(path / "labels.npy", labels[:10])
    elif damage == "long_labels":
        np.save(path / "labels.npy", np.concatenate([labels, labels]))
    elif damage in ("no_kind", "bad_metric"):
        meta.pop("kind") if damage == "no_kind" else meta.update(metric="manhattan")
        (path / "reference.json").write_text(json.dumps(meta))
    elif damage == "vectors":
        np.save(path / "vectors.npy", np.zeros((300, 3), np.float32))
    elif damage in ("small_index", "ivf_index", "cosine_index"):
        other = {"small_index": (ref[:100], "hnsw", "euclidean"), "ivf_index": (ref, "ivf", "euclidean"),
                 "cosine_index": (ref, "hnsw", "cosine")}[damage]
        donor = tl.build_reference(other[0], "cell_type", index=other[1], metric=other[2]).save(tmp_path / "other")
        (path / "index.faiss").write_bytes((donor / "index.faiss").read_bytes())
        # the digest refuses it first; a reference saved before the digest is checked by the index's shape
        (path / "reference.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "sha256"}))
    elif damage == "same_shape_index":
        other = ref.copy()
        other.obsm["X_sslcell"] = np.random.default_rng(1).normal(size=other.obsm["X_sslcell"].shape).astype("f4")
        donor = tl.build_reference(other, "cell_type", index="hnsw").save(tmp_path / "other")
        (path / "index.faiss").write_bytes((donor / "index.faiss").read_bytes())
    elif damage == "shuffled_labels":
        np.save(path / "labels.npy", np.random.default_rng(0).permutation(labels))
    elif damage == "model_id":
        (path / "reference.json").write_text(json.dumps({**meta, "model_id": "another"}))
    elif damage == "single_class":  # a reference saved before the digest was recorded
        np.save(path / "labels.npy", np.full_like(labels, "A"))
        (path / "reference.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "sha256"}))
    else:
        (path / "index.faiss").unlink()
    with pytest.raises(FileFormatError, match=message):
        ReferenceIndex.load(path)


def _overlapping(n: int, seed: int, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """40 anisotropic gaussian clusters that overlap heavily, 8 labels, 10% of them random: exact-kNN accuracy ~0.75."""
    g = np.random.default_rng(5)
    centres = g.normal(0, 0.35, (40, dim))
    shapes = [np.linalg.qr(g.normal(size=(dim, dim)))[0] * np.arange(1, dim + 1) ** -0.5 for _ in range(40)]
    rng = np.random.default_rng(seed)
    cluster = rng.integers(40, size=n)
    x = centres[cluster] + np.einsum("nd,nde->ne", rng.normal(size=(n, dim)), np.stack(shapes)[cluster])
    y = cluster % 8
    flip = rng.random(n) < 0.1
    y[flip] = rng.integers(8, size=int(flip.sum()))
    return x.astype(np.float32), np.array(list("ABCDEFGH"))[y]


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_default_ivf_agrees_with_exact_search_on_overlapping_clusters(tmp_path, metric):
    x, y = _overlapping(20_000, 0)
    q, truth = _overlapping(2_000, 1)
    exact = ReferenceIndex(x, y, kind="exact", metric=metric)
    ivf = ReferenceIndex(x, y, kind="ivf", metric=metric)
    assert isinstance(ivf._index.index, faiss.IndexIVFScalarQuantizer)  # 8-bit codes find the candidates
    d_ex, r_ex = exact.search(q, 15)
    d_ivf, r_ivf = ivf.search(q, 15)
    calls_ex = vote(d_ex, exact.codes[r_ex], len(exact.classes)).argmax(axis=1)
    calls_ivf = vote(d_ivf, ivf.codes[r_ivf], len(ivf.classes)).argmax(axis=1)
    assert 0.6 < (exact.classes[calls_ex] == truth).mean() < 0.9  # hard: votes are often close
    assert (r_ivf[:, :, None] == r_ex[:, None, :]).any(axis=2).mean() >= 0.97  # recall@15
    assert (calls_ivf == calls_ex).mean() >= 0.97
    # distances are exact (re-scored from the vectors), sorted, whatever the 8-bit codes said
    xn, qn = (x, q) if metric == "euclidean" else (x / np.linalg.norm(x, axis=1, keepdims=True),
                                                     q / np.linalg.norm(q, axis=1, keepdims=True))
    true = np.linalg.norm(xn[r_ivf] - qn[:, None, :], axis=2)
    np.testing.assert_allclose(d_ivf, true if metric == "euclidean" else true**2 / 2, rtol=1e-4, atol=1e-6)
    assert (np.diff(d_ivf, axis=1) >= 0).all()
    loaded = ReferenceIndex.load(ivf.save(tmp_path / "ivf"))
    assert loaded.kind == "ivf" and isinstance(loaded._index.index, faiss.IndexIVFScalarQuantizer)
    d_again, r_again = loaded.search(q, 15)
    np.testing.assert_array_equal(r_again, r_ivf)
    np.testing.assert_allclose(d_again, d_ivf, rtol=1e-6)


def test_bad_input_is_refused_clearly():
    ref, query = _cells(100, 0), _cells(50, 1)
    with pytest.raises(InputError, match="no obs column 'fate'"):
        tl.transfer_labels(query, ref, "fate")
    nan = query.copy()
    nan.obsm["X_sslcell"][4, 2] = np.nan
    with pytest.raises(InputError, match=r"NaN or inf in 1 rows \(first: row 4\)"):
        tl.transfer_labels(nan, ref, "cell_type")
    with pytest.raises(InputError, match="n_neighbors=500 but the reference holds 100 cells"):
        tl.transfer_labels(query, ref, "cell_type", n_neighbors=500)
    single = ref.copy()
    single.obs["cell_type"] = "A"
    with pytest.raises(InputError, match="single class"):
        tl.transfer_labels(query, single, "cell_type")
    with pytest.raises(InputError, match="query.obsm has no 'X_other'"):
        tl.transfer_labels(query, ref, "cell_type", use_rep="X_other")
    query.obsm["X_wide"] = np.zeros((50, 12), np.float32)
    ref.obsm["X_wide"] = np.zeros((100, 8), np.float32)
    with pytest.raises(InputError, match="12 dimensions, the reference's 8"):
        tl.transfer_labels(query, ref, "cell_type", use_rep="X_wide")
    assert not any(c.endswith("_pred") for c in query.obs)


def test_cli_transfer(tmp_path, capsys):
    ref, query = _cells(300, 0), _cells(100, 1)
    ref.write_h5ad(tmp_path / "ref.h5ad")
    query.write_h5ad(tmp_path / "q.h5ad")
    argv = ["transfer", "--reference", str(tmp_path / "ref.h5ad"), "--query", str(tmp_path / "q.h5ad"),
            "--label-key", "cell_type", "--out", str(tmp_path / "out.h5ad")]
    assert main(argv) == 0
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert (out.obs["cell_type_pred"].astype(str) == out.obs["cell_type"]).mean() > 0.8
    assert main(argv) == 2 and "exists" in capsys.readouterr().err
    query.obs["cell_type_pred"] = "mine"  # the query's own column is not replaced without --overwrite
    query.write_h5ad(tmp_path / "q.h5ad")
    argv[-1] = str(tmp_path / "out2.h5ad")
    assert main(argv) == 2 and "cell_type_pred" in capsys.readouterr().err
    assert not (tmp_path / "out2.h5ad").exists()
    assert main([*argv, "--overwrite"]) == 0
    assert (ad.read_h5ad(tmp_path / "out2.h5ad").obs["cell_type_pred"] != "mine").all()
    ref.obs["cell_type"] = ref.obs["cell_type"].replace({"A": "unknown"})  # an atlas's own "unknown" cluster
    ref.write_h5ad(tmp_path / "ref.h5ad")
    argv[-1] = str(tmp_path / "out3.h5ad")
    assert main([*argv, "--overwrite", "--min-confidence", "0.9"]) == 2
    assert "below --min-confidence get: pass another --unknown-label (e.g. --unknown-label 'low confidence')" in \
        capsys.readouterr().err
    assert main([*argv, "--overwrite", "--min-confidence", "0.9", "--unknown-label", "low confidence"]) == 0
    assert "low confidence" in set(ad.read_h5ad(tmp_path / "out3.h5ad").obs["cell_type_pred"])


def test_query_and_reference_embedded_by_different_models_are_refused(cells, model, tmp_path):
    """Same dimension, different weights: their neighbours would be meaningless, so the transfer is refused."""
    import copy

    import torch

    from sslcell.checkpoint import load, save_model, weights_id

    save_model(model, tmp_path / "m")
    assert weights_id(load(tmp_path / "m")) == weights_id(model)  # however the same weights were loaded
    reference = tl.embed_crops(cells, model)
    tl.transfer_labels(tl.embed_crops(cells, load(tmp_path / "m")), reference, "label")
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    query = tl.embed_crops(cells, other)
    space = r"query.obsm\[.X_sslcell.\] \(embedded by .*\) lies in another space .* than the reference.s"
    with pytest.raises(InputError, match=space):
        tl.transfer_labels(query, reference, "label")
    saved = tl.build_reference(reference, "label").save(tmp_path / "ref")
    with pytest.raises(InputError, match="lies in another space"):
        tl.transfer_labels(query, ReferenceIndex.load(saved), "label")
    assert "label_pred" not in query.obs
    merged = ad.concat([query[:10], query[10:]])  # ad.concat drops uns: the record of the model is gone
    with pytest.warns(SSLCellWarning, match=r"the query's obsm\['X_sslcell'\] has no record of the model .* cannot "
                                            "be checked"):
        tl.transfer_labels(merged, reference, "label")


def test_the_same_weights_with_another_input_contract_embed_into_another_space(cells, model, tmp_path):
    """A hand-edited config.json (channel names swapped) keeps the weights but reads the channels the other way
    round: the embeddings differ, so the model's recorded id does, and a transfer between them is refused. An id
    recorded before the contract was part of it (the weights' alone) is still compared by the weights."""
    from sslcell.checkpoint import load, model_id, save_model, weights_id

    save_model(model, tmp_path / "m")
    config = tmp_path / "m" / "config.json"
    meta = json.loads(config.read_text())
    meta["contract"]["channel_names"] = meta["contract"]["channel_names"][::-1]
    config.write_text(json.dumps(meta))
    edited = load(tmp_path / "m")
    assert weights_id(edited) == weights_id(model) and model_id(edited) != model_id(model)
    reference, query = tl.embed_crops(cells, model), tl.embed_crops(cells, edited)
    assert not np.allclose(reference.obsm["X_sslcell"], query.obsm["X_sslcell"])
    with pytest.raises(InputError, match="lies in another space"):
        tl.transfer_labels(query, reference, "label")
    old_record = tl.embed_crops(cells, model)
    old_record.uns["sslcell"]["X_sslcell"]["model_id"] = weights_id(model)  # as sslcell recorded it before
    tl.transfer_labels(old_record, reference, "label")
    assert "label_pred" in old_record.obs


def test_a_saved_reference_keeps_its_kind_label_column_and_records_its_metric(tmp_path):
    ref, query = _cells(300, 0), _cells(50, 1)
    ref.obs["code"] = pd.factorize(ref.obs["cell_type"])[0]
    loaded = ReferenceIndex.load(tl.build_reference(ref, "code", metric="cosine").save(tmp_path / "ref"))
    assert loaded.label_key == "code"
    with pytest.raises(InputError, match=r"label_key 'cell_type': the reference index holds the labels of "
                                         r"obs\['code'\]"):
        tl.transfer_labels(query, loaded, "cell_type")  # would write codes as cell types
    with pytest.raises(ConfigError, match="index='hnsw': the reference index was built as 'exact'"):
        tl.transfer_labels(query, loaded, "code", index="hnsw")
    tl.transfer_labels(query, loaded, "code", index="exact")
    assert query.uns["sslcell"]["code_pred"]["metric"] == "cosine"


def test_bad_settings_are_refused_before_the_search():
    ref, query = _cells(100, 0), _cells(50, 1)
    for bad in (2.7, "15", None, True):
        with pytest.raises(ConfigError, match=r"n_neighbors must be an integer >= 1; got"):
            tl.transfer_labels(query, ref, "cell_type", n_neighbors=bad)
    for bad in (None, "", 0):
        with pytest.raises(ConfigError, match="unknown_label must be a non-empty string"):
            tl.transfer_labels(query, ref, "cell_type", min_confidence=0.5, unknown_label=bad)
    assert not any(c.endswith("_pred") for c in query.obs)


def test_a_view_of_a_backed_query_is_refused_in_place_before_any_work(tmp_path):
    ref, query = _cells(600, 0), _cells(300, 1)
    query = ad.AnnData(np.zeros((300, 2), np.float32), obs=query.obs, obsm=dict(query.obsm))
    query.write_h5ad(tmp_path / "q.h5ad")
    view = ad.read_h5ad(tmp_path / "q.h5ad", backed="r")[:50]
    with pytest.raises(InputError, match=r"q.h5ad: a view of a backed AnnData \(some of its cells or genes\) "
                                         "cannot take results in place: pass copy=True"):
        tl.transfer_labels(view, ref, "cell_type")
    assert tl.transfer_labels(view, ref, "cell_type", copy=True).n_obs == 50


def test_uniform_votes_ignore_the_neighbours_an_approximate_index_did_not_find():
    """faiss pads a short candidate list with row -1 (distance inf here): no vote, not the last cell's class."""
    dist = np.array([[0.5, 1.0, np.inf, np.inf]])
    codes = np.array([[0, 0, 1, 1]])  # the padding's codes: whatever class the last reference cell has
    np.testing.assert_allclose(vote(dist, codes, 2, "uniform"), [[1.0, 0.0]])
    np.testing.assert_allclose(vote(dist, codes, 2, "distance"), [[1.0, 0.0]])


def test_cli_transfer_writes_a_new_h5ad_that_is_not_an_input(tmp_path, capsys):
    ref, query = _cells(100, 0), _cells(50, 1)
    for name, adata in (("ref", ref), ("query", query)):
        ad.AnnData(np.zeros((adata.n_obs, 2), np.float32), obs=adata.obs, obsm=dict(adata.obsm)).write_h5ad(
            tmp_path / f"{name}.h5ad")
    common = ["transfer", "--reference", str(tmp_path / "ref.h5ad"), "--query", str(tmp_path / "query.h5ad"),
              "--label-key", "cell_type"]
    kept = (tmp_path / "ref.h5ad").read_bytes()
    assert main([*common, "--out", str(tmp_path / "ref.h5ad"), "--overwrite"]) == 2
    assert "is an input file" in capsys.readouterr().err and (tmp_path / "ref.h5ad").read_bytes() == kept
    assert main([*common, "--out", str(tmp_path / "calls.csv")]) == 2
    assert "give a path ending in .h5ad" in capsys.readouterr().err and not (tmp_path / "calls.csv").exists()


def test_cli_warnings_name_the_file_not_the_in_memory_anndata():
    from sslcell import cli
    from sslcell.data.shards import IN_MEMORY

    with cli._naming("query.h5ad"):
        assert cli._named(f"gene alignment: {IN_MEMORY}: 300/500 model genes") == \
            "gene alignment: query.h5ad: 300/500 model genes"
    assert cli._named(IN_MEMORY) == IN_MEMORY  # outside any command's file: as the library says it


def test_predicted_classes_keep_the_reference_columns_order_saved_or_not(tmp_path):
    ref, query = _cells(300, 0), _cells(50, 1)
    order = ["D", "B", "A", "C", "never"]  # an unused category is dropped, the others keep their place
    ref.obs["cell_type"] = pd.Categorical(ref.obs["cell_type"], categories=order)
    tl.transfer_labels(query, ref, "cell_type")
    assert list(query.obs["cell_type_pred"].cat.categories) == ["D", "B", "A", "C"]
    loaded = ReferenceIndex.load(tl.build_reference(ref, "cell_type").save(tmp_path / "ref"))
    again = tl.transfer_labels(query, loaded, "cell_type", key_added="again", copy=True)
    assert list(again.obs["again_pred"].cat.categories) == ["D", "B", "A", "C"]
    assert (again.obs["again_pred"].astype(str) == query.obs["cell_type_pred"].astype(str)).all()
    ref.obs["n"] = pd.factorize(ref.obs["cell_type"].astype(str), sort=True)[0] * 5  # 0, 5, 10, 15: numeric order
    tl.transfer_labels(query, ref, "n")
    assert list(query.obs["n_pred"].cat.categories) == ["0", "5", "10", "15"]


def test_the_digest_tells_labels_apart_that_a_separator_would_merge():
    from sslcell.transfer.reference import _content_digest

    x = np.zeros((4, 2), np.float32)
    assert (_content_digest({"n": 4}, x, np.array(["a\nb", "c", "d", "e"]), None)
            != _content_digest({"n": 4}, x, np.array(["a", "b\nc", "d", "e"]), None))


def test_cli_errors_from_warnings_name_the_file_too():
    from sslcell import cli
    from sslcell.data.shards import IN_MEMORY
    from sslcell.errors import SSLCellWarning

    with pytest.raises(SSLCellWarning, match="gene alignment: query.h5ad: 300/500"):  # -W error raises them
        with cli._naming("query.h5ad"):
            raise SSLCellWarning(f"gene alignment: {IN_MEMORY}: 300/500 model genes")
