"""tl.predict / tl.score: the scanpy layout (obs / obsm / uns under key_added), both modalities, refusals."""

from __future__ import annotations

import warnings
from dataclasses import replace

import anndata as ad
import numpy as np
import pytest
import torch

import sslcell
from sslcell import tl
from sslcell.classify import FinetuneConfig, finetune
from sslcell.errors import InputError, OverwriteError
from sslcell.methods import build_method
from tests.conftest import tiny_image_recipe, tiny_recipe
from tests.tl.conftest import NAMES, S

LINEAR = FinetuneConfig(head="linear", progress_bar=False, accelerator="cpu")


def test_image_classifier_layout_and_scores(cells, model):
    clf = finetune(cells, model, "label", LINEAR)
    adata = cells.to_anndata()
    assert tl.predict(adata, clf, crops=cells, label_key="label") is None
    proba = adata.obsm["sslcell_pred_proba"]
    assert proba.shape == (len(cells), 2)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    classes = adata.uns["sslcell"]["sslcell_pred"]["classes"]
    assert classes == ["neg", "pos"] and list(adata.obs["sslcell_pred"].cat.categories) == classes
    np.testing.assert_array_equal(adata.obs["sslcell_pred"].astype(str), np.asarray(classes)[proba.argmax(1)])
    np.testing.assert_allclose(adata.obs["sslcell_pred_confidence"], proba.max(1))
    report = tl.score(adata, "label")
    truth, pred = adata.obs["label"].astype(str).to_numpy(), adata.obs["sslcell_pred"].astype(str).to_numpy()
    assert report.accuracy == pytest.approx(np.mean(truth == pred))
    assert adata.uns["sslcell"]["sslcell_pred"]["metrics"]["accuracy"] == pytest.approx(report.accuracy)
    with pytest.raises(OverwriteError, match="sslcell_pred"):
        tl.predict(adata, clf, crops=cells)
    with pytest.warns(UserWarning, match="tta: its linear head was fitted on each crop in one orientation"):
        tta = tl.predict(adata, clf, crops=cells, tta=True, key_added="tta", copy=True)
    assert "tta" in tta.obs and "tta" not in adata.obs and tta.uns["sslcell"]["tta"]["tta"] is True


def test_tta_warns_only_for_classifiers_not_trained_on_the_orientations(cells, model):
    """Fine-tuning draws flips and 90-degree turns by default: TTA is what the classifier trained on, no warning;
    without flips, or without turns, the warning says so."""
    full = FinetuneConfig(head="full", epochs=1, batch_size=16, progress_bar=False, accelerator="cpu")
    adata = cells.to_anndata()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tl.predict(adata, finetune(cells, model, "label", full), crops=cells, tta=True, key_added="ok")
    for augment in ({"hflip": 0.0, "vflip": 0.0}, {"rot90": False}):
        clf = finetune(cells, model, "label", replace(full, augment=augment))
        with pytest.warns(UserWarning, match="tta: it was fine-tuned without flips and 90-degree turns"):
            tl.predict(adata, clf, crops=cells, tta=True, key_added="no_turns", overwrite=True)


def test_image_refusals(cells, model):
    clf = finetune(cells, model, "label", LINEAR)
    adata = cells.to_anndata()
    with pytest.raises(InputError, match="pass crops=cells"):
        tl.predict(adata, clf)
    with pytest.raises(InputError, match="layer: not applicable"):
        tl.predict(adata, clf, crops=cells, layer="x")
    with pytest.raises(InputError, match="no obs column 'truth'"):
        tl.predict(adata, clf, crops=cells, label_key="truth")
    with pytest.raises(InputError, match="holds no predictions under 'sslcell_pred'"):
        tl.score(adata, "label")
    adata.obs["alien"] = np.where(np.arange(adata.n_obs) == 3, "alien", adata.obs["label"].astype(str))
    with pytest.raises(InputError, match=r"\['alien'\] in obs\['alien'\] are not classes of the classifier"):
        tl.predict(adata, clf, crops=cells, label_key="alien")
    adata.obs["sslcell_pred"] = adata.obs["label"]  # true labels under the key predictions go to
    with pytest.raises(InputError, match="would replace the true labels"):
        tl.predict(adata, clf, crops=cells, label_key="sslcell_pred", overwrite=True)
    assert (adata.obs["sslcell_pred"] == adata.obs["label"]).all()
    del adata.obs["sslcell_pred"]
    assert "sslcell_pred" not in adata.obs and not adata.obsm and "sslcell" not in adata.uns  # nothing half-written


