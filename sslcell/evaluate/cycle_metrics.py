"""Scores of a cell-cycle position θ ``(N,)`` (radians) against what is known about the cells.

* :func:`circular_correlation`: against a known continuous angle (Jammalamadaka & SenGupta's circular-circular
  correlation; its sign says whether the two run the same way round).
* :func:`cyclic_spearman`: against a known discrete phase order, after choosing the origin (where the circle is
  cut) and the direction optimally; whoever reports it must say so, as this optimum is taken on the scored cells.
* :func:`phase_arc_accuracy`: the share of cells whose θ falls in their own phase's arc.
* :func:`~sslcell.cellcycle.fit.closure` (re-exported here): how far round the circle the cells go.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import spearmanr

from sslcell.cellcycle.fit import TWO_PI, closure
from sslcell.errors import InputError

__all__ = ["circular_correlation", "closure", "cyclic_spearman", "phase_arc_accuracy"]


def _angles(theta, name: str = "theta") -> np.ndarray:
    t = np.asarray(theta, dtype=np.float64)
    if t.ndim != 1 or t.size < 2 or not np.isfinite(t).all():
        raise InputError(f"{name} must be a finite 1-D array of at least 2 angles (radians); got shape {t.shape}")
    return t


def circular_correlation(theta, truth, *, uniform: bool = False) -> float:
    """Circular-circular correlation in ``[-1, 1]`` of two angle arrays ``(N,)``.

    Default (Jammalamadaka & SenGupta): ``Σ sin(a - ā) sin(b - b̄) / sqrt(Σ sin²(a - ā) Σ sin²(b - b̄))`` with ā, b̄
    the circular means. ``uniform=True``: their form for angles spread uniformly round the circle (Topics in Circular
    Statistics, 2001, section 8.2), ``R(a - b) - R(a + b)`` with R the mean resultant length: 1 when θ is the truth
    turned by any constant, -1 when it runs the other way, about 0 when unrelated. Use it when the truth is uniform
    (a cycle sampled at steady state): there ā and b̄ are noise and the default can take either sign for a right θ.
    """
    a, b = _angles(theta), _angles(truth, "truth")
    if a.shape != b.shape:
        raise InputError(f"theta {a.shape} and truth {b.shape} must have the same shape")
    if uniform:
        return float(np.abs(np.exp(1j * (a - b)).mean()) - np.abs(np.exp(1j * (a + b)).mean()))
    sa = np.sin(a - np.angle(np.exp(1j * a).mean()))
    sb = np.sin(b - np.angle(np.exp(1j * b).mean()))
    denominator = np.sqrt((sa**2).sum() * (sb**2).sum())
    return float((sa * sb).sum() / denominator) if denominator > 0 else 0.0


def _phase_codes(phase, order: Sequence[str], n: int) -> np.ndarray:
    labels = np.asarray(phase, dtype=object).astype(str)
    if labels.shape != (n,):
        raise InputError(f"phase must have one label per cell ({n}); got shape {labels.shape}")
    order = [str(p) for p in order]
    unknown = sorted(set(labels) - set(order))
    if unknown:
        raise InputError(f"phase labels {unknown[:10]} are not in the order {order}")
    return np.array([order.index(v) for v in labels])


def cyclic_spearman(theta, phase, order: Sequence[str], n_origins: int = 360) -> dict[str, float]:
    """Spearman correlation of θ ``(N,)`` with the phases' positions in ``order`` (phase ``(N,)`` labels), with the
    circle cut at the best of ``n_origins`` origins and read in the best direction.

    Returns ``{"spearman", "origin", "direction"}``. The optimum is chosen on the scored cells: say so in reports.
    """
    t = _angles(theta)
    codes = _phase_codes(phase, order, t.size)
    best = {"spearman": -np.inf, "origin": 0.0, "direction": 1.0}
    for direction in (1, -1):
        for origin in np.arange(n_origins) * TWO_PI / n_origins:
            rho = spearmanr(np.mod(direction * t - origin, TWO_PI), codes).statistic
            if np.isfinite(rho) and rho > best["spearman"]:
                best = {"spearman": float(rho), "origin": float(origin), "direction": float(direction)}
    return best


def phase_arc_accuracy(theta, phase, phases: Sequence[str], phase_starts: Sequence[float]) -> float:
    """Share of cells whose θ ``(N,)`` lies in the arc of their own phase; the arcs start at ``phase_starts``
    (radians, increasing from 0, one per phase in ``phases``) and each ends where the next starts."""
    t = np.mod(_angles(theta), TWO_PI)
    starts = np.asarray(phase_starts, dtype=np.float64)
    if starts.shape != (len(phases),) or starts[0] != 0 or (np.diff(starts) <= 0).any() or starts[-1] >= TWO_PI:
        raise InputError(f"phase_starts must increase from 0 below 2π, one per phase; got {list(starts)}")
    codes = _phase_codes(phase, phases, t.size)
    return float(np.mean(np.searchsorted(starts, t, side="right") - 1 == codes))
