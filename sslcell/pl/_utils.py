"""What every plot shares: saving a figure."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure


def save(fig: Figure, path: str | Path | None, dpi: int = 150) -> Figure:
    """Save ``fig`` as PNG at ``path`` (parent folders created, an existing file replaced) unless ``path`` is None."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=dpi, bbox_inches="tight")
    return fig
