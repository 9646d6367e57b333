import warnings

import anndata as ad
import numpy as np
import pytest
import scanpy as sc

import sslcell
from sslcell.errors import GeneMismatchError, InputError, OverwriteError
from tests.conftest import tiny_recipe


@pytest.fixture(scope="module")
def trained(small_counts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("tl") / "run"
    return sslcell.pretrain(tiny_recipe("mae", train={"max_epochs": 3}), small_counts_file, out), out


def test_embed_writes_obsm_and_scanpy_runs(trained, small_counts):
    model, _ = trained
    adata = small_counts.copy()
    assert sslcell.tl.embed(adata, model) is None
    emb = adata.obsm["X_sslcell"]
    assert emb.shape == (adata.n_obs, model.embed_dim) and emb.dtype == np.float32
    assert np.isfinite(emb).all()
    assert adata.uns["sslcell"]["X_sslcell"]["n_missing_genes"] == 0
    sc.pp.neighbors(adata, use_rep="X_sslcell")
    sc.tl.umap(adata)
    assert adata.obsm["X_umap"].shape == (adata.n_obs, 2)


def test_existing_key_is_kept_unless_overwrite(trained, small_counts):
    model, _ = trained
    adata = small_counts.copy()
    adata.obsm["X_sslcell"] = np.zeros((adata.n_obs, 2))
    with pytest.raises(OverwriteError, match="X_sslcell"):
        sslcell.tl.embed(adata, model)
    assert adata.obsm["X_sslcell"].shape[1] == 2
    sslcell.tl.embed(adata, model, overwrite=True)
    assert adata.obsm["X_sslcell"].shape[1] == model.embed_dim
    new = sslcell.tl.embed(adata, model, key_added="X_other", copy=True)
    assert "X_other" in new.obsm and "X_other" not in adata.obsm
    adata.uns["sslcell"] = "a note of the user's"  # not sslcell's records: refused before any work, nothing written
    with pytest.raises(InputError, match=r"adata.uns\['sslcell'\] holds a str, not sslcell's records"):
        sslcell.tl.embed(adata, model, key_added="X_third")
    assert "X_third" not in adata.obsm and adata.uns["sslcell"] == "a note of the user's"


def test_backed_and_reordered_genes_give_the_same_embedding(trained, small_counts, small_counts_file, tmp_path):
    model, run = trained
    reference = small_counts.copy()
    sslcell.tl.embed(reference, run)  # from the run directory
    backed = ad.read_h5ad(small_counts_file, backed="r")
    sslcell.tl.embed(backed, model, batch_size=37)
    np.testing.assert_allclose(backed.obsm["X_sslcell"], reference.obsm["X_sslcell"], atol=1e-5)
    shuffled = small_counts[:, np.random.default_rng(0).permutation(small_counts.n_vars)].copy()
    sslcell.tl.embed(shuffled, model)
    np.testing.assert_allclose(shuffled.obsm["X_sslcell"], reference.obsm["X_sslcell"], atol=1e-5)
    copied = sslcell.tl.embed(ad.read_h5ad(small_counts_file, backed="r"), model, copy=True)
    assert not copied.isbacked
    np.testing.assert_allclose(copied.obsm["X_sslcell"], reference.obsm["X_sslcell"], atol=1e-5)
    bad = small_counts.copy()
    bad.X = bad.X.astype(np.float32)
    bad.X[3, 4] = np.nan
    bad.write_h5ad(tmp_path / "nan.h5ad")
    with pytest.raises(InputError, match=r"NaN or inf values in .*nan\.h5ad \(X\)"):  # the file, not <AnnData>
        sslcell.tl.embed(ad.read_h5ad(tmp_path / "nan.h5ad", backed="r"), model, copy=True)


def test_a_backed_anndata_is_read_with_the_gene_names_it_shows(trained, small_counts, small_counts_file, tmp_path):
    """Genes renamed in memory (ids to symbols) were aligned by the file's names: wrongly zero-filled genes."""
    model, _ = trained
    reference = small_counts.copy()
    sslcell.tl.embed(reference, model)
    ids = small_counts.copy()
    ids.var_names = [f"ENSG{i:05d}" for i in range(ids.n_vars)]
    ids.write_h5ad(tmp_path / "ids.h5ad")
    backed = ad.read_h5ad(tmp_path / "ids.h5ad", backed="r")
    backed.var_names = small_counts.var_names  # the symbols the model knows
    sslcell.tl.embed(backed, model)
    np.testing.assert_allclose(backed.obsm["X_sslcell"], reference.obsm["X_sslcell"], atol=1e-5)
    assert backed.uns["sslcell"]["X_sslcell"]["n_missing_genes"] == 0


def test_a_view_of_a_backed_file_is_refused_or_copied_never_read_as_the_whole_file(trained, small_counts,
                                                                                    small_counts_file):
    """Reading the view's file would embed every cell in file order onto the view's (permuted) rows."""
    model, _ = trained
    reference = small_counts.copy()
    sslcell.tl.embed(reference, model)
    rows = np.random.default_rng(1).permutation(small_counts.n_obs)[:50]
    view = ad.read_h5ad(small_counts_file, backed="r")[rows]
    with pytest.raises(InputError, match="a view of a backed AnnData"):
        sslcell.tl.embed(view, model)
    copied = sslcell.tl.embed(view, model, copy=True)  # the view's cells, loaded
    np.testing.assert_allclose(copied.obsm["X_sslcell"], reference.obsm["X_sslcell"][rows], atol=1e-5)


def test_missing_genes_are_zero_filled_and_reported(trained, small_counts):
    model, _ = trained
    keep = [g for g in small_counts.var_names if g not in set(model.inputs.genes[:10])]
    adata = small_counts[:, keep].copy()
    sslcell.tl.embed(adata, model)
    assert adata.uns["sslcell"]["X_sslcell"]["n_missing_genes"] == 10
    disjoint = small_counts.copy()
    disjoint.var_names = [f"other_{i}" for i in range(disjoint.n_vars)]
    with pytest.raises(GeneMismatchError):
        sslcell.tl.embed(disjoint, model)


def test_empty_cells_are_counted_and_warned(trained, small_counts):
    model, _ = trained
    adata = small_counts.copy()
    x = adata.X.tolil()
    x[[3, 7], :] = 0
    adata.X = x.tocsr()
    with pytest.warns(UserWarning, match=r"2 of 400 cells have no counts over the model's 100 genes"):
        sslcell.tl.embed(adata, model)
    assert adata.uns["sslcell"]["X_sslcell"]["n_empty_cells"] == 2
    np.testing.assert_array_equal(adata.obsm["X_sslcell"][3], adata.obsm["X_sslcell"][7])


def test_too_many_missing_genes_are_refused_unless_allowed(trained, small_counts):
    model, _ = trained
    keep = [g for g in small_counts.var_names if g not in set(model.inputs.genes[:60])]  # 60 of 100 model genes
    adata = small_counts[:, keep].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused: the error alone, not the alignment warning first
        with pytest.raises(GeneMismatchError, match=r"40/100 model genes present.*60% of the model's genes are "
                                                     r"missing"):
            sslcell.tl.embed(adata, model)
    assert "X_sslcell" not in adata.obsm
    with pytest.warns(UserWarning, match="40/100 model genes present"):  # allowed: the warning stays
        sslcell.tl.embed(adata, model, max_missing_genes=0.7, key_added="X_allowed")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", module="sslcell")  # a filter by module silences it, as any warning
        sslcell.tl.embed(adata, model, max_missing_genes=0.7, overwrite=True)
    info = adata.uns["sslcell"]["X_sslcell"]
    assert info["n_missing_genes"] == 60 and len(info["missing_genes_examples"]) > 0


def test_log_normalised_input_embeds_as_its_raw_counts_whatever_the_scale(trained, small_counts):
    """scanpy's normalize_total runs over all genes (to 1e4, CPM or the median); the model normalises over its own
    genes. Declared log-normalised values are taken back to per-cell shares: the raw counts' embedding, exactly.
    Read as they were, log1p of counts per million was 100x off in every gene and 1e4 over all genes still off."""
    model, _ = trained
    raw = small_counts.copy()
    sslcell.tl.embed(raw, model)
    assert set(model.inputs.genes) < set(small_counts.var_names)  # the model's genes hold part of the counts
    for target_sum in (model.inputs.target_sum, 1e6, None):
        logged = small_counts.copy()
        sc.pp.normalize_total(logged, target_sum=target_sum)
        sc.pp.log1p(logged)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sslcell.tl.embed(logged, model, counts_are_log_normalized=True)
        np.testing.assert_allclose(logged.obsm["X_sslcell"], raw.obsm["X_sslcell"], atol=2e-4)


def test_crops_given_to_an_expression_model_are_refused_whatever_their_type(trained, small_counts):
    """A NumPy array of crops was tested for truth ('ambiguous') instead of being named as not applicable."""
    model, _ = trained
    for crops in (np.zeros((3, 2, 8, 8), np.uint16), [1, 2]):
        with pytest.raises(InputError, match="crops: not applicable to this model's input"):
            sslcell.tl.embed(small_counts.copy(), model, crops=crops)
