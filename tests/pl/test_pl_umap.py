"""pl.umap: coordinates follow the embedding (the stale-UMAP case), the user's X_umap is never touched, and
figures are returned and saved."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from sslcell import pl
from sslcell.errors import InputError
from sslcell.tl._keys import drop_derived

PNG = b"\x89PNG\r\n\x1a\n"


def _adata(seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    groups = np.repeat(["a", "b", "c"], 40)
    centres = {"a": 0.0, "b": 4.0, "c": 8.0}
    emb = np.stack([rng.normal(centres[g], 1.0, 6) for g in groups]).astype(np.float32)
    adata = ad.AnnData(obs=pd.DataFrame({"group": pd.Categorical(groups)}, index=[f"c{i}" for i in range(120)]))
    adata.obsm["X_sslcell"] = emb
    return adata


def test_returns_and_saves_a_figure_and_reuses_current_coordinates(tmp_path):
    adata = _adata()
    adata.obsm["X_umap"] = np.ones((adata.n_obs, 2))
    fig = pl.umap(adata, "group", path=tmp_path / "sub" / "umap.png")
    assert isinstance(fig, Figure)
    assert (tmp_path / "sub" / "umap.png").read_bytes()[:8] == PNG
    first = adata.obsm["X_sslcell_umap"].copy()
    assert first.shape == (adata.n_obs, 2)
    np.testing.assert_array_equal(adata.obsm["X_umap"], 1.0)  # the user's UMAP is left alone
    adata.obsm["X_sslcell_umap"][:] = 0.0  # a marker: reused (not recomputed) while the embedding is unchanged
    pl.umap(adata, ["group"])
    np.testing.assert_array_equal(adata.obsm["X_sslcell_umap"], 0.0)


def test_new_embedding_values_recompute_the_coordinates():
    """The stale-UMAP case: the embedding changes in place (no tl tool involved) -> new coordinates."""
    adata = _adata()
    pl.umap(adata, "group")
    adata.obsm["X_sslcell_umap"][:] = 0.0
    adata.obsm["X_sslcell"] = _adata(seed=1).obsm["X_sslcell"]
    pl.umap(adata, "group")
    assert np.ptp(adata.obsm["X_sslcell_umap"], axis=0).min() > 0  # recomputed, not the zeros
    adata.obsm["X_sslcell_umap"][:] = 0.0
    pl.umap(adata, "group", n_neighbors=10)  # other settings -> recomputed too
    assert np.ptp(adata.obsm["X_sslcell_umap"], axis=0).min() > 0


def test_drop_derived_removes_neighbours_and_coordinates():
    adata = _adata()
    pl.umap(adata, "group")
    assert {"X_sslcell_neighbors_connectivities", "X_sslcell_neighbors_distances"} <= set(adata.obsp)
    drop_derived(adata, "X_sslcell")
    assert "X_sslcell_umap" not in adata.obsm and "X_sslcell_neighbors" not in adata.uns
    assert not set(adata.obsp)


def test_missing_representation_is_named():
    with pytest.raises(InputError, match=r"no 'X_other'.*X_sslcell"):
        pl.umap(_adata(), "group", use_rep="X_other")


def test_an_unknown_colour_or_nan_is_refused_before_anything_is_written():
    adata = _adata()
    with pytest.raises(InputError, match=r"color: \['nope'\] are neither obs columns nor genes"):
        pl.umap(adata, ["group", "nope"])
    assert "X_sslcell_umap" not in adata.obsm and "X_sslcell_neighbors" not in adata.uns
    adata.obsm["X_sslcell"][3, 0] = np.nan
    with pytest.raises(InputError, match="holds NaN or inf"):
        pl.umap(adata, "group")


def test_no_pyplot_figure_is_left_open():
    """scanpy draws through pyplot: every call left a figure open (shown twice in Jupyter, warned after 20)."""
    import matplotlib.pyplot as plt

    adata, before = _adata(), len(plt.get_fignums())
    for _ in range(3):
        fig = pl.umap(adata, "group")
    assert len(plt.get_fignums()) == before and fig.axes  # the returned figure is whole