def test_expression_linear_head_end_to_end(small_counts, tmp_path):
    model = sslcell.pretrain(tiny_recipe("mae", train={"max_epochs": 2}), small_counts, tmp_path / "run")
    train, test = small_counts[:300].copy(), small_counts[300:].copy()
    clf = finetune(train, model, "cell_type", LINEAR)
    tl.predict(test, clf, label_key="cell_type")
    report = tl.score(test, "cell_type")
    truth, pred = test.obs["cell_type"].astype(str).to_numpy(), test.obs["sslcell_pred"].astype(str).to_numpy()
    assert report.n == test.n_obs and report.accuracy == pytest.approx(np.mean(truth == pred))
    assert report.balanced_accuracy > 0.35  # a tiny 2-epoch encoder on overlapping synthetic types; chance 0.25
    # the probabilities are the linear head's on the standardised embeddings of tl.embed
    tl.embed(test, model)
    with torch.no_grad():
        z = (torch.from_numpy(test.obsm["X_sslcell"]) - clf.feature_mean) / clf.feature_std
        expected = torch.softmax(clf.head(z), dim=1).numpy()
    np.testing.assert_allclose(test.obsm["sslcell_pred_proba"], expected, atol=1e-4)
    with pytest.raises(InputError, match="tta: not applicable"):
        tl.predict(test, clf, tta=True, key_added="again")
    test.write_h5ad(tmp_path / "test.h5ad")  # backed: the whole file read in place, a view only as a copy
    backed = ad.read_h5ad(tmp_path / "test.h5ad", backed="r")
    whole = tl.predict(backed, clf, key_added="again", copy=True)
    np.testing.assert_allclose(whole.obsm["again_proba"], test.obsm["sslcell_pred_proba"], atol=1e-5)
    with pytest.raises(InputError, match=r"a view of a backed AnnData \(some of its cells or genes\)"):
        tl.predict(backed[5:10], clf, key_added="again")
    part = tl.predict(backed[5:10], clf, key_added="again", copy=True)
    np.testing.assert_allclose(part.obsm["again_proba"], test.obsm["sslcell_pred_proba"][5:10], atol=1e-5)
    with pytest.raises(InputError, match="crops, channels: not applicable|crops: not applicable"):
        tl.predict(test, clf, crops=object(), key_added="again")
    torch.manual_seed(0)
    image_model = build_method(tiny_image_recipe("simclr"), {
        "modality": "image", "channel_names": NAMES, "channel_mean": [0.0, 0.0], "channel_std": [1.0, 1.0],
        "image_size": [S, S], "dtype": "uint8"})
    with pytest.raises(InputError, match="reads image crops"):
        finetune(train, image_model, "cell_type", LINEAR)


def test_expression_predict_records_missing_genes_and_refuses_too_many(small_counts, tmp_path):
    model = sslcell.pretrain(tiny_recipe("mae", train={"max_epochs": 1}), small_counts, tmp_path / "run")
    clf = finetune(small_counts, model, "cell_type", LINEAR)
    genes = list(clf.inputs.genes)
    some_missing = small_counts[:50, [g for g in small_counts.var_names if g not in genes[:10]]].copy()
    tl.predict(some_missing, clf)
    info = some_missing.uns["sslcell"]["sslcell_pred"]
    assert info["n_missing_genes"] == 10 and info["n_model_genes"] == len(genes)
    assert set(info["missing_genes_examples"]) <= set(genes[:10])
    most_missing = small_counts[:50, [g for g in small_counts.var_names if g not in genes[:80]]].copy()
    with pytest.raises(InputError, match="missing"):
        tl.predict(most_missing, clf)
    tl.predict(most_missing, clf, max_missing_genes=0.9)
    assert most_missing.uns["sslcell"]["sslcell_pred"]["n_missing_genes"] == 80
    # fine-tuning has the same limit: a classifier is not trained on data it could not then be applied to
    with pytest.raises(InputError, match=r"max_missing_genes=0\.5"):
        finetune(most_missing, model, "cell_type", LINEAR)
    assert finetune(most_missing, model, "cell_type", LINEAR, max_missing_genes=0.9).classes == clf.classes


