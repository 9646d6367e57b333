"""tl on crops: the one constructor (embed_crops), tl.embed with crops=, refusals of arguments that do not apply,
re-embedding drops stale UMAPs, and tl.evaluate on a crops AnnData (a clear refusal, or the raw-pixel baseline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sslcell import pl, tl
from sslcell.data.images import CellImages
from sslcell.errors import InputError, OverwriteError
from sslcell.evaluate.baselines import pixel_pca_baseline
from sslcell.methods import build_method
from tests.conftest import tiny_image_recipe
from tests.tl.conftest import NAMES


def test_embed_crops_is_tl_embed_with_crops(cells, model):
    adata = tl.embed_crops(cells, model, batch_size=7)
    emb = adata.obsm["X_sslcell"]
    assert adata.n_obs == len(cells) and emb.shape == (len(cells), model.embed_dim) and emb.dtype == np.float32
    assert list(adata.obs["label"]) == list(cells.obs["label"])
    with torch.no_grad():
        direct = model.embed(torch.from_numpy(np.asarray(cells.images))).numpy()
    np.testing.assert_allclose(emb, direct, rtol=1e-4, atol=1e-5)
    again = cells.to_anndata()
    assert tl.embed(again, model, crops=cells) is None
    np.testing.assert_allclose(again.obsm["X_sslcell"], emb, rtol=1e-5, atol=1e-6)
    assert adata.uns["sslcell"]["X_sslcell"]["channel_names"] == NAMES


def test_channels_by_name_and_copy(cells, model):
    swapped = CellImages.from_array(np.asarray(cells.images)[:, ::-1].copy(), channel_names=NAMES[::-1],
                                    obs=cells.obs)
    reference = tl.embed_crops(cells, model).obsm["X_sslcell"]
    np.testing.assert_allclose(tl.embed_crops(swapped, model).obsm["X_sslcell"], reference, rtol=1e-5, atol=1e-6)
    adata = cells.to_anndata()
    out = tl.embed(adata, model, crops=cells, key_added="X_copy", copy=True)
    assert "X_copy" in out.obsm and "X_copy" not in adata.obsm


def test_arguments_that_do_not_apply_are_refused(cells, model, small_counts):
    adata = cells.to_anndata()
    with pytest.raises(InputError, match="pass crops=cells"):
        tl.embed(adata, model)
    with pytest.raises(InputError, match="layer: not applicable"):
        tl.embed(adata, model, crops=cells, layer="counts")
    with pytest.raises(InputError, match="counts_are_log_normalized: not applicable"):
        tl.embed(adata, model, crops=cells, counts_are_log_normalized=True)
    with pytest.raises(InputError, match=r"crops \(40 cells.*do not match the rows of adata \(80\)"):
        tl.embed(adata, model, crops=cells[np.arange(40)])
    with pytest.raises(InputError, match="embed_crops reads CellImages"):
        tl.embed_crops(adata, model)
    with pytest.warns(DeprecationWarning, match="embed_crops"), pytest.raises(InputError, match="copy"):
        tl.embed(cells, model, copy=True)
    assert "X_sslcell" not in adata.obsm  # nothing was written by a refused call


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_a_batch_size_below_one_is_refused_not_left_unfilled(cells, model, batch_size):
    """range(0, n, -1) is empty: without the check the preallocated output came back uninitialised."""
    adata = cells.to_anndata()
    with pytest.raises(InputError, match="batch_size: must be a whole number >= 1"):
        tl.embed(adata, model, crops=cells, batch_size=batch_size)
    assert "X_sslcell" not in adata.obsm


def test_deprecated_crops_first_call_still_works(cells, model):
    with pytest.warns(DeprecationWarning, match="embed_crops"):
        adata = tl.embed(cells, model)
    np.testing.assert_allclose(adata.obsm["X_sslcell"], tl.embed_crops(cells, model).obsm["X_sslcell"], atol=1e-6)


def test_overwrite_replaces_the_embedding_and_drops_its_umap(cells, model):
    adata = tl.embed_crops(cells, model)
    pl.umap(adata, "label")
    assert "X_sslcell_umap" in adata.obsm
    with pytest.raises(OverwriteError, match="X_sslcell"):
        tl.embed(adata, model, crops=cells)
    torch.manual_seed(1)
    other = build_method(tiny_image_recipe("simclr"), model.inputs.contract).eval()
    tl.embed(adata, other, crops=cells, overwrite=True)
    assert "X_sslcell_umap" not in adata.obsm and "X_sslcell_neighbors" not in adata.uns
    assert not any(key.startswith("X_sslcell_neighbors") for key in adata.obsp)


def test_evaluate_on_crops_refuses_clearly_or_uses_the_pixel_baseline(cells, model):
    adata = tl.embed_crops(cells, model)
    with pytest.raises(InputError, match="made from crops.*crops=cells"):
        tl.evaluate(adata, "label")
    with pytest.raises(InputError, match="'pca' baseline needs expression counts"):
        tl.evaluate(adata, "label", baselines=["pca"])
    with pytest.raises(InputError, match="'pixel_pca' baseline needs the crops"):
        tl.evaluate(adata, "label", baselines=["pixel_pca"])
    alone = tl.evaluate(adata, "label", baselines=(), n_splits=3, seeds=(0,))
    assert set(alone.to_dataframe()["representation"]) == {"X_sslcell"}
    report = tl.evaluate(adata, "label", crops=cells, n_splits=3, seeds=(0,))
    table = report.to_dataframe().set_index(["representation", "protocol"])
    assert set(table.index.get_level_values(0)) == {"X_sslcell", "pixel_pca"}
    assert table.loc[("pixel_pca", "logistic_cv"), "accuracy"] > 0.7  # brightness differs by class; chance 0.5
    np.testing.assert_array_equal(table.loc[("X_sslcell", "knn_cv")].to_numpy(),
                                  alone.to_dataframe().set_index(["representation", "protocol"])
                                  .loc[("X_sslcell", "knn_cv")].to_numpy())


def test_the_pixel_baseline_reads_the_channels_the_embedding_was_made_from(cells, model):
    """Crops with a third channel (the stain the labels came from): the baseline read it, the model did not."""
    codes = cells.obs["label"].cat.codes.to_numpy().astype(int)
    leak = np.broadcast_to((codes * 200)[:, None, None, None], (len(cells), 1, 16, 16))
    three = CellImages.from_array(np.concatenate([np.asarray(cells.images), leak.astype(np.uint8)], axis=1),
                                  channel_names=[*NAMES, "stain"], obs=cells.obs)
    adata = tl.embed_crops(three, model)
    table = tl.evaluate(adata, "label", crops=three, n_splits=3, seeds=(0,)).to_dataframe()
    two = tl.evaluate(tl.embed_crops(cells, model), "label", crops=cells, n_splits=3, seeds=(0,)).to_dataframe()
    assert table.equals(two)  # the same scores: the stain is left out of the baseline
    tl.embed(adata, model, crops=three.select_channels(NAMES[::-1]), channels=NAMES, key_added="X_other")
    adata.uns["sslcell"]["X_other"]["crop_channels"] = ["dna", "stain"]
    with pytest.raises(InputError, match="made from different channels"):
        tl.evaluate(adata, "label", use_rep=["X_sslcell", "X_other"], crops=three, n_splits=3, seeds=(0,))
    with pytest.raises(InputError, match="have no channel 'stain'"):
        tl.evaluate(adata, "label", use_rep="X_other", crops=three.select_channels(NAMES), n_splits=3, seeds=(0,))


def test_the_pixel_baseline_reads_the_positions_unnamed_crops_were_embedded_from(cells, model):
    """Unnamed crops embedded by position take the model's names: the baseline looked those names up in the crops
    (refused, or for an unnamed model other positions)."""
    pixels = np.asarray(cells.images)
    unnamed = CellImages.from_array(np.concatenate([pixels[:, :1] * 0, pixels], axis=1), obs=cells.obs)
    adata = unnamed.to_anndata()
    tl.embed(adata, model, crops=unnamed, channels=[1, 2])
    assert adata.uns["sslcell"]["X_sslcell"]["crop_channels"] == ["channel_1", "channel_2"]
    report = tl.evaluate(adata, "label", crops=unnamed, n_splits=3, seeds=(0,)).to_dataframe()
    named = tl.evaluate(tl.embed_crops(cells, model), "label", crops=cells, n_splits=3, seeds=(0,)).to_dataframe()
    assert report.equals(named)  # the same pixels, the same scores


def test_other_crops_with_the_same_ids_are_refused(cells, model):
    """Crops without ids are numbered 0..N-1: another file of as many cells passed as the crops of adata's rows."""
    adata = tl.embed_crops(cells, model)
    other = CellImages.from_array(np.asarray(cells.images)[::-1].copy(), channel_names=NAMES, obs=cells.obs)
    with pytest.raises(InputError, match=r"not the crops adata was made from \(array\): cell '0', channel 'dna'"):
        tl.evaluate(adata, "label", crops=other)
    with pytest.raises(InputError, match="not the crops adata was made from"):
        tl.embed(adata, model, crops=other, key_added="X_other")
    assert "X_other" not in adata.obsm
    subset = adata[adata.obs_names[10:30]]  # a subset keeps the cells of the sample it still holds
    assert tl.evaluate(subset, "label", crops=cells[10:30], n_splits=2, seeds=(0,), n_neighbors=3,
                       baselines=()).rows  # the crops pass the check


def test_pixel_pca_baseline_is_the_pca_of_standardised_pixels(cells):
    x = pixel_pca_baseline(cells, n_comps=5, seed=0)
    assert x.shape == (len(cells), 5) and x.dtype == np.float32
    pixels = np.asarray(cells.images).reshape(len(cells), -1).astype(np.float64)
    z = (pixels - pixels.mean(0)) / np.where(pixels.std(0) > 0, pixels.std(0), 1.0)
    top = np.linalg.svd(z - z.mean(0), full_matrices=False)[1][:5] ** 2 / (len(z) - 1)
    np.testing.assert_allclose(x.var(0, ddof=1), top, rtol=1e-3)
    with pytest.raises(InputError, match="n_comps=500"):
        pixel_pca_baseline(cells, n_comps=500)
