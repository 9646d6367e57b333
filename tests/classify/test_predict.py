"""predict: predictions and scores in obs / obsm, metrics against hand computations, channel alignment, reports."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from sslcell.classify import FinetuneConfig, finetune, predict
from sslcell.classify.predict import write_report
from sslcell.config import RecipeConfig
from sslcell.data.images import CellImages
from sslcell.errors import ChannelMismatchError, InputError
from sslcell.methods import build_method

S = 16
NAMES = ["dna", "actin"]
PNG = b"\x89PNG\r\n\x1a\n"


def crops_of(y: np.ndarray, seed: int, size: int = S) -> np.ndarray:
    """(n, 2, size, size) uint8: a gaussian cell; class 1 is bright in "actin", class 0 dim; noisy."""
    rng = np.random.default_rng(seed)
    n = len(y)
    yy, xx = np.mgrid[:size, :size]
    centre = rng.uniform(5, size - 5, size=(n, 2))
    blob = np.exp(-((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2) / (2 * 2.5**2))
    x = np.empty((n, 2, size, size))
    x[:, 0] = 20 + 150 * blob
    x[:, 1] = 20 + np.where(y == 1, 110, 60)[:, None, None] * blob  # overlapping enough for a few errors
    x += rng.normal(0, 15, x.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def data():
    y = np.random.default_rng(1).permutation(np.arange(120) % 2)
    return crops_of(y, 0), np.array(["neg", "pos"])[y]


@pytest.fixture(scope="module")
def classifier(data):
    """A linear probe on an untrained tiny ResNet; classes ["neg", "pos", "rare"] ("rare" has no cells)."""
    x, labels = data
    stats = CellImages.from_array(x, channel_names=NAMES).channel_stats()
    contract = {"modality": "image", "channel_names": NAMES, "channel_mean": stats["mean"],
                "channel_std": stats["std"], "image_size": [S, S], "dtype": "uint8"}
    recipe = RecipeConfig.from_dict({
        "modality": "image",
        "method": {"name": "simclr", "projection_dim": 16, "projection_hidden": 32},
        "encoder": {"name": "resnet_tiny", "options": {"base_width": 4}},
        "train": {"accelerator": "cpu"},
    })
    torch.manual_seed(0)
    model = build_method(recipe, contract)
    cells = CellImages.from_array(x[:60], channel_names=NAMES,
                                  labels=pd.Categorical(labels[:60], categories=["neg", "pos", "rare"]))
    return finetune(model, cells, "label", FinetuneConfig(head="linear", C=0.05))


@pytest.fixture(scope="module")
def cells(data) -> CellImages:
    """Held-out crops with obs: the true label (some missing) and a metadata column."""
    x, labels = data
    truth = labels[60:].astype(object)
    truth[[3, 17, 40]] = None
    obs = pd.DataFrame({"truth": truth, "plate": np.arange(60) % 3}, index=[f"cell{i}" for i in range(60)])
    return CellImages.from_array(x[60:], channel_names=NAMES, obs=obs)


def test_predictions_and_scores(classifier, cells):
    adata, report = predict(classifier, cells, key_added="ct")
    assert report is None
    assert list(adata.obs_names) == list(cells.obs.index)
    assert list(adata.obs["plate"]) == list(cells.obs["plate"])
    pred = adata.obs["ct_pred"]
    assert isinstance(pred.dtype, pd.CategoricalDtype) and list(pred.cat.categories) == ["neg", "pos", "rare"]
    scores = adata.obsm["ct_scores"]
    assert scores.shape == (60, 3) and scores.dtype == np.float32
    columns = adata.obs[["ct_score_neg", "ct_score_pos", "ct_score_rare"]].to_numpy()
    np.testing.assert_array_equal(columns, scores)
    np.testing.assert_allclose(scores.sum(1), 1.0, atol=1e-5)
    reference = classifier.predict_proba(torch.from_numpy(np.asarray(cells.images))).numpy()
    np.testing.assert_allclose(scores, reference, rtol=1e-5, atol=1e-6)
    assert list(pred.astype(str)) == list(np.array(["neg", "pos", "rare"])[reference.argmax(1)])
    assert set(pred) == {"neg", "pos"}  # both classes predicted; the class without training cells never
    assert adata.uns["sslcell"]["ct_classes"] == ["neg", "pos", "rare"]
    again, _ = predict(classifier, cells, key_added="ct", batch_size=7)  # batches of 7, last one short
    np.testing.assert_allclose(again.obsm["ct_scores"], scores, rtol=1e-5, atol=1e-6)


def test_tta_scores_are_the_classifiers_and_are_recorded(classifier, cells):
    with pytest.warns(UserWarning, match="tta: its linear head"):  # a probe's caveat (tl.predict's)
        adata, _ = predict(classifier, cells, tta=True, batch_size=25)
    reference = classifier.predict_proba(torch.from_numpy(np.asarray(cells.images)), tta=True).numpy()
    np.testing.assert_allclose(adata.obsm["sslcell_scores"], reference, rtol=1e-5, atol=1e-6)
    assert adata.uns["sslcell"]["sslcell_tta"] is True
    plain, _ = predict(classifier, cells)
    assert plain.uns["sslcell"]["sslcell_tta"] is False
    assert not np.allclose(plain.obsm["sslcell_scores"], reference, atol=1e-4)


def test_report_matches_a_hand_computation(classifier, cells):
    adata, report = predict(classifier, cells, label_key="truth")
    truth, pred = adata.obs["truth"], adata.obs["sslcell_pred"].astype(str)
    labelled = truth.notna().to_numpy()
    t, p = truth[labelled].astype(str).to_numpy(), pred[labelled].to_numpy()
    assert report.n == 57 == labelled.sum()
    assert report.classes == ["neg", "pos", "rare"]
    assert report.accuracy == pytest.approx(np.mean(t == p))
    assert 0.5 < report.accuracy < 1.0  # a real classifier that makes some mistakes: the check has teeth
    confusion = np.array([[np.sum((t == a) & (p == b)) for b in report.classes] for a in report.classes])
    np.testing.assert_array_equal(report.confusion, confusion)
    recalls = [np.mean(p[t == c] == c) for c in ("neg", "pos")]
    assert report.balanced_accuracy == pytest.approx(np.mean(recalls))


def test_label_refusals(classifier, cells):
    with pytest.raises(InputError, match=r"no obs column 'label'.*'truth'"):
        predict(classifier, cells, label_key="label")
    obs = cells.obs.assign(truth=np.where(np.arange(60) == 5, "alien", cells.obs["truth"].astype(object)))
    strange = CellImages.from_array(np.asarray(cells.images), channel_names=NAMES, obs=obs)
    with pytest.raises(InputError, match=r"\['alien'\].*not classes of the classifier"):
        predict(classifier, strange, label_key="truth")


def test_channels_are_selected_by_name(classifier, cells):
    x = np.asarray(cells.images)
    rng = np.random.default_rng(3)
    extra = np.stack([rng.integers(0, 255, x[:, 0].shape, dtype=np.uint8), x[:, 1], x[:, 0]], axis=1)
    wide = CellImages.from_array(extra, channel_names=["brightfield", "actin", "dna"], obs=cells.obs)
    expected, _ = predict(classifier, cells)
    by_name, _ = predict(classifier, wide)
    np.testing.assert_allclose(by_name.obsm["sslcell_scores"], expected.obsm["sslcell_scores"], rtol=1e-6)
    explicit, _ = predict(classifier, wide, channels=[2, 1])
    np.testing.assert_allclose(explicit.obsm["sslcell_scores"], expected.obsm["sslcell_scores"], rtol=1e-6)
    with pytest.raises(ChannelMismatchError, match=r"\['actin', 'dna'\] do not match the model's \['dna', 'actin'\]"):
        predict(classifier, wide, channels=["actin", "dna"])


def test_mismatched_channels_and_sizes_are_refused(classifier, cells):
    x = np.asarray(cells.images)
    renamed = CellImages.from_array(x, channel_names=["dapi", "actin"])
    with pytest.raises(ChannelMismatchError, match=r"\['dapi', 'actin'\].*\['dna', 'actin'\]"):
        predict(classifier, renamed)
    one = CellImages.from_array(x[:, 1:], channel_names=["actin"])
    with pytest.raises(ChannelMismatchError):
        predict(classifier, one)
    big = CellImages.from_array(crops_of(np.zeros(4, dtype=int), 9, size=20), channel_names=NAMES)
    with pytest.raises(InputError, match=r"\(20, 20\) pixels.*\(16, 16\)"):
        predict(classifier, big)
    wide_dtype = CellImages.from_array(x.astype(np.uint16) * 257, channel_names=NAMES)
    with pytest.raises(InputError, match="uint16.*uint8"):
        predict(classifier, wide_dtype)


def test_write_report(classifier, cells, tmp_path):
    adata, report = predict(classifier, cells, label_key="truth")
    files = write_report(report, adata, "truth", tmp_path / "out")
    names = ["metrics.json", "metrics.md", "confusion_matrix.png", "roc_curves.png"]
    assert [f.name for f in files] == names
    assert all((tmp_path / "out" / n).is_file() for n in names)
    for png in ("confusion_matrix.png", "roc_curves.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == PNG
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["n"] == 57 and metrics["accuracy"] == pytest.approx(report.accuracy)
    assert metrics["confusion"] == report.confusion.tolist()
    assert f"| accuracy | {report.accuracy:.3f} |" in (tmp_path / "out" / "metrics.md").read_text()


def test_write_report_with_one_true_class_skips_the_roc_plot(classifier, cells, tmp_path):
    obs = cells.obs.assign(truth="neg")
    one = CellImages.from_array(np.asarray(cells.images), channel_names=NAMES, obs=obs)
    adata, report = predict(classifier, one, label_key="truth")
    files = write_report(report, adata, "truth", tmp_path)
    assert [f.name for f in files] == ["metrics.json", "metrics.md", "confusion_matrix.png"]
    assert not (tmp_path / "roc_curves.png").exists()
