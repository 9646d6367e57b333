from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
from scipy import sparse

from sslcell.errors import InputError
from sslcell.transfer.baselines import pca_baseline


def _counts(n_cells=150, n_genes=300, n_types=3, seed=0, return_types=False):
    """Poisson counts ``(N, G)`` CSR with a gene programme per cell type and varying library sizes."""
    rng = np.random.default_rng(seed)
    types = rng.integers(0, n_types, n_cells)
    rates = rng.gamma(0.5, 2.0, size=(n_types, n_genes))
    rates[:, : n_types * 10] *= np.repeat(np.eye(n_types) * 8 + 0.2, 10, axis=1)  # 10 marker genes per type
    size = rng.lognormal(0, 0.4, size=(n_cells, 1))
    x = rng.poisson(rates[types] * size)
    x[:, -5:] = 0
    x[np.arange(5), np.arange(n_genes - 5, n_genes)] = 30  # genes seen in one cell: z-score > 10, clipped
    x = sparse.csr_matrix(x, dtype=np.int32)
    return (x, types) if return_types else x


def _scanpy_by_hand(x, n_comps, n_top_genes, seed):
    a = ad.AnnData(x.astype(np.float32))
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.highly_variable_genes(a, flavor="seurat", n_top_genes=n_top_genes)
    a = a[:, a.var.highly_variable].copy()
    sc.pp.scale(a, max_value=10)
    sc.tl.pca(a, n_comps=n_comps, random_state=seed)
    return a.obsm["X_pca"]


def _sign_free_close(a, b, rtol):
    """Columns of ``a`` and ``b`` equal up to a sign flip each."""
    for j in range(a.shape[1]):
        err = min(np.linalg.norm(a[:, j] - b[:, j]), np.linalg.norm(a[:, j] + b[:, j]))
        assert err <= rtol * np.linalg.norm(b[:, j]), f"component {j} differs"


@pytest.mark.filterwarnings("ignore:zero-centering a sparse array")
def test_matches_scanpy_pipeline_run_by_hand():
    x = _counts()
    ours = pca_baseline(ad.AnnData(x), n_comps=20, n_top_genes=100, seed=0)
    assert ours.shape == (150, 20) and ours.dtype == np.float32
    _sign_free_close(ours, _scanpy_by_hand(x, 20, 100, 0), rtol=1e-4)


def test_matches_numpy_reference():
    x = _counts()
    ours = pca_baseline(x, n_comps=5, n_top_genes=120)
    dense = x.toarray().astype(np.float64)
    log = np.log1p(dense / dense.sum(axis=1, keepdims=True) * 1e4)
    hvg = sc.pp.highly_variable_genes(ad.AnnData(log), flavor="seurat", n_top_genes=120, inplace=False)
    z = log[:, hvg["highly_variable"].to_numpy()]
    z = np.clip((z - z.mean(0)) / z.std(0, ddof=1), -10, 10)
    u, s, _ = np.linalg.svd(z - z.mean(0), full_matrices=False)
    _sign_free_close(ours, u[:, :5] * s[:5], rtol=1e-3)


def test_input_forms_agree_and_input_is_untouched():
    x = _counts()
    adata = ad.AnnData(x.copy(), layers={"counts": x.copy()})
    ref = pca_baseline(adata, n_comps=10)  # n_top_genes=2000 is capped at 300 genes
    np.testing.assert_allclose(pca_baseline(x.toarray(), n_comps=10), ref, atol=1e-4)
    adata.X = sparse.csr_matrix(np.log1p(x.toarray()))  # .X no longer counts: the layer must be read
    np.testing.assert_allclose(pca_baseline(adata, n_comps=10, layer="counts"), ref, atol=1e-4)
    assert (adata.layers["counts"] != x).nnz == 0 and adata.obsm_keys() == []


