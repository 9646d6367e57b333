"""Place new cells on a cycle fitted before: θ from a reference fit, not from a fit of their own.

A fit needs cells all round the cycle. Cells of a single phase (a second acquisition of G1 cells, a sorted
population) lie on an arc, and a circle fitted through them alone spreads them round the whole circle: θ then says
nothing (``fit_cycle`` warns). Projected onto a fit made on cells of all phases (in the same representation: the
same embedding model, the same cycle-gene PCA, the same recipe), they keep the reference's circle, direction,
origin and phase arcs, so θ falls in their phase's arc. :func:`project_cycle` does that for an AnnData and writes
what ``tl.cell_cycle`` writes; on crops, :meth:`sslcell.cellcycle.recipe.CycleRecipe.apply` does the same.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from sslcell.cellcycle.fit import RESIDUAL_WARN, CycleFit, _as_matrix, closure
from sslcell.errors import InputError, OverwriteError, SSLCellWarning

if TYPE_CHECKING:  # anndata and pandas load on use: importing sslcell.cellcycle stays light
    from anndata import AnnData

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
    return _fitted(reference, key, "rep_id")


def _fitted(reference: Any, key: str, field: str) -> Any:
    """A field of a reference fit's record (an AnnData holding it under ``key``, or the record); None if absent."""
    from anndata import AnnData

    from sslcell.tl._keys import recorded

    fitted = recorded(reference, key) if isinstance(reference, AnnData) else reference
    return fitted.get(field) if isinstance(fitted, Mapping) else None


def as_fit(reference: CycleFit | dict[str, Any] | AnnData, key: str = "cell_cycle") -> CycleFit:
    """A :class:`CycleFit` from a fit, the dict ``tl.cell_cycle`` recorded (``adata.uns["sslcell"][key]``, from
    memory or an ``.h5ad``), or the reference AnnData that holds it under ``key``. A record is checked field by
    field (:meth:`CycleFit.from_record`): a damaged or edited one raises :class:`InputError` naming the field."""
    from anndata import AnnData

    if isinstance(reference, CycleFit):
        return reference
    where = "the reference fit"
    if isinstance(reference, AnnData):
        try:
            reference = reference.uns["sslcell"][key]
        except (KeyError, TypeError):
            raise InputError(f"the reference AnnData has no cell-cycle fit under uns['sslcell'][{key!r}]: run "
                             f"tl.cell_cycle on it first (key_added={key!r})") from None
        where = f"the reference AnnData's uns['sslcell'][{key!r}]"
    if not isinstance(reference, Mapping):
        raise InputError(f"a reference fit is a CycleFit, the dict tl.cell_cycle recorded, or an AnnData holding it; "
                         f"got {type(reference).__name__}")
    return CycleFit.from_record(reference, where)


def _earlier_phases(adata: AnnData, key_added: str) -> bool:
    """Whether ``obs[f"{key_added}_phase"]`` holds the phases of an earlier cell-cycle fit or projection recorded
    under ``key_added`` (not a column of the user's, nor another tool's)."""
    from sslcell.tl._keys import recorded

    earlier = recorded(adata, key_added)
    return f"{key_added}_phase" in adata.obs and "radius" in earlier and np.size(earlier.get("phases", [])) > 0


def cycle_keys(adata: AnnData, key_added: str, overwrite: bool, phases: bool = True) -> tuple[str, str, str]:
    """The keys a cycle fit or projection writes, ``(theta, phase, plane)``, checked free (or ``overwrite``), the
    ``uns["sslcell"]`` record too; every one taken is named. ``phases``: whether this fit writes the phase column;
    without, that column is removed only where an earlier fit recorded under ``key_added`` wrote it."""
    from sslcell.tl._keys import check_free

    keys = f"{key_added}_theta", f"{key_added}_phase", f"{key_added}_plane"
    check_free(adata, "record", key_added, True)  # the record's slot must hold sslcell's records
    taken = [f"adata.obs[{keys[0]!r}] exists"] * (keys[0] in adata.obs)
    if phases and keys[1] in adata.obs:
        taken.append(f"adata.obs[{keys[1]!r}] exists")
    elif not phases and _earlier_phases(adata, key_added):
        taken.append(f"adata.obs[{keys[1]!r}] holds the earlier fit's phases (removed: this fit has none)")
    taken += [f"adata.obsm[{keys[2]!r}] exists"] * (keys[2] in adata.obsm)
    if key_added in adata.uns.get("sslcell", {}):
        taken.append(f"adata.uns['sslcell'][{key_added!r}] holds the record of an earlier result")
    if taken and not overwrite:
        raise OverwriteError(f"{'; '.join(taken)}: these would be replaced; pass overwrite=True or choose another "
                             "key_added")
    return keys


def write_cycle(adata: AnnData, fit: CycleFit, theta: np.ndarray, plane: np.ndarray,
                keys: tuple[str, str, str], key_added: str | None = None) -> None:
    """Write θ ``(N,)``, the plane ``(N, 2)`` and, with an anchored fit, the phases under :func:`cycle_keys`'s keys;
    without phases, the phase column an earlier fit recorded under ``key_added`` wrote is removed (it would no
    longer match θ); a column no such fit wrote is left alone. Call it before recording the new fit."""
    import pandas as pd

    theta_key, phase_key, plane_key = keys
    below_2pi = np.nextafter(np.float32(2 * np.pi), np.float32(0))  # float32(2π) rounds up, out of [0, 2π)
    adata.obs[theta_key] = np.minimum(theta.astype(np.float32), below_2pi)
    adata.obsm[plane_key] = plane.astype(np.float32)
    if fit.phases:
        adata.obs[phase_key] = pd.Categorical(fit.phase(theta), categories=fit.phases)
    elif key_added is not None and phase_key == f"{key_added}_phase" and _earlier_phases(adata, key_added):
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
    ``projected_closure`` (how far round it they go: low for one phase, as expected); without phases, the
    ``obs[f"{key_added}_phase"]`` of an earlier fit recorded under ``key_added`` is removed (with ``overwrite=True``;
    a column no fit recorded there wrote is left alone). Warns when the cells lie far from the
    reference circle (``projected_residual`` above ``RESIDUAL_WARN`` and ``FARTHER`` times the reference's own
    residual): another representation, or no cycle.
    """
    from sslcell.tl._keys import record, rep_id

    fit = as_fit(reference, reference_key)
    if use_rep not in adata.obsm:
        raise InputError(f"adata.obsm has no {use_rep!r}; it has {list(adata.obsm)}")
    _check_same_space(adata, use_rep, reference, reference_key)
    keys = cycle_keys(adata, key_added, overwrite, bool(fit.phases))
    made_on = _fitted(reference, reference_key, "use_rep")
    x = _as_matrix(adata.obsm[use_rep], len(fit.mean), f"obsm[{use_rep!r}]",
                   f"the reference's obsm[{made_on!r}]" if isinstance(made_on, str) else None)
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
    write_cycle(adata, fit, theta, plane, keys, key_added)
    space = _fitted_space(reference, reference_key) or rep_id(adata, use_rep)  # a projection onto it is checked too
    info = {"use_rep": use_rep, "rep_id": space, **fit.to_dict(), "projected": True, "projected_residual": residual,
            "projected_closure": closure(fit.raw_angle(plane))}
    record(adata, key_added, {k: v for k, v in info.items() if v is not None})  # .h5ad cannot hold None
    return adata if copy else None
