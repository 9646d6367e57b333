"""The cell cycle from expression: Tirosh genes found case-insensitively, phase pseudo-labels from gene scores, and
the cycle-gene PCA baseline, whose anchored θ follows the simulated cycle."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from sslcell import tl
from sslcell.cellcycle.expression import cycle_genes
from sslcell.data.genesets import example_programmes
from sslcell.data.synthetic import make_expression
from sslcell.errors import InputError, OverwriteError
from sslcell.evaluate import circular_correlation


@pytest.fixture(scope="module")
def cycling():
    adata = make_expression(n_cells=800, n_genes=300, n_cell_types=3, seed=0, cycle_amplitude=3.0)
    s = [g for g in adata.var_names if g.startswith("S_")]
    g2m = [g for g in adata.var_names if g.startswith("G2M_")]
    return adata, s, g2m


def test_tirosh_genes_match_mouse_symbols_and_renamed_genes():
    shipped = example_programmes()
    mouse = [g.capitalize() for g in shipped["TIROSH2016_S_PHASE"][:10] + shipped["TIROSH2016_G2M_PHASE"][:10]]
    s, g2m = cycle_genes(mouse + ["Cenpu", "Pimreg", "Actb"])
    assert "Mcm5" in s and "Cenpu" in s and "Pimreg" in g2m and "Actb" not in s + g2m
    with pytest.raises(InputError, match="S genes"):
        cycle_genes([f"ENSG{i:011d}" for i in range(100)])


def test_gene_scores_call_phases_better_than_the_largest_phase(cycling):
    adata, s, g2m = cycling
    out = tl.score_cell_cycle(adata, s_genes=s, g2m_genes=g2m, copy=True)
    called = out.obs["cycle_score_phase"].astype(str).to_numpy()
    truth = adata.obs["cycle_phase"].astype(str).to_numpy()
    assert list(out.obs["cycle_score_phase"].cat.categories) == ["G1", "S", "G2M"]
    assert np.mean(called == truth) > 0.6  # G1 alone, the largest phase, is 0.5
    assert out.obs["cycle_score_S"].to_numpy()[truth == "S"].mean() > out.obs["cycle_score_S"].to_numpy()[
        truth == "G1"].mean()
    with pytest.raises(OverwriteError):
        tl.score_cell_cycle(out, s_genes=s, g2m_genes=g2m)


def test_cycle_gene_pca_anchored_by_gene_scores_follows_the_simulated_cycle(cycling):
    adata, s, g2m = cycling
    out = tl.score_cell_cycle(adata, s_genes=s, g2m_genes=g2m, copy=True)
    tl.cell_cycle_pca(out, s_genes=s, g2m_genes=g2m)
    assert out.obsm["X_cell_cycle_pca"].shape == (out.n_obs, 2)
    tl.cell_cycle(out, use_rep="X_cell_cycle_pca", anchor_key="cycle_score_phase")
    assert circular_correlation(out.obs["cell_cycle_theta"], adata.obs["cycle_theta"]) > 0.8


def test_cells_of_another_pca_are_not_placed_on_a_pca_fit(cycling):
    """Each cell_cycle_pca is a PCA of its own cells: a second dataset's axes can come out mirrored, and θ read off
    them ran backwards without a warning. Placing it on the first fit is refused; its own fit is fine."""
    adata, s, g2m = cycling
    halves = [tl.score_cell_cycle(adata[rows].copy(), s_genes=s, g2m_genes=g2m, copy=True)
              for rows in (np.arange(0, 800, 2), np.arange(1, 800, 2))]
    for half in halves:
        tl.cell_cycle_pca(half, s_genes=s, g2m_genes=g2m)
    reference, query = halves
    tl.cell_cycle(reference, use_rep="X_cell_cycle_pca", anchor_key="cycle_score_phase")
    with pytest.raises(InputError, match="each call of tl.cell_cycle_pca fits a PCA of its own cells"):
        tl.cell_cycle(query, use_rep="X_cell_cycle_pca", reference=reference)
    tl.cell_cycle(query, use_rep="X_cell_cycle_pca", anchor_key="cycle_score_phase")


def test_counts_are_checked(cycling):
    adata, s, g2m = cycling
    bad = ad.AnnData(sp.csr_matrix(-adata.X.toarray()[:20]), var=adata.var)
    with pytest.raises(InputError, match="non-negative"):
        tl.score_cell_cycle(bad, s_genes=s, g2m_genes=g2m)
    with pytest.raises(InputError, match="layer 'counts'"):
        tl.cell_cycle_pca(adata, layer="counts", s_genes=s, g2m_genes=g2m)
    twice = adata[:40].copy()
    twice.var_names = [s[1] if name == s[0] else name for name in twice.var_names]  # one S gene named twice
    empty = adata[:0].copy()
    for tool in (tl.score_cell_cycle, tl.cell_cycle_pca):  # were pandas' and scikit-learn's own errors
        with pytest.raises(InputError, match=rf"gene names repeat in var_names \(e\.g\. \['{s[1]}'\]\)"):
            tool(twice, s_genes=s[1:], g2m_genes=g2m)
        with pytest.raises(InputError, match=r"counts of shape \(0, 300\): .* at least one cell"):
            tool(empty, s_genes=s, g2m_genes=g2m)


def test_phase_set_calls_follow_the_simulated_phase_groups_all_round():
    from sslcell.cellcycle.expression import score_phase_sets
    from sslcell.data.synthetic import WHITFIELD_PEAKS, programmes_of

    adata = make_expression(n_cells=600, n_genes=300, n_cell_types=3, seed=1, cycle_programme="whitfield")
    groups = programmes_of(adata)
    sets = {name: [g.upper() for g in groups[name]] for name in WHITFIELD_PEAKS}  # matched case-insensitively
    calls = score_phase_sets(adata, sets)
    assert list(calls["phase"].cat.categories) == list(WHITFIELD_PEAKS)
    assert [c for c in calls.columns if c != "phase"] == [f"{name}_score" for name in WHITFIELD_PEAKS]
    z = calls["MG1_score"].to_numpy()
    assert abs(z.mean()) < 1e-5 and abs(z.std() - 1) < 1e-3
    # each call's simulated phase lies closest to that group's peak more often than not; chance is about 0.2
    theta = adata.obs["cycle_theta"].to_numpy()
    peaks = np.array(list(WHITFIELD_PEAKS.values()))
    nearest = np.abs(np.angle(np.exp(1j * (theta[:, None] - peaks[None, :])))).argmin(axis=1)
    assert np.mean(calls["phase"].cat.codes.to_numpy() == nearest) > 0.5
    # mid-G1 cells (0.4-0.6 pi), which S and G2M scores call G1 wholesale, are told apart: M/G1 early, G1/S late
    early = calls["phase"][(theta > 0.2 * np.pi) & (theta < 0.45 * np.pi)]
    late = calls["phase"][(theta > 0.55 * np.pi) & (theta < 0.8 * np.pi)]
    assert (early == "MG1").mean() > (late == "MG1").mean() + 0.2
    assert (late == "G1S").mean() > (early == "G1S").mean() + 0.2


def test_phase_sets_are_checked(cycling):
    from sslcell.cellcycle.expression import score_phase_sets

    adata, s, g2m = cycling
    with pytest.raises(InputError, match="at least two"):
        score_phase_sets(adata, {"S": s})
    with pytest.raises(InputError, match="'G1' set"):
        score_phase_sets(adata, {"S": s, "G1": ["NOPE1", "NOPE2", s[0]]})


def test_backed_cells_and_too_many_components_get_clear_errors(cycling, tmp_path):
    adata, s, g2m = cycling
    with pytest.raises(InputError, match=r"n_comps=500 must be >= 1 and < min\(cells, genes\)"):
        tl.cell_cycle_pca(adata.copy(), s_genes=s, g2m_genes=g2m, n_comps=500)
    with pytest.raises(InputError, match="n_comps=0"):
        tl.cell_cycle_pca(adata.copy(), s_genes=s, g2m_genes=g2m, n_comps=0)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    with pytest.raises(InputError, match=r"cells\.h5ad: a backed AnnData; .*adata\.to_memory\(\)"):
        tl.score_cell_cycle(backed, s_genes=s, g2m_genes=g2m)


def test_cells_without_cycle_gene_counts_get_no_phase(cycling):
    """Their S and G2M scores are 0 - 0: scanpy's rule calls that S, and they then anchored the cycle as S."""
    adata, s, g2m = cycling
    silent = adata[:30].copy()
    x = silent.X.toarray()
    x[:5, [list(silent.var_names).index(g) for g in s + g2m]] = 0
    silent.X = sp.csr_matrix(x)
    with pytest.warns(UserWarning, match="5 cell"):
        tl.score_cell_cycle(silent, s_genes=s, g2m_genes=g2m)
    assert silent.obs["cycle_score_phase"][:5].isna().all() and silent.obs["cycle_score_phase"][5:].notna().all()
