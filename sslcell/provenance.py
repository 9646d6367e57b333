"""Provenance recorded with every checkpoint and result: the versions of the libraries involved."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

CORE = ("sslcell", "torch", "lightly", "pytorch-lightning", "anndata", "scanpy", "numpy", "scikit-learn", "faiss-cpu")


def versions(packages: tuple[str, ...] = CORE) -> dict[str, str]:
    """``{"python": ..., package: version}`` for ``packages`` ("not installed" where absent)."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
