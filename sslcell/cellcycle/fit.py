"""Fit a closed trajectory (the cell cycle) through a representation and place every cell on it: an angle θ.

The method, in three steps (:func:`fit_cycle`):

1. **Plane.** The representation ``(N, D)`` is centred and projected on its first two principal components
   (``D == 2``: used as it is). DeepCycle's descriptor (class log-probabilities), tricycle's cell-cycle-gene PCA
   and an embedding whose main variation is the cycle all put the cycle there.
2. **Circle.** Each axis is scaled to unit variance (an ellipse aligned with the axes becomes a circle) and a
   circle is fitted by least squares (Kåsa's algebraic fit), then refitted on the cells within 2.5 robust standard
   deviations of it (three rounds), so a few outliers do not pull it. θ is each cell's angle around the centre.
   Fitting the centre, not taking the mean, keeps θ right when cells crowd on one arc (G1 is long).
3. **Anchors.** Direction and origin are arbitrary until anchored: with cells labelled by phase (``anchors``, NaN
   for unlabelled cells) and the phases' order around the cycle, every direction and origin (1° steps) is tried;
   each phase gets an arc as wide as its share of the labelled cells, in order from θ = 0; the choice that puts
   the most labelled cells in their own phase's arc wins. θ = 0 is then the start of the first phase, θ grows in
   the phase order, and every cell gets the phase of the arc it falls in. Every phase of the order needs labelled
   cells (a phase without any would get no arc). Three or more phases fix the direction; two fix only the origin
   (two arcs follow each other both ways round, so noise picks the direction): warned.

Quality, recorded with the fit: ``explained_variance`` (share of the representation's variance in the plane),
``residual`` (median |r - R| / R: 0 for cells on the circle; about 0.4 for a round gaussian blob, which has no
cycle), ``closure`` (1 minus the largest empty arc over 2π: 1 when cells go all the way round) and
``closure_unscaled`` (the same around a circle fitted in the plane *without* step 2's axis scaling). The scaling
turns an ellipse into a circle, but it also bends an arc (cells of one phase only, or part of the cycle) into a
horseshoe that looks closed: on a ring's single-phase arcs ``closure`` is 0.75-0.8 while ``closure_unscaled`` is
0.23-0.30 (full rings, ellipses up to 6:1 included: 0.94-0.99). A fit with ``residual > RESIDUAL_WARN``, ``closure
< CLOSURE_WARN`` or ``closure_unscaled < CLOSURE_WARN`` warns that there may be no cycle to find.

**New cells on an existing fit.** :meth:`CycleFit.theta` places any cells on a fitted cycle; that is how cells of
a single phase (an acquisition of G1 cells, say) get a θ in their phase's arc, which no fit of their own can give
them (``sslcell.cellcycle.project.project_cycle`` does it for an AnnData, writing what ``tl.cell_cycle`` writes).
:meth:`CycleFit.residual_of` says how far new cells lie from the fitted circle; :meth:`CycleFit.reanchored` keeps
the circle and takes direction, origin and phase arcs from other labelled cells.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from sslcell._warn import warn_user
from sslcell.errors import InputError, SSLCellWarning

TWO_PI = 2.0 * np.pi
RESIDUAL_WARN = 0.25
CLOSURE_WARN = 0.75
# the anchors contradict the path when fewer labelled cells fall in their own phase's arc than halfway between
# chance (the sum of the phases' squared shares) and all of them
N_ORIGINS = 360

# phase names whose order around the cycle is known (case-insensitive), in that order: the default anchor order
CYCLE_PHASES = ("g0", "g1", "s", "g2", "g2m", "g2/m", "m", "prophase", "prometaphase", "metaphase", "anaphase",
                "telophase", "cytokinesis")


def default_phase_order(labels: Any, categories: Any = None, ordered: bool = False) -> list[str]:
    """The phases' cycle order when none is given. θ grows in this order, so it must not be a sort by name
    (``["G1", "G2M", "S"]`` would run the cycle backwards). A categorical's categories are used when they were set
    on purpose (``ordered``, or not in sorted order); otherwise known phase names (:data:`CYCLE_PHASES`: G1, S,
    G2, G2M, M, prophase ... telophase) are put in cycle order. Other names raise: pass the order.

    Args:
        labels: the anchored cells' phase labels ``(N,)`` (unlabelled cells left out).
        categories: a categorical column's categories, in its order; ``None`` for plain labels.
        ordered: whether that categorical is ordered.
    """
    if categories is not None:
        names = [str(c) for c in categories]
        if ordered or names != sorted(names):
            return names
    names = sorted({str(v) for v in labels})  # sorted by name: only the phases that have cells
    if len(names) <= 2:  # two arcs follow each other both ways round: their order sets only the origin
        return names
    if all(n.lower() in CYCLE_PHASES for n in names):
        return sorted(names, key=lambda n: CYCLE_PHASES.index(n.lower()))
    raise InputError(f"the cycle order of the phases {names} is not known (only a sort by name, which would set "
                     "θ's direction by the alphabet): give it as anchor_order=[...], or make the "
                     "column an ordered categorical")


@dataclass
class CycleFit:
    """A fitted cycle: how to map a representation ``(N, D)`` to θ ``(N,)``, and how well it fitted.

    ``mean (D,)`` and ``basis (D, 2)`` give the plane, ``scale (2,)`` the axis scaling, ``centre (2,)`` and
    ``radius`` the circle in the scaled plane, ``direction`` (±1) and ``origin`` (radians) the anchoring. With
    anchors, ``phases`` lists them in cycle order and ``phase_starts`` the start of each phase's arc.
    """

    mean: list[float]
    basis: list[list[float]]
    scale: list[float]
    centre: list[float]
    radius: float
    direction: int = 1
    origin: float = 0.0
    explained_variance: float = 1.0
    residual: float = 0.0
    closure: float = 1.0
    closure_unscaled: float | None = None  # closure around a circle fitted without axis scaling (None: older fits)
    anchored: bool = False
    anchor_accuracy: float | None = None
    anchor_chance: float | None = None  # the share expected by chance: sum of the phases' squared shares
    phases: list[str] = field(default_factory=list)
    phase_starts: list[float] = field(default_factory=list)
    method: str = "circle fit in the 2-D principal plane (axes scaled to unit variance), robust refit"

    def plane(self, x: np.ndarray) -> np.ndarray:
        """Representation ``(N, D)`` -> scaled plane coordinates ``(N, 2)``."""
        x = _as_matrix(x, len(self.mean))
        return ((x - np.asarray(self.mean)) @ np.asarray(self.basis)) / np.asarray(self.scale)

    def raw_angle(self, plane: np.ndarray) -> np.ndarray:
        """Scaled plane coordinates ``(N, 2)`` -> angle around the circle's centre, before anchoring ``(N,)``."""
        d = plane - np.asarray(self.centre)
        return np.mod(np.arctan2(d[:, 1], d[:, 0]), TWO_PI)

    def theta(self, x: np.ndarray) -> np.ndarray:
        """Representation ``(N, D)`` -> θ ``(N,)`` in ``[0, 2π)``, anchored."""
        return self._anchor(self.raw_angle(self.plane(x)))

    def residual_of(self, x: np.ndarray) -> float:
        """Median ``|r - R| / R`` of cells ``x (N, D)`` around this fit's circle (``residual`` for other cells: near
        the fit's own residual when they lie on the same cycle, about 0.4 or more when they do not)."""
        r = np.linalg.norm(self.plane(x) - np.asarray(self.centre), axis=1)
        return float(np.median(np.abs(r - self.radius)) / self.radius)

    def reanchored(self, x: np.ndarray, anchors: Any, order: list[str] | None = None, warn: bool = True) -> CycleFit:
        """The same circle, anchored anew by labelled cells ``x (N, D)`` (``anchors``, ``order`` as in
        :func:`fit_cycle`): direction, origin and phase arcs come from them. Returns a new :class:`CycleFit`."""
        fit = CycleFit.from_dict(self.to_dict())
        _anchor(fit, self.raw_angle(self.plane(x)), anchors, order)
        if warn:
            _warn_contradiction(fit)
            _warn_two_phases(fit)
        return fit

    def phase(self, theta: np.ndarray) -> np.ndarray:
        """θ ``(N,)`` -> the phase whose arc holds it ``(N,)`` (object array); requires an anchored fit."""
        if not self.phases:
            raise InputError("this cycle fit has no phases: fit it with anchors and their order")
        return np.asarray(self.phases, dtype=object)[np.searchsorted(self.phase_starts, theta, side="right") - 1]

    def _anchor(self, raw: np.ndarray) -> np.ndarray:
        return np.mod(self.direction * raw - self.origin, TWO_PI)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (``adata.uns``: fields that are None are left out, as ``.h5ad`` cannot hold None;
        :meth:`from_dict` restores them as None)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CycleFit:
        return cls(**{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in values.items()})

    @classmethod
    def from_record(cls, values: Any, where: str, error: type[InputError] = InputError) -> CycleFit:
        """A fit from a stored record (``adata.uns["sslcell"][key]``, a recipe's ``cycle.json``), each field it uses
        checked first: numbers, ``basis (D, 2)`` matching ``mean (D,)``, ``scale`` and ``centre`` of 2, finite values,
        ``radius`` and ``scale`` > 0, ``direction`` ±1, one ``phase_starts`` per phase, rising from 0 within
        ``[0, 2π)``. Other keys are ignored. A bad field raises ``error`` naming ``where`` and the field."""
        if not isinstance(values, Mapping):
            raise error(f"{where}: a cell-cycle fit is a dict of its fields; got {type(values).__name__}")
        missing = [k for k in ("mean", "basis", "scale", "centre", "radius") if k not in values]
        if missing:
            raise error(f"{where}: the fit lacks {missing}: not a cell-cycle fit")

        def fail(name: str, problem: str) -> InputError:
            return error(f"{where}: the fit's {name!r} {problem}; the fit was damaged or edited: fit it again")

        def numbers(name: str, shape: tuple[int, ...] | None = None, ndim: int = 0) -> np.ndarray:
            try:
                value = np.asarray(values[name])
            except ValueError:  # ragged lists
                raise fail(name, "is not an array of numbers") from None
            if value.dtype.kind not in "iuf" and not (value.size == 0 and value.dtype.kind in "OU"):
                raise fail(name, f"is not numbers ({str(values[name])[:40]!r})")
            if (shape is not None and value.shape != shape) or (shape is None and value.ndim != ndim):
                wanted = str(shape) if shape is not None else f"{ndim} dimension(s)"
                raise fail(name, f"has shape {value.shape}, not {wanted}")
            value = value.astype(np.float64)
            if not np.isfinite(value).all():
                raise fail(name, "holds NaN or inf values")
            return value

        mean = numbers("mean", ndim=1)
        if mean.size < 2:
            raise fail("mean", f"has {mean.size} values (a fit is made on D >= 2 dimensions)")
        basis, scale, centre = numbers("basis", (mean.size, 2)), numbers("scale", (2,)), numbers("centre", (2,))
        radius = float(numbers("radius", ()))
        if radius <= 0 or (scale <= 0).any():
            raise fail("radius" if radius <= 0 else "scale", f"is {radius if radius <= 0 else scale.tolist()}: "
                       "radius and scale are > 0")
        direction = float(numbers("direction", ())) if "direction" in values else 1.0
        if direction not in (1.0, -1.0):
            raise fail("direction", f"is {values['direction']!r}, not 1 or -1")
        extra = {k: float(numbers(k, ())) for k in ("origin", "explained_variance", "residual", "closure",
                                                    "closure_unscaled", "anchor_accuracy", "anchor_chance")
                 if k in values and values[k] is not None}
        anchored = values.get("anchored", False)
        if np.asarray(anchored).dtype.kind not in "biu" or np.ndim(anchored) != 0 or anchored not in (0, 1):
            raise fail("anchored", f"is {anchored!r}, not True or False")
        phases = values.get("phases", [])
        try:
            phases = np.asarray(phases).tolist() if np.ndim(phases) == 1 else phases
        except ValueError:  # ragged lists
            pass
        if not isinstance(phases, list) or not all(isinstance(p, str) for p in phases):
            raise fail("phases", f"is {str(values['phases'])[:60]!r}, not a list of phase names")
        if len(set(phases)) != len(phases):
            raise fail("phases", f"repeats a phase ({phases})")
        if "phase_starts" not in values and phases:
            raise fail("phase_starts", f"is missing (the phases {phases} need their arcs' starts)")
        starts = numbers("phase_starts", ndim=1) if phases or "phase_starts" in values else np.zeros(0)
        if starts.size != len(phases):
            raise fail("phase_starts", f"holds {starts.size} starts for the {len(phases)} phases {phases}")
        if phases and not (abs(starts[0]) < 1e-12 and (np.diff(starts) >= 0).all() and starts[-1] <= TWO_PI + 1e-9):
            raise fail("phase_starts", f"{np.round(starts, 4).tolist()} do not rise from 0 within [0, 2π] (one "
                       "start per phase, in cycle order)")
        empty = [p for p, w in zip(phases, np.diff(np.r_[starts, TWO_PI]), strict=True) if w <= 0]
        if empty:  # a fit from before sslcell refused phases without anchored cells
            warn_user(f"{where}: the phase(s) {empty} have an empty arc (no anchored cell when it was fitted), so no "
                      "cell is placed in them; fit it again with every phase anchored")
        method = values.get("method", cls.method)
        if not isinstance(method, str):
            raise fail("method", f"is {method!r}, not a text")
        return cls(mean=mean.tolist(), basis=basis.tolist(), scale=scale.tolist(), centre=centre.tolist(),
                   radius=radius, direction=int(direction), anchored=bool(anchored), phases=phases,
                   phase_starts=starts.tolist(), method=method, **extra)


