"""What every plot shares: saving a figure."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from sslcell.errors import InputError


def save(fig: Figure, path: str | Path | None, dpi: int = 150) -> Figure:
    """Save ``fig`` as PNG at ``path`` (parent folders created, an existing PNG replaced) unless ``path`` is None.
    A path not ending in ``.png`` is refused, so a figure never replaces a data file given by mistake."""
    if path is not None:
        path = png_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=dpi, bbox_inches="tight")
    return fig


def png_path(path: str | Path) -> Path:
    """``path`` as a figure's path; one not ending in ``.png`` is refused, so a figure never replaces a data file."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InputError(f"{path}: figures are written as PNG; give a path ending in .png")
    return path
