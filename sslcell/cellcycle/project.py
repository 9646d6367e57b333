"""Place new cells on a cycle fitted before: θ from a reference fit, not from a fit of their own.

A fit needs cells all round the cycle. Cells of a single phase (a second acquisition of G1 cells, a sorted
population) lie on an arc, and a circle fitted through them alone spreads them round the whole circle: θ then says
nothing (``fit_cycle`` warns). Projected onto a fit made on cells of all phases (in the same representation: the
same embedding model, the same cycle-gene PCA, the same recipe), they keep the reference's circle, direction,
origin and phase arcs, so θ falls in their phase's arc. :func:`project_cycle` does that for an AnnData and writes
what ``tl.cell_cycle`` writes; on crops, :meth:`sslcell.cellcycle.recipe.CycleRecipe.apply` does the same.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from sslcell.cellcycle.fit import RESIDUAL_WARN, CycleFit, closure
from sslcell.errors import InputError, SSLCellWarning

if TYPE_CHECKING:  # anndata and pandas load on use: importing sslcell.cellcycle stays light
    from anndata import AnnData

_FIELDS = {f.name for f in dataclasses.fields(CycleFit)}
FARTHER = 1.5  # new cells warn when their residual is above RESIDUAL_WARN and this many times the reference's own


def _check_same_space(adata: AnnData, use_rep: str, reference: Any, key: str) -> None:
    """Refuse cells whose representation was made in another space than the reference fit's (another model's
    weights, or a PCA of other cells), where both sides recorded it: θ would be read off the wrong axes."""
    from sslcell.tl._keys import check_same_space, rep_id

    ours = rep_id(adata, use_rep)
    hint = ("each call of tl.cell_cycle_pca fits a PCA of its own cells, so the reference's axes are not these "
            "cells' axes: place cells embedded by one model instead" if ours and ours.startswith("cell_cycle_pca:")
            else "embed these cells with the reference's model")
    check_same_space(ours, _fitted_space(reference, key), f"obsm[{use_rep!r}]", "the one the reference was fitted in",
                     hint)


def _fitted_space(reference: Any, key: str) -> str | None:
    """The id of the space a reference fit (an AnnData holding it under ``key``, or its record) was made in."""
    from anndata import AnnData

    from sslcell.tl._keys import recorded

    fitted = recorded(reference, key) if isinstance(reference, AnnData) else reference
    return fitted.get("rep_id") if isinstance(fitted, dict) else None


def as_fit(reference: CycleFit | dict[str, Any] | AnnData, key: str = "cell_cycle") -> CycleFit:
    """A :class:`CycleFit` from a fit, the dict ``tl.cell_cycle`` recorded (``adata.uns["sslcell"][key]``, from
    memory or an ``.h5ad``), or the reference AnnData that holds it under ``key``."""
    from anndata import AnnData

    if isinstance(reference, CycleFit):
        return reference
    if isinstance(reference, AnnData):
        try:
            reference = reference.uns["sslcell"][key]
        except (KeyError, TypeError):
            raise InputError(f"the reference AnnData has no cell-cycle fit under uns['sslcell'][{key!r}]: run "
                             f"tl.cell_cycle on it first (key_added={key!r})") from None
    if not isinstance(reference, dict):
        raise InputError(f"a reference fit is a CycleFit, the dict tl.cell_cycle recorded, or an AnnData holding it; "
                         f"got {type(reference).__name__}")
    missing = {"mean", "basis", "scale", "centre", "radius"} - set(reference)
    if missing:
        raise InputError(f"the reference fit lacks {sorted(missing)}: not a cell-cycle fit")
    values = {k: v for k, v in reference.items() if k in _FIELDS}
    for name in ("anchored",):
        if name in values:
            values[name] = bool(values[name])
    for name in ("phases",):
        if name in values:
            values[name] = [str(p) for p in np.asarray(values[name]).tolist()]
    return CycleFit.from_dict(values)


def cycle_keys(adata: AnnData, key_added: str, overwrite: bool) -> tuple[str, str, str]:
    """The keys a cycle fit or projection writes, ``(theta, phase, plane)``, each checked free (or ``overwrite``),
    the ``uns["sslcell"]`` record too."""
    from sslcell.tl._keys import check_free

    keys = f"{key_added}_theta", f"{key_added}_phase", f"{key_added}_plane"
    check_free(adata, "obs", keys[0], overwrite)
    check_free(adata, "obs", keys[1], overwrite)  # written with phases, removed without: an old fit's phases
    check_free(adata, "obsm", keys[2], overwrite)
    check_free(adata, "record", key_added, overwrite)
    return keys


def write_cycle(adata: AnnData, fit: CycleFit, theta: np.ndarray, plane: np.ndarray,
                keys: tuple[str, str, str]) -> None:
    """Write θ ``(N,)``, the plane ``(N, 2)`` and, with an anchored fit, the phases under :func:`cycle_keys`'s keys;
    without phases an earlier anchored fit's phase column is removed (it would no longer match θ)."""
    import pandas as pd

    theta_key, phase_key, plane_key = keys
    below_2pi = np.nextafter(np.float32(2 * np.pi), np.float32(0))  # float32(2π) rounds up, out of [0, 2π)
    adata.obs[theta_key] = np.minimum(theta.astype(np.float32), below_2pi)
    adata.obsm[plane_key] = plane.astype(np.float32)
    if fit.phases:
        adata.obs[phase_key] = pd.Categorical(fit.phase(theta), categories=fit.phases)
    elif phase_key in adata.obs:
        del adata.obs[phase_key]