def fit_cycle(x: np.ndarray, anchors: np.ndarray | None = None, order: list[str] | None = None,
              warn: bool = True, *, what: str = "the representation", anchors_what: str = "") -> CycleFit:
    """Fit a cycle through ``x (N, D)`` (module doc). ``anchors (N,)``: each cell's phase label or NaN / None;
    ``order``: the phases in cycle order (default: :func:`default_phase_order`), each with labelled cells; three or
    more fix origin and direction, two only the origin (warned). ``what`` and ``anchors_what`` name ``x`` and the
    anchors in errors (``"obsm['X']"``, ``"obs['phase']"``).
    Returns the :class:`CycleFit`."""
    x = _as_matrix(x, what=what)
    mean = x.mean(axis=0)
    centred = x - mean
    if x.shape[1] == 2:
        basis, explained = np.eye(2), 1.0
    else:
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        basis, total = vt[:2].T, float((s**2).sum())
        explained = float((s[:2] ** 2).sum() / total) if total > 0 else 0.0
    plane = centred @ basis
    scale = plane.std(axis=0)
    if (scale <= 1e-12 * max(1.0, float(np.abs(x).max()))).any():
        raise InputError("the representation does not vary in two directions: no cycle can be fitted")
    plane = plane / scale
    centre, radius = _robust_circle(plane)
    fit = CycleFit(mean=mean.tolist(), basis=basis.tolist(), scale=scale.tolist(), centre=centre.tolist(),
                   radius=float(radius), explained_variance=explained)
    raw = fit.raw_angle(plane)
    r = np.linalg.norm(plane - centre, axis=1)
    fit.residual = float(np.median(np.abs(r - radius)) / radius)
    fit.closure = closure(raw)
    # the same circle fit without the axis scaling (isotropic units): an arc stays an arc (module doc)
    iso = plane * scale / scale.max()
    iso_centre, _ = _robust_circle(iso)
    fit.closure_unscaled = closure(np.arctan2(iso[:, 1] - iso_centre[1], iso[:, 0] - iso_centre[0]))
    if anchors is not None:
        _anchor(fit, raw, anchors, order, anchors_what)
        if warn:
            _warn_contradiction(fit, stacklevel=3)
            _warn_two_phases(fit)
    failed = ([f"residual {fit.residual:.2f} > {RESIDUAL_WARN} (a blob, not a ring)"] * (fit.residual > RESIDUAL_WARN)
              + [f"closure {value:.3f}{how} < {CLOSURE_WARN} (an arc, not a ring, e.g. cells of one phase only)"
                 for value, how in ((fit.closure, ""), (fit.closure_unscaled, " without axis scaling"))
                 if value < CLOSURE_WARN])
    if warn and failed:
        warnings.warn(
            f"the cells may not lie on a closed trajectory: {'; '.join(failed)}; θ may mean little. Check "
            "pl.cell_cycle, or fit on a representation that holds the cycle (e.g. a fine-tuned phase classifier's "
            "outputs, or cell-cycle genes); to place cells of one phase, project them onto a fit made on cells of "
            "all phases (CycleFit.theta, sslcell.cellcycle.project.project_cycle, CycleRecipe.apply).",
            SSLCellWarning, stacklevel=2)
    return fit


