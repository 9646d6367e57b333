"""Deprecated module, kept for one release: probes and protocols moved to :mod:`sslcell.evaluate`."""

import warnings

from sslcell.evaluate.probes import Probe, make_probe
from sslcell.evaluate.protocols import cross_validated_scores, few_label_scores, few_label_split

warnings.warn("sslcell.transfer.probes moved to sslcell.evaluate", DeprecationWarning, stacklevel=2)

__all__ = ["Probe", "cross_validated_scores", "few_label_scores", "few_label_split", "make_probe"]