def test_separates_cell_types():
    x, types = _counts(seed=1, return_types=True)
    emb = pca_baseline(x, n_comps=10)
    centroids = np.stack([emb[types == t].mean(0) for t in range(3)])
    nearest = np.argmin(((emb[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (nearest == types).mean() > 0.95


def test_bad_input():
    x = _counts().toarray()
    with pytest.raises(InputError, match="negative"):
        pca_baseline(x - 1, n_comps=5)
    with pytest.raises(InputError, match="n_comps=200"):
        pca_baseline(x, n_comps=200)
    with pytest.raises(InputError, match="layer 'raw'"):
        pca_baseline(ad.AnnData(x), layer="raw")
    with pytest.raises(InputError, match=r"none above .*: they look log-normalised.*Pass the raw counts \(layer="):
        pca_baseline(np.log1p(x), n_comps=5)  # normalised and logged again, it scored far below the raw counts' PCA
    with pytest.warns(UserWarning, match="non-integer"):  # e.g. ambient-corrected counts: not log values
        pca_baseline(x * 0.93 * (20 / x.max() + 1), n_comps=5)


def test_fitted_on_all_rows_is_the_usual_pca():
    x = _counts()
    _sign_free_close(pca_baseline(x, n_comps=5, n_top_genes=120, fit_rows=np.ones(x.shape[0], bool)),
                     pca_baseline(x, n_comps=5, n_top_genes=120), rtol=1e-3)


def test_fitted_on_a_reference_projects_the_other_cells_with_the_reference_steps():
    x = _counts()
    reference = np.arange(0, 150, 2)
    ours = pca_baseline(x, n_comps=5, n_top_genes=120, fit_rows=reference)
    dense = x.toarray().astype(np.float64)
    log = np.log1p(dense / dense.sum(axis=1, keepdims=True) * 1e4)
    hvg = sc.pp.highly_variable_genes(ad.AnnData(log[reference]), flavor="seurat", n_top_genes=120, inplace=False)
    z = log[:, hvg["highly_variable"].to_numpy()]
    z = np.clip((z - z[reference].mean(0)) / z[reference].std(0, ddof=1), -10, 10)
    centre = z[reference].mean(0)
    _, _, vt = np.linalg.svd(z[reference] - centre, full_matrices=False)
    _sign_free_close(ours, (z - centre) @ vt[:5].T, rtol=1e-3)
    with pytest.raises(InputError, match="fit_rows"):
        pca_baseline(x, fit_rows=np.array([3]))


def test_pixel_pca_fitted_on_a_reference_projects_the_other_crops():
    from sslcell.data.images import CellImages
    from sslcell.evaluate.baselines import pixel_pca_baseline

    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, (60, 2, 6, 6), dtype=np.uint8)
    cells = CellImages.from_array(crops, channel_names=["a", "b"])
    reference = np.arange(40)
    ours = pixel_pca_baseline(cells, n_comps=4, fit_rows=reference)
    flat = crops.reshape(60, -1).astype(np.float64)
    z = (flat - flat[reference].mean(0)) / flat[reference].std(0)
    centre = z[reference].mean(0)
    _, _, vt = np.linalg.svd(z[reference] - centre, full_matrices=False)
    _sign_free_close(ours, (z - centre) @ vt[:4].T, rtol=1e-3)


def test_scaled_pca_standardises_on_the_fit_rows_then_projects_every_cell():
    from sklearn.decomposition import PCA

    from sslcell.evaluate.baselines import scaled_pca

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)) * np.arange(1, 9) + 5.0
    x[:, 3] = 2.0  # a constant gene: std 1, not a division by zero
    rows = np.arange(40)
    got = scaled_pca(x, rows, 3, seed=0, svd_solver="full")
    std = x[rows].std(0, ddof=1)
    std[std == 0] = 1
    z = np.clip((x - x[rows].mean(0)) / std, -10, 10)
    want = PCA(3, svd_solver="full", random_state=0).fit(z[rows]).transform(z)
    assert got.dtype == np.float32 and got.shape == (60, 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(scaled_pca(x, None, 3)[:40]).sum() > 0 and np.isfinite(got).all()
