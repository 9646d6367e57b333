"""Plots. Figures are returned and, given ``path``, saved as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import scanpy as sc  # noqa: E402
from anndata import AnnData  # noqa: E402

from sslcell.errors import InputError  # noqa: E402


def umap(
    adata: AnnData,
    color: str | Sequence[str],
    *,
    use_rep: str = "X_sslcell",
    n_neighbors: int = 15,
    path: str | Path | None = None,
    seed: int = 0,
) -> plt.Figure:
    """UMAP of ``adata.obsm[use_rep]`` coloured by ``obs`` columns.

    Neighbours and coordinates are stored under their own keys (``{use_rep}_neighbors`` in ``uns``/``obsp``,
    ``{use_rep}_umap`` in ``obsm``) and reused on later calls, so a user's ``X_umap`` is never replaced.
    """
    if use_rep not in adata.obsm:
        raise InputError(f"adata.obsm has no {use_rep!r}; available: {sorted(adata.obsm)}")
    neighbors_key, basis = f"{use_rep}_neighbors", f"{use_rep}_umap"
    if basis not in adata.obsm:
        if neighbors_key not in adata.uns:
            sc.pp.neighbors(adata, n_neighbors=n_neighbors, use_rep=use_rep, key_added=neighbors_key, random_state=seed)
        sc.tl.umap(adata, neighbors_key=neighbors_key, key_added=basis, random_state=seed)
    colors = [color] if isinstance(color, str) else list(color)
    fig = sc.pl.embedding(adata, basis=basis, color=colors, show=False, return_fig=True, frameon=False)
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig
