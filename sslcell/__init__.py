"""sslcell: self-supervised representation learning on single cells.

    import sslcell
    model = sslcell.pretrain(sslcell.load_config("configs/expression_mae.yaml"), "cells.h5ad", "runs/mae")
    sslcell.tl.embed(adata, model)              # adata.obsm["X_sslcell"]
    report = sslcell.tl.evaluate(adata, label_key="cell_type")
"""

from importlib.metadata import PackageNotFoundError, version

from sslcell import pl, tl
from sslcell.checkpoint import load, save_model
from sslcell.config import RecipeConfig, load_config
from sslcell.train import pretrain

try:
    __version__ = version("sslcell")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["pl", "tl", "load", "save_model", "RecipeConfig", "load_config", "pretrain", "__version__"]
