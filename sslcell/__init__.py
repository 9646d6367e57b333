"""sslcell: self-supervised representation learning on single cells.

    import sslcell
    model = sslcell.pretrain(sslcell.load_config("configs/expression_mae.yaml"), "cells.h5ad", "runs/mae")
    sslcell.tl.embed(adata, model)                       # adata.obsm["X_sslcell"]
    report = sslcell.tl.evaluate(adata, label_key="cell_type")

    cells = sslcell.read_images("crops.npz", channels=[0, 2])   # (N, C, H, W) uint8/uint16, lazy
    model = sslcell.pretrain(sslcell.load_config("configs/image_mae.yaml"), cells, "runs/img")
    adata = sslcell.tl.embed_crops(cells, model)         # new AnnData: crops' obs + obsm["X_sslcell"]
    clf = sslcell.classify.finetune(cells, model, label_key="label")
    sslcell.tl.predict(adata, clf, crops=cells, label_key="label")   # obs["sslcell_pred"], uns metrics

Attributes load on first use: ``import sslcell`` imports neither torch's training stack (Lightning) nor scanpy,
and never changes the matplotlib backend.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from sslcell._namespace import public_dir

try:
    __version__ = version("sslcell")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

# public name -> (module, attribute or None for the module itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    "classify": ("sslcell.classify", None),
    "evaluate": ("sslcell.evaluate", None),
    "pl": ("sslcell.pl", None),
    "tl": ("sslcell.tl", None),
    "transfer": ("sslcell.transfer", None),
    "CellImages": ("sslcell.data.images", "CellImages"),
    "RecipeConfig": ("sslcell.config", "RecipeConfig"),
    "load": ("sslcell.checkpoint", "load"),
    "load_config": ("sslcell.config", "load_config"),
    "pretrain": ("sslcell.train", "pretrain"),
    "save_model": ("sslcell.checkpoint", "save_model"),
}

__all__ = [*_LAZY, "read_images", "__version__"]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from sslcell import classify, evaluate, pl, tl, transfer  # noqa: F401
    from sslcell.checkpoint import load, save_model  # noqa: F401
    from sslcell.config import RecipeConfig, load_config  # noqa: F401
    from sslcell.data.images import CellImages  # noqa: F401
    from sslcell.train import pretrain  # noqa: F401


def read_images(*args: Any, **kwargs: Any) -> Any:
    """Read crops: :meth:`sslcell.data.images.CellImages.read` (npz, zarr, or a folder of TIFF/PNG crops)."""
    from sslcell.data.images import CellImages

    return CellImages.read(*args, **kwargs)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'sslcell' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = importlib.import_module(module)
    value = value if attribute is None else getattr(value, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return public_dir(globals())