def _warn_contradiction(fit: CycleFit, stacklevel: int = 3) -> None:
    if fit.anchor_accuracy < (1 + fit.anchor_chance) / 2:
        warnings.warn(
            f"the anchors contradict the fitted path: at best {fit.anchor_accuracy:.0%} of the labelled cells fall "
            f"in their phase's arc (by chance {fit.anchor_chance:.0%}; order {fit.phases}); check the phase order "
            "and the labels", SSLCellWarning, stacklevel=stacklevel)


def _warn_two_phases(fit: CycleFit) -> None:
    if len(fit.phases) == 2:
        warn_user(f"two anchored phases {fit.phases} set θ's origin but not its direction: their arcs follow each "
                  "other both ways round, so noise chose it (θ may run backwards); anchor at least three phases in "
                  "cycle order to fix the direction")


def closure(theta: np.ndarray) -> float:
    """1 minus the largest empty arc between consecutive angles ``(N,)``, over 2π: 1 when the cells cover the whole
    circle evenly (large N), 0.5 when they fill only half of it."""
    t = np.sort(np.mod(np.asarray(theta, dtype=np.float64), TWO_PI))
    if t.size == 0:
        return 0.0
    gaps = np.diff(np.concatenate([t, [t[0] + TWO_PI]]))
    return float(1.0 - gaps.max() / TWO_PI)


