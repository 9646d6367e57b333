"""``tl.cell_cycle``: fit a closed trajectory through an embedding and write each cell's cycle position θ."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from sslcell.cellcycle.fit import CycleFit, default_phase_order, fit_cycle
from sslcell.cellcycle.project import cycle_keys, project_cycle, write_cycle
from sslcell.data.labels import label_strings
from sslcell.errors import InputError
from sslcell.tl._keys import check_free, check_in_place, fingerprint, record, rep_id


def cell_cycle(
    adata: AnnData,
    use_rep: str = "X_sslcell",
    *,
    anchor_key: str | None = None,
    anchor_order: Sequence[str] | None = None,
    reference: Any = None,
    reference_key: str = "cell_cycle",
    key_added: str = "cell_cycle",
    overwrite: bool = False,
    copy: bool = False,
) -> AnnData | None:
    """Place every cell on a closed trajectory fitted through ``obsm[use_rep]`` (:mod:`sslcell.cellcycle.fit`).

    With ``reference`` (an AnnData whose fit is under ``uns["sslcell"][reference_key]``, that recorded dict, or a
    :class:`~sslcell.cellcycle.CycleFit`) nothing is fitted: the cells are placed on the reference's trajectory
    (:func:`sslcell.cellcycle.project_cycle`), which is how to read a new acquisition - possibly of cells all in one
    phase, where no closed path can be fitted - embedded with the same model.

    Writes ``obs[f"{key_added}_theta"]`` (θ in ``[0, 2π)``), ``obsm[f"{key_added}_plane"]`` (the scaled 2-D plane the
    circle was fitted in, ``(N, 2)``) and, with anchors, ``obs[f"{key_added}_phase"]`` (the phase arc each cell
    falls in; without anchors the phase column of an earlier fit under ``key_added`` is removed, with
    ``overwrite=True``, and a column no such fit wrote is left alone); the fit (method,
    direction, origin, closure, residual, explained variance, phase arcs) goes to ``uns["sslcell"][key_added]``.
    Warns when the cells do not seem to lie on a closed path.

    Args:
        use_rep: the ``obsm`` key of the representation ``(N, D)``: an embedding, a fine-tuned phase classifier's
            outputs, or a PCA of cell-cycle genes.
        anchor_key: an ``obs`` column of phase labels that fixes the origin and, with at least three phases in
            cycle order, the direction (two phases fix only the origin: warned); cells without a label (NaN) are
            placed but not used, so a few labelled cells suffice, but every phase of the order needs some.
        anchor_order: the phases in cycle order (e.g. ``["G1", "S", "G2M"]``); default: an ordered categorical's
            categories (or an unordered one's when not in sorted order), else known phase names in cycle order
            (:func:`~sslcell.cellcycle.fit.default_phase_order`); other names need it.
    """
    check_in_place(adata, copy)
    if reference is not None:
        if anchor_key is not None or anchor_order is not None:
            raise InputError("anchor_key / anchor_order fix a new fit; with reference= the reference's anchors apply")
        return project_cycle(adata, reference, use_rep, reference_key=reference_key, key_added=key_added,
                             overwrite=overwrite, copy=copy)
    if use_rep not in adata.obsm:
        raise InputError(f"adata.obsm has no {use_rep!r} (embed it first with tl.embed); it has {list(adata.obsm)}")
    keys = cycle_keys(adata, key_added, overwrite, phases=anchor_key is not None)
    anchors, order = None, None
    if anchor_key is not None:
        if anchor_key not in adata.obs.columns:
            raise InputError(f"no obs column {anchor_key!r} to anchor the cycle; columns are {list(adata.obs.columns)}")
        column = adata.obs[anchor_key]
        if not column.notna().any():
            raise InputError(f"obs[{anchor_key!r}] labels no cell (every value is missing): nothing anchors the cycle")
        anchors = label_strings(column, f"obs[{anchor_key!r}]")  # codes stored as floats beside NaN: "1", not "1.0"
        if isinstance(anchor_order, str):
            raise InputError(f"anchor_order: the phases as a list in cycle order, e.g. ['G1', 'S', 'G2M'], not the "
                             f"string {anchor_order!r}")
        if anchor_order is not None:
            order = list(anchor_order)
        else:
            categorical = isinstance(column.dtype, pd.CategoricalDtype)
            try:
                order = default_phase_order(pd.Series(anchors).dropna().astype(str),
                                            column.cat.categories.astype(str) if categorical else None,
                                            categorical and bool(column.cat.ordered))
            except InputError as err:
                raise InputError(f"obs[{anchor_key!r}]: {err}") from None
    elif anchor_order is not None:
        raise InputError("anchor_order needs anchor_key (the obs column of phase labels it orders)")
    x = np.asarray(adata.obsm[use_rep])
    fit: CycleFit = fit_cycle(x, anchors, order, what=f"obsm[{use_rep!r}]",
                              anchors_what=f"obs[{anchor_key!r}]" if anchor_key else "")
    if copy:
        adata = adata.to_memory() if adata.isbacked else adata.copy()
    write_cycle(adata, fit, fit.theta(x), fit.plane(x), keys, key_added)
    info = {"use_rep": use_rep, "rep_id": rep_id(adata, use_rep), "anchor_key": anchor_key, **fit.to_dict()}
    record(adata, key_added, {k: v for k, v in info.items() if v is not None})  # .h5ad cannot hold None
    return adata if copy else None


def score_cell_cycle(adata: AnnData, *, layer: str | None = None, s_genes: Sequence[str] | None = None,
                     g2m_genes: Sequence[str] | None = None, key_added: str = "cycle_score", overwrite: bool = False,
                     copy: bool = False) -> AnnData | None:
    """S and G2/M gene scores and a G1 / S / G2M call per cell from raw counts (:mod:`sslcell.cellcycle.expression`:
    the shipped Tirosh genes, or yours). Writes ``obs[f"{key_added}_S"]``, ``obs[f"{key_added}_G2M"]`` and
    ``obs[f"{key_added}_phase"]``: pseudo-labels for ``tl.cell_cycle(anchor_key=f"{key_added}_phase")``."""
    from sslcell.cellcycle.expression import PHASE_ORDER, score_phases

    keys = {"S_score": f"{key_added}_S", "G2M_score": f"{key_added}_G2M", "phase": f"{key_added}_phase"}
    for key in keys.values():
        check_free(adata, "obs", key, overwrite)
    check_free(adata, "record", key_added, overwrite)
    check_in_place(adata, copy)
    scores = score_phases(adata, layer=layer, s_genes=s_genes, g2m_genes=g2m_genes)
    if copy:
        adata = adata.to_memory() if adata.isbacked else adata.copy()
    for column, key in keys.items():
        adata.obs[key] = scores[column].to_numpy()
    adata.obs[keys["phase"]] = pd.Categorical(scores["phase"], categories=PHASE_ORDER)
    record(adata, key_added, {"layer": layer, "genes": "custom" if s_genes or g2m_genes else "Tirosh et al. 2016"})
    return adata if copy else None


def cell_cycle_pca(adata: AnnData, *, layer: str | None = None, s_genes: Sequence[str] | None = None,
                   g2m_genes: Sequence[str] | None = None, n_comps: int = 2, key_added: str = "X_cell_cycle_pca",
                   overwrite: bool = False, copy: bool = False) -> AnnData | None:
    """The cycle-gene PCA baseline (tricycle's idea, fitted on these cells) into ``obsm[key_added]`` ``(N, n_comps)``;
    ``tl.cell_cycle(adata, use_rep=key_added, ...)`` turns it into θ to compare with an embedding's."""
    from sslcell.cellcycle.expression import cycle_gene_pca

    check_free(adata, "obsm", key_added, overwrite)
    check_free(adata, "record", key_added, overwrite)
    check_in_place(adata, copy)
    x = cycle_gene_pca(adata, layer=layer, s_genes=s_genes, g2m_genes=g2m_genes, n_comps=n_comps)
    if copy:
        adata = adata.to_memory() if adata.isbacked else adata.copy()
    adata.obsm[key_added] = x
    # a PCA of these cells' own: its axes are another dataset's space, so it gets an id of its own (a fit on it
    # places only these cells)
    record(adata, key_added, {"layer": layer, "n_comps": n_comps, "model_id": f"cell_cycle_pca:{fingerprint(x)}",
                              "genes": "custom" if s_genes or g2m_genes else "Tirosh et al. 2016"})
    return adata if copy else None
