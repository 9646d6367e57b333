"""What ``dir()`` (and so tab completion) shows of sslcell's packages: their ``__all__`` (lazy attributes included,
before first use), the submodules already imported and the module's dunders, not the names they import (``Any``,
``warnings``)."""

from __future__ import annotations

from types import ModuleType
from typing import Any


def public_dir(namespace: dict[str, Any]) -> list[str]:
    """``dir()`` of the package whose ``globals()`` are ``namespace``."""
    package = namespace["__name__"]
    loaded = [name for name, value in namespace.items() if not name.startswith("_")
              and isinstance(value, ModuleType) and value.__name__ == f"{package}.{name}"]
    dunders = [name for name in namespace if name.startswith("__") and name.endswith("__")]  # as dir() lists them
    return sorted({*namespace.get("__all__", ()), *loaded, *dunders})