def _as_matrix(x: Any, width: int | None = None, what: str = "the representation",
               made_on: str | None = None) -> np.ndarray:
    """``x`` as float64 ``(N, D)``: N >= 3 cells to fit a cycle (``width`` None), N >= 1 to place cells on a fit
    made on ``width`` dimensions (``made_on``: what that fit was made on, for the message). ``what`` names ``x``."""
    x = np.asarray(x, dtype=np.float64)
    if width is not None and (x.ndim != 2 or x.shape[0] < 1):
        raise InputError(f"cells are placed on a cycle from a representation (N >= 1 cells, D); {what} has shape "
                         f"{x.shape}")
    if width is None and (x.ndim != 2 or x.shape[0] < 3 or x.shape[1] < 2):
        raise InputError(f"a cycle is fitted to a representation (N >= 3 cells, D >= 2); {what} has shape {x.shape}")
    if width is not None and x.shape[1] != width:
        raise InputError(f"{what} has {x.shape[1]} dimensions; this fit was made on {width}"
                         + (f" ({made_on})" if made_on else ""))
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise InputError(f"{what} holds NaN or inf values in {bad.size} row(s) of {x.shape[0]} (rows "
                         f"{', '.join(map(str, bad[:5]))}{', ...' if bad.size > 5 else ''}; 0-based)")
    return x


