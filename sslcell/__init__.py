"""sslcell: self-supervised representation learning on single cells.

    import sslcell
    model = sslcell.pretrain(sslcell.load_config("configs/expression_mae.yaml"), "cells.h5ad", "runs/mae")
    sslcell.tl.embed(adata, model)              # adata.obsm["X_sslcell"]
    report = sslcell.tl.evaluate(adata, label_key="cell_type")

    cells = sslcell.read_images("crops.npz", channels=[0, 2])   # (N, C, H, W) uint8/uint16, lazy
    model = sslcell.pretrain(sslcell.load_config("configs/image_mae.yaml"), cells, "runs/img")
    adata = sslcell.tl.embed(cells, model)      # new AnnData: crops' obs + obsm["X_sslcell"]
    clf = sslcell.classify.finetune(model, cells, "label")
    pred, report = sslcell.classify.predict(clf, cells, label_key="label")
"""

from importlib.metadata import PackageNotFoundError, version

from sslcell import classify, pl, tl
from sslcell.checkpoint import load, save_model
from sslcell.config import RecipeConfig, load_config
from sslcell.data.images import CellImages
from sslcell.train import pretrain

read_images = CellImages.read

try:
    __version__ = version("sslcell")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["classify", "pl", "tl", "CellImages", "read_images", "load", "save_model", "RecipeConfig", "load_config", "pretrain", "__version__"]
