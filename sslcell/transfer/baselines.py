"""Deprecated module, kept for one release: baselines moved to :mod:`sslcell.evaluate.baselines`."""

import warnings

from sslcell.evaluate.baselines import _counts_matrix, pca_baseline

warnings.warn("sslcell.transfer.baselines moved to sslcell.evaluate.baselines", DeprecationWarning, stacklevel=2)

__all__ = ["_counts_matrix", "pca_baseline"]
