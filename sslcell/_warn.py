"""Warnings attributed to the user's line, however deep inside sslcell they are raised."""

from __future__ import annotations

import os
import sys
import warnings

from sslcell.errors import SSLCellWarning

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_user(message: str, category: type[Warning] = SSLCellWarning) -> None:
    """``warnings.warn`` with the stack level of the first caller outside the sslcell package (``read_images``
    and ``CellImages.read`` reach a reader at different depths)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