def _circle(p: np.ndarray) -> tuple[np.ndarray, float]:
    """Kåsa's least-squares circle through points ``(N, 2)``: solve x² + y² = 2ax + 2by + c."""
    a = np.column_stack([2 * p, np.ones(len(p))])
    b = (p**2).sum(axis=1)
    (cx, cy, c), *_ = np.linalg.lstsq(a, b, rcond=None)
    return np.array([cx, cy]), float(np.sqrt(max(c + cx**2 + cy**2, 1e-12)))


def _robust_circle(p: np.ndarray, rounds: int = 3, cut: float = 2.5) -> tuple[np.ndarray, float]:
    centre, radius = _circle(p)
    for _ in range(rounds):
        resid = np.linalg.norm(p - centre, axis=1) - radius
        spread = 1.4826 * np.median(np.abs(resid - np.median(resid)))
        keep = np.abs(resid) <= cut * max(spread, 1e-12)
        if keep.sum() < 3 or keep.all():
            break
        centre, radius = _circle(p[keep])
    return centre, radius


def _anchor(fit: CycleFit, raw: np.ndarray, anchors: Any, order: list[str] | None, what: str = "") -> None:
    """Choose direction and origin from labelled cells (module doc); sets the fit's phases and arcs."""
    labels = np.asarray(anchors, dtype=object)
    if labels.shape != raw.shape:
        raise InputError(f"anchors must have one label per cell ({raw.shape[0]}); got shape {labels.shape}")
    known = np.array([v is not None and not (isinstance(v, float) and np.isnan(v)) for v in labels])
    labels = labels[known].astype(str)
    order = [str(p) for p in order] if order is not None else default_phase_order(labels)
    if len(order) < 2 or len(set(order)) != len(order):
        raise InputError(f"the anchor order must name at least 2 distinct phases; got {order}")
    unknown = sorted(str(v) for v in set(labels) - set(order))  # str: no np.str_ reprs in the message
    if unknown:
        raise InputError(f"anchor labels {unknown[:10]} are not in the phase order {order}")
    codes = np.array([order.index(v) for v in labels], dtype=np.int64)
    counts = np.bincount(codes, minlength=len(order))
    if (counts == 0).any():
        empty = [p for p, n in zip(order, counts, strict=True) if n == 0]
        held = ", ".join(f"{p} {n}" for p, n in zip(order, counts, strict=True) if n) or "none"
        raise InputError(
            f"{what + ': ' if what else ''}no cell is anchored in the phase(s) {empty} of the anchor order {order} "
            f"(anchored cells per phase: {held}): each phase's arc is as wide as its share of the anchored cells, so "
            "these would get none and their cells would be called other phases. Label cells of every phase, or leave "
            "these phases out of anchor_order (a categorical column's unused categories count as phases: "
            "column.cat.remove_unused_categories())")
    starts = TWO_PI * np.concatenate([[0.0], np.cumsum(counts)[:-1]]) / counts.sum()
    best = (-1.0, 1, 0.0)
    for direction in (1, -1):
        angles = direction * raw[known]
        for origin in np.arange(N_ORIGINS) * TWO_PI / N_ORIGINS:
            arc = np.searchsorted(starts, np.mod(angles - origin, TWO_PI), side="right") - 1
            accuracy = float(np.mean(arc == codes))
            if accuracy > best[0]:
                best = (accuracy, direction, float(origin))
    fit.anchor_accuracy, fit.direction, fit.origin = best
    fit.anchor_chance = float(((counts / counts.sum()) ** 2).sum())
    fit.anchored, fit.phases, fit.phase_starts = True, order, starts.tolist()