def project_cycle(
    adata: AnnData,
    reference: CycleFit | dict[str, Any] | AnnData,
    use_rep: str = "X_sslcell",
    *,
    reference_key: str = "cell_cycle",
    key_added: str = "cell_cycle",
    overwrite: bool = False,
    copy: bool = False,
    warn: bool = True,
) -> AnnData | None:
    """Place the cells of ``adata`` on a reference cycle fit (module doc); nothing is refitted.

    ``reference``: a :class:`CycleFit`, the dict ``tl.cell_cycle`` recorded (``ref.uns["sslcell"]["cell_cycle"]``),
    or the reference AnnData itself (its fit under ``reference_key``). ``obsm[use_rep]`` must be the same
    representation the reference was fitted on (same model, same genes, same width).

    Writes, as ``tl.cell_cycle`` does: ``obs[f"{key_added}_theta"]``, ``obsm[f"{key_added}_plane"]``,
    ``obs[f"{key_added}_phase"]`` (when the reference is anchored) and ``uns["sslcell"][key_added]``: the reference
    fit's fields plus ``projected: True``, ``projected_residual`` (these cells around the reference circle) and
    ``projected_closure`` (how far round it they go: low for one phase, as expected); without phases, an earlier
    fit's ``obs[f"{key_added}_phase"]`` is removed (with ``overwrite=True``). Warns when the cells lie far from the
    reference circle (``projected_residual`` above ``RESIDUAL_WARN`` and ``FARTHER`` times the reference's own
    residual): another representation, or no cycle.
    """
    from sslcell.tl._keys import record, rep_id

    fit = as_fit(reference, reference_key)
    if use_rep not in adata.obsm:
        raise InputError(f"adata.obsm has no {use_rep!r}; it has {list(adata.obsm)}")
    _check_same_space(adata, use_rep, reference, reference_key)
    keys = cycle_keys(adata, key_added, overwrite)
    x = np.asarray(adata.obsm[use_rep])
    theta = fit.theta(x)
    plane = fit.plane(x)
    residual = fit.residual_of(x)
    if warn and residual > max(RESIDUAL_WARN, FARTHER * fit.residual):  # not when as near as the reference's own
        warnings.warn(
            f"these cells lie far from the reference cycle (residual {residual:.2f} around its circle, > "
            f"{RESIDUAL_WARN} and {FARTHER:g}x the reference's own {fit.residual:.2f}): is obsm[{use_rep!r}] the "
            "representation the reference was fitted on (same model, same genes)? θ may mean little.",
            SSLCellWarning, stacklevel=2)
    if copy:
        adata = adata.to_memory() if adata.isbacked else adata.copy()
    write_cycle(adata, fit, theta, plane, keys)
    space = _fitted_space(reference, reference_key) or rep_id(adata, use_rep)  # a projection onto it is checked too
    info = {"use_rep": use_rep, "rep_id": space, **fit.to_dict(), "projected": True, "projected_residual": residual,
            "projected_closure": closure(fit.raw_angle(plane))}
    record(adata, key_added, {k: v for k, v in info.items() if v is not None})  # .h5ad cannot hold None
    return adata if copy else None
