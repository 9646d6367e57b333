"""Streaming per-gene statistics and highly variable genes, against dense and scanpy references."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from sslcell.data.expression import ExpressionDataset
from sslcell.data.gene_stats import gene_statistics, select_highly_variable, seurat_dispersions
from sslcell.errors import InputError


def _reference_statistics(x: np.ndarray, target_sum: float = 1e4) -> dict[str, np.ndarray]:
    library = x.sum(1, keepdims=True)
    norm = np.divide(x * target_sum, library, out=np.zeros_like(x), where=library > 0)
    logs = np.log1p(norm)
    return {
        "mean_counts": x.mean(0), "var_counts": x.var(0, ddof=1), "mean_norm": norm.mean(0),
        "var_norm": norm.var(0, ddof=1), "mean_log1p": logs.mean(0), "var_log1p": logs.var(0, ddof=1),
        "n_cells_expressed": (x > 0).sum(0),
    }  # fmt: skip


def test_gene_statistics_match_dense_reference():
    rng = np.random.default_rng(2)
    x = rng.poisson(rng.gamma(0.5, 4.0, 60), (203, 60)).astype(np.float64)
    x[17] = 0  # a cell with no counts
    ds = ExpressionDataset.open(ad.AnnData(sp.csr_matrix(x.astype(np.int32))))
    stats = gene_statistics(ds, chunk_size=19)  # many chunks: exercises the streaming merge
    assert list(stats.index) == list(ds.genes)
    for column, expected in _reference_statistics(x).items():
        np.testing.assert_allclose(stats[column].to_numpy(), expected, rtol=1e-5, atol=1e-9, err_msg=column)


def test_duplicate_entries_of_a_csr_matrix_count_once_summed(tmp_path):
    """Valid scipy: a (row, gene) stored twice means their sum; each entry was squared and logged on its own."""
    x = np.random.default_rng(4).poisson(3.0, (50, 12)).astype(np.int32)
    indices, data, indptr = [], [], [0]
    for row in x:  # every count split into two entries of the same (row, gene)
        cols = np.flatnonzero(row)
        indices += [cols, cols]
        data += [row[cols] // 2, row[cols] - row[cols] // 2]
        indptr.append(indptr[-1] + 2 * len(cols))
    dup = sp.csr_matrix((np.concatenate(data), np.concatenate(indices), indptr), shape=x.shape)
    assert not dup.has_canonical_format and np.array_equal(dup.toarray(), x)
    for data in (ad.AnnData(dup), tmp_path / "dup.h5ad"):
        if not isinstance(data, ad.AnnData):
            ad.AnnData(dup).write_h5ad(data)
        stats = gene_statistics(ExpressionDataset.open(data))
        for column, expected in _reference_statistics(x.astype(np.float64)).items():
            np.testing.assert_allclose(stats[column].to_numpy(), expected, rtol=1e-5, atol=1e-9, err_msg=column)


def test_gene_statistics_of_log_normalized_input():
    logs = np.log1p(np.random.default_rng(3).poisson(2.0, (40, 7)).astype(np.float32))
    ds = ExpressionDataset.open(ad.AnnData(logs), counts_are_log_normalized=True)
    stats = gene_statistics(ds, chunk_size=9)
    np.testing.assert_allclose(stats["mean_log1p"], logs.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats["var_norm"], np.expm1(logs.astype(np.float64)).var(0, ddof=1), rtol=1e-5)


def _planted_counts(n_cells=500, n_genes=1000, n_planted=10, seed=0):
    """Poisson genes with gene-specific means; ``n_planted`` genes keep their mean but burst in 5% of cells."""
    rng = np.random.default_rng(seed)
    means = rng.gamma(2.0, 1.0, n_genes) + 0.3
    x = rng.poisson(means, (n_cells, n_genes))
    typical = np.flatnonzero((means > np.quantile(means, 0.25)) & (means < np.quantile(means, 0.75)))
    planted = rng.choice(typical, n_planted, replace=False)  # in well-populated mean bins
    on = rng.random((n_cells, n_planted)) < 0.05
    x[:, planted] = np.where(on, rng.poisson(20 * means[planted], (n_cells, n_planted)), 0)
    genes = np.array([f"gene{j}" for j in range(n_genes)])
    return ad.AnnData(sp.csr_matrix(x.astype(np.float32)), var=pd.DataFrame(index=genes)), genes[planted]


def test_highly_variable_finds_planted_genes():
    a, planted = _planted_counts()
    ds = ExpressionDataset.open(a)
    chosen = select_highly_variable(ds, n_top_genes=len(planted), chunk_size=128)
    assert set(chosen) == set(planted)
    assert list(chosen) == [g for g in ds.genes if g in set(chosen)]  # dataset order
    with pytest.raises(InputError, match="n_top_genes"):
        select_highly_variable(ds, 0)


def test_highly_variable_agrees_with_scanpy_seurat():
    a, _ = _planted_counts(n_cells=500, n_genes=400, n_planted=10, seed=5)
    ours = set(select_highly_variable(ExpressionDataset.open(a), n_top_genes=60, chunk_size=64))
    ref = a.copy()
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    sc.pp.highly_variable_genes(ref, flavor="seurat", n_top_genes=60)
    theirs = set(ref.var_names[ref.var["highly_variable"]])
    assert len(ours) == 60
    assert len(ours & theirs) >= 58, (len(ours & theirs), sorted(ours ^ theirs))
    disp = seurat_dispersions(gene_statistics(ExpressionDataset.open(a), chunk_size=64))
    np.testing.assert_allclose(disp["means"], ref.var["means"], rtol=1e-5)
    np.testing.assert_allclose(disp["dispersions_norm"], ref.var["dispersions_norm"], atol=1e-4)