def test_integer_classes_stored_as_floats_name_the_same_classes_everywhere(small_counts, tmp_path):
    """pandas stores integer labels beside NaN as floats: fine-tuning named the classes "0", "1", while scoring
    and label transfer read "0.0", "1.0" (scoring then refused every label as unknown)."""
    model = sslcell.pretrain(tiny_recipe("mae", train={"max_epochs": 1}), small_counts, tmp_path / "run")
    adata = small_counts.copy()
    codes = adata.obs["cell_type"].cat.codes.astype(float).to_numpy()
    codes[::7] = np.nan
    adata.obs["code"] = codes
    clf = finetune(adata, model, "code", LINEAR)
    assert clf.classes == ["0", "1", "2", "3"]
    tl.predict(adata, clf, label_key="code")
    assert tl.score(adata, "code").n == int((~np.isnan(codes)).sum())
    tl.embed(adata, model)
    query = adata.copy()
    tl.transfer_labels(query, adata, "code", key_added="transferred")
    assert set(query.obs["transferred_pred"].astype(str)) <= {"0", "1", "2", "3", "unknown"}


def test_log_normalised_cells_train_and_predict_as_their_raw_counts(small_counts, tmp_path):
    """scanpy's normalize_total + log1p over all genes, declared: the same classifier and probabilities as from the
    raw counts (finetune and tl.predict read them as tl.embed does)."""
    import scanpy as sc

    model = sslcell.pretrain(tiny_recipe("mae", train={"max_epochs": 1}), small_counts, tmp_path / "run")
    logged = small_counts.copy()
    sc.pp.normalize_total(logged, target_sum=1e6)
    sc.pp.log1p(logged)
    raw_clf = finetune(small_counts, model, "cell_type", LINEAR)
    log_clf = finetune(logged, model, "cell_type", LINEAR, counts_are_log_normalized=True)
    np.testing.assert_allclose(log_clf.head.weight.detach().numpy(), raw_clf.head.weight.detach().numpy(),
                               atol=1e-3)
    raw, log = small_counts.copy(), logged.copy()
    tl.predict(raw, raw_clf)
    tl.predict(log, raw_clf, counts_are_log_normalized=True)
    np.testing.assert_allclose(log.obsm["sslcell_pred_proba"], raw.obsm["sslcell_pred_proba"], atol=1e-4)
    with pytest.raises(InputError, match="non-integer"):  # undeclared, log values are refused as counts
        tl.predict(logged.copy(), raw_clf)


def test_raw_counts_for_a_model_of_log_normalised_values_train_as_tl_embed_reads_them(small_counts, tmp_path):
    """finetune(raw, counts_are_log_normalized=False) on such a model read the raw counts as if they were log
    values, while tl.predict normalised them: the head was fitted on one scale and applied to another."""
    import scanpy as sc

    logged = small_counts.copy()
    sc.pp.normalize_total(logged, target_sum=1e4)
    sc.pp.log1p(logged)
    recipe = tiny_recipe("mae", train={"max_epochs": 1}, data={"counts_are_log_normalized": True})
    model = sslcell.pretrain(recipe, logged, tmp_path / "run")
    clf = finetune(small_counts, model, "cell_type", LINEAR, counts_are_log_normalized=False)
    embedded = small_counts.copy()
    tl.embed(embedded, model, counts_are_log_normalized=False)
    np.testing.assert_allclose(clf.feature_mean.numpy(), embedded.obsm["X_sslcell"].mean(0), atol=1e-4)
