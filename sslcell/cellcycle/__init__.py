"""Cell-cycle trajectory reconstruction: a closed path through a representation and a position θ for every cell.

* :mod:`~sslcell.cellcycle.fit`: :func:`fit_cycle` -> :class:`CycleFit` (the method and its quality measures).
* :mod:`~sslcell.cellcycle.project`: :func:`project_cycle` places new cells (of one phase, say) on a fit made before.
* Scores of θ: :mod:`sslcell.evaluate.cycle_metrics`. AnnData entry points: ``sslcell.tl.cell_cycle`` and
  ``sslcell.pl.cell_cycle``.
"""

from __future__ import annotations

from sslcell.cellcycle.fit import CycleFit, closure, fit_cycle
from sslcell.cellcycle.project import project_cycle

__all__ = ["CycleFit", "closure", "fit_cycle", "project_cycle"]
