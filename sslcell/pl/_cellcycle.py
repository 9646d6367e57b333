"""The fitted cell cycle: the plane with the fitted circle, and θ within each phase."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.figure import Figure

from sslcell.cellcycle.fit import TWO_PI
from sslcell.errors import InputError
from sslcell.pl._utils import save

CLASSES_AT_MOST = 12  # a numeric colour column with more distinct values is drawn with a colour map


def cell_cycle(adata: AnnData, color: str | None = None, *, key: str = "cell_cycle", bins: int = 36,
               path: str | Path | None = None) -> Figure:
    """Plots of ``tl.cell_cycle``'s result under ``key``: the scaled 2-D plane with the fitted circle, coloured by θ
    (cyclic colour map) and, when given, by the ``obs`` column ``color`` (a known phase, say; numbers with more than
    ``CLASSES_AT_MOST`` values, a score say, by a colour map); then a histogram of θ for each phase of a class
    ``color`` (or of the fitted phases), one row per phase in cycle order, so phases that follow each other around
    the circle show as a staircase."""
    theta_key, plane_key = f"{key}_theta", f"{key}_plane"
    if theta_key not in adata.obs or plane_key not in adata.obsm or key not in adata.uns.get("sslcell", {}):
        raise InputError(f"no cell-cycle fit under {key!r}: run sslcell.tl.cell_cycle(adata, key_added={key!r})")
    if color is not None and color not in adata.obs:
        raise InputError(f"no obs column {color!r}; columns are {list(adata.obs.columns)}")
    info = adata.uns["sslcell"][key]
    theta = adata.obs[theta_key].to_numpy(dtype=np.float64)
    plane = np.asarray(adata.obsm[plane_key])
    continuous = color is not None and _continuous(adata.obs[color])
    fitted_phases = f"{key}_phase" if f"{key}_phase" in adata.obs else None
    phase_column = color if color is not None and not continuous else fitted_phases
    n_panels = 1 + (color is not None) + (phase_column is not None)
    fig = Figure(figsize=(4.2 * n_panels, 4.0))
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    centre, radius = np.asarray(info["centre"], dtype=float), float(info["radius"])
    circle = centre + radius * np.column_stack([np.cos(np.linspace(0, TWO_PI, 200)),
                                                np.sin(np.linspace(0, TWO_PI, 200))])
    points = axes[0].scatter(plane[:, 0], plane[:, 1], c=theta, cmap="twilight", vmin=0, vmax=TWO_PI, s=4,
                             rasterized=True)
    fig.colorbar(points, ax=axes[0], label="θ (rad)")
    axes[0].set_title(f"θ (closure {info['closure']:.2f}, residual {info['residual']:.2f})")
    panel = 1
    if continuous:  # a score, say: a colour map, as scanpy colours numbers
        values = adata.obs[color].to_numpy(dtype=np.float64)
        shown = axes[panel].scatter(plane[:, 0], plane[:, 1], c=values, cmap="viridis", s=4, rasterized=True)
        fig.colorbar(shown, ax=axes[panel], label=color)
        axes[panel].set_title(color)
        panel += 1
    elif color is not None:
        labels = adata.obs[color].astype("category")
        for name in labels.cat.categories:
            rows = (labels == name).to_numpy()
            axes[panel].scatter(plane[rows, 0], plane[rows, 1], s=4, label=str(name), rasterized=True)
        axes[panel].legend(markerscale=3, fontsize=7, frameon=False)
        axes[panel].set_title(color)
        panel += 1
    for ax in axes[:panel]:
        ax.plot(circle[:, 0], circle[:, 1], color="black", lw=1)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    if phase_column is not None:
        _phase_histograms(axes[panel], theta, adata.obs[phase_column], info, bins)
    fig.tight_layout()
    return save(fig, path)


def _continuous(column: pd.Series) -> bool:
    """Whether an ``obs`` column holds numbers to colour by a colour map (more than ``CLASSES_AT_MOST`` distinct
    values) rather than classes (phase codes 0..3, say)."""
    numeric = pd.api.types.is_numeric_dtype(column.dtype) and not pd.api.types.is_bool_dtype(column.dtype)
    return numeric and not isinstance(column.dtype, pd.CategoricalDtype) and column.nunique() > CLASSES_AT_MOST


def _phase_histograms(ax, theta: np.ndarray, phase: pd.Series, info: dict, bins: int) -> None:
    """One histogram row of θ per phase (cycle order when the fit's phases are these), each scaled to its peak."""
    labels = phase.astype("category")
    order = [str(p) for p in info.get("phases", [])]
    names = order if set(map(str, labels.cat.categories)) <= set(order) else [str(c) for c in labels.cat.categories]
    edges = np.linspace(0, TWO_PI, bins + 1)
    for row, name in enumerate(names):
        counts, _ = np.histogram(theta[(labels.astype(str) == name).to_numpy()], edges)
        height = counts / max(counts.max(), 1) * 0.9
        ax.bar(edges[:-1], height, width=edges[1] - edges[0], bottom=len(names) - 1 - row, align="edge")
    for start in info.get("phase_starts", []):
        ax.axvline(float(start), color="grey", lw=0.8, ls="--")
    ax.set_yticks(np.arange(len(names)) + 0.45, labels=names[::-1])
    ax.set_xlim(0, TWO_PI)
    ax.set_xlabel("θ (rad); dashed: fitted phase arcs")
    ax.set_title(f"θ by {phase.name}")
