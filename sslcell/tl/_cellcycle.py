"""``tl.cell_cycle``: fit a closed trajectory through an embedding and write each cell's cycle position θ."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from sslcell.cellcycle.fit import CycleFit, fit_cycle
from sslcell.errors import InputError
from sslcell.tl._keys import check_free, record


def cell_cycle(
    adata: AnnData,
    use_rep: str = "X_sslcell",
    *,
    anchor_key: str | None = None,
    anchor_order: Sequence[str] | None = None,
    key_added: str = "cell_cycle",
    overwrite: bool = False,
    copy: bool = False,
) -> AnnData | None:
    """Place every cell on a closed trajectory fitted through ``obsm[use_rep]`` (:mod:`sslcell.cellcycle.fit`).

    Writes ``obs[f"{key_added}_theta"]`` (θ in ``[0, 2π)``), ``obsm[f"{key_added}_plane"]`` (the scaled 2-D plane the
    circle was fitted in, ``(N, 2)``) and, with anchors, ``obs[f"{key_added}_phase"]`` (the phase arc each cell
    falls in); the fit (method, direction, origin, closure, residual, explained variance, phase arcs) goes to
    ``uns["sslcell"][key_added]``. Warns when the cells do not seem to lie on a closed path.

    Args:
        use_rep: the ``obsm`` key of the representation ``(N, D)``: an embedding, a fine-tuned phase classifier's
            outputs, or a PCA of cell-cycle genes.
        anchor_key: an ``obs`` column of phase labels that fixes origin and direction; cells without a label (NaN)
            are placed but not used, so a few labelled cells suffice.
        anchor_order: the phases in cycle order (e.g. ``["G1", "S", "G2M"]``); default: the column's categories.
    """
    if use_rep not in adata.obsm:
        raise InputError(f"adata.obsm has no {use_rep!r} (embed it first with tl.embed); it has {list(adata.obsm)}")
    theta_key, phase_key, plane_key = f"{key_added}_theta", f"{key_added}_phase", f"{key_added}_plane"
    check_free(adata, "obs", theta_key, overwrite)
    check_free(adata, "obsm", plane_key, overwrite)
    anchors, order = None, None
    if anchor_key is not None:
        if anchor_key not in adata.obs.columns:
            raise InputError(f"no obs column {anchor_key!r} to anchor the cycle; columns are {list(adata.obs.columns)}")
        check_free(adata, "obs", phase_key, overwrite)
        column = adata.obs[anchor_key]
        order = list(anchor_order) if anchor_order is not None else (
            [str(c) for c in column.cat.categories] if isinstance(column.dtype, pd.CategoricalDtype) else None)
        anchors = column.astype(object).where(column.notna(), None).to_numpy()
    elif anchor_order is not None:
        raise InputError("anchor_order needs anchor_key (the obs column of phase labels it orders)")
    x = np.asarray(adata.obsm[use_rep])
    fit: CycleFit = fit_cycle(x, anchors, order)
    if copy:
        adata = adata.copy()
    plane = fit.plane(x)
    theta = fit.theta(x)
    adata.obs[theta_key] = theta.astype(np.float32)
    adata.obsm[plane_key] = plane.astype(np.float32)
    if fit.phases:
        adata.obs[phase_key] = pd.Categorical(fit.phase(theta), categories=fit.phases)
    info = {"use_rep": use_rep, "anchor_key": anchor_key, **fit.to_dict()}
    record(adata, key_added, {k: v for k, v in info.items() if v is not None})  # .h5ad cannot hold None
    return adata if copy else None
