"""Plots. Every function returns its ``matplotlib`` figure and, given ``path``, also saves it as PNG.

Nothing here changes the user's matplotlib backend.

* :func:`umap`: a UMAP of an embedding in ``obsm``, coloured by ``obs`` columns.
* :func:`confusion_matrix`, :func:`roc_curves`: a classifier's scores (:mod:`sslcell.evaluate.metrics`).
* :func:`cell_cycle`: ``tl.cell_cycle``'s fit: the plane with the fitted circle, θ by phase.
"""

from sslcell._namespace import public_dir
from sslcell.pl._cellcycle import cell_cycle
from sslcell.pl._classification import confusion_matrix, roc_curves
from sslcell.pl._embedding import umap

__all__ = ["cell_cycle", "confusion_matrix", "roc_curves", "umap"]


def __dir__() -> list[str]:
    return public_dir(globals())
