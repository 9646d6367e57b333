"""UMAP of an embedding in ``obsm``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from anndata import AnnData
from matplotlib.figure import Figure

from sslcell.errors import InputError
from sslcell.pl._utils import save
from sslcell.tl._keys import fingerprint


def umap(
    adata: AnnData,
    color: str | Sequence[str],
    *,
    use_rep: str = "X_sslcell",
    n_neighbors: int = 15,
    path: str | Path | None = None,
    seed: int = 0,
) -> Figure:
    """UMAP of ``adata.obsm[use_rep]`` ``(N, D)`` coloured by ``obs`` columns.

    Neighbours and coordinates are stored under their own keys (``{use_rep}_neighbors`` in ``uns``/``obsp``,
    ``{use_rep}_umap`` in ``obsm``), so a user's ``X_umap`` is never replaced. They are reused on later calls only
    while they were computed from the same embedding values and ``n_neighbors`` (a fingerprint is stored with
    them); after re-embedding they are recomputed.
    """
    import scanpy as sc

    if use_rep not in adata.obsm:
        raise InputError(f"adata.obsm has no {use_rep!r}; available: {sorted(adata.obsm)}")
    colors = [color] if isinstance(color, str) else list(color)
    unknown = [c for c in colors if c not in adata.obs.columns and c not in adata.var_names]
    if unknown:  # before neighbours and coordinates are computed and written
        raise InputError(f"color: {unknown} are neither obs columns nor genes; obs columns are "
                         f"{list(adata.obs.columns)}")
    if not np.isfinite(np.asarray(adata.obsm[use_rep], dtype=float)).all():
        raise InputError(f"adata.obsm[{use_rep!r}] holds NaN or inf: no neighbours can be found")
    neighbors_key, basis = f"{use_rep}_neighbors", f"{use_rep}_umap"
    stamp = {"embedding": fingerprint(adata.obsm[use_rep]), "n_neighbors": int(n_neighbors), "seed": int(seed)}
    stored = adata.uns.get(neighbors_key, {}).get("sslcell_source", {}) if neighbors_key in adata.uns else {}
    if basis not in adata.obsm or dict(stored) != stamp:
        sc.pp.neighbors(adata, n_neighbors=n_neighbors, use_rep=use_rep, key_added=neighbors_key, random_state=seed)
        sc.tl.umap(adata, neighbors_key=neighbors_key, key_added=basis, random_state=seed)
        adata.uns[neighbors_key]["sslcell_source"] = stamp
    import matplotlib.pyplot as plt

    fig = sc.pl.embedding(adata, basis=basis, color=colors, show=False, return_fig=True, frameon=False)
    plt.close(fig)  # scanpy draws through pyplot: closed, the returned Figure is the one copy (as pl's others)
    return save(fig, path, dpi=120)
