"""The supervised baseline of ``crop_classification``: a plain CNN trained from scratch on the labelled crops.

The recipe is issue 14's reference: the ``plain_cnn`` encoder (:class:`~sslcell.encoders.cnn.PlainCNN`: three
blocks of (3x3 conv, batch norm, ReLU) x 2 and a 2x2 max-pool, widths 32-64-128, global average pooling), then
dropout and a linear layer; AdamW (weight decay 0.01) with a one-cycle schedule to ``lr``, cross-entropy with
balanced class weights, flips and 90-degree turns, a fixed number of epochs (raised to reach ``min_steps``
optimiser steps when labels are few). It is trained by :func:`sslcell.classify.train_from_scratch`, the loop that
fine-tunes the sslcell entries, so both sides differ only in their settings (:data:`~sslcell.classify.SCRATCH_RECIPE`
here) and in the pretrained weights. The classifier's input contract standardises each channel with the training
crops' statistics; it predicts (plain or with test-time augmentation) through the same ``tl.predict`` as the sslcell
entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from sslcell.classify import SCRATCH_RECIPE, CellClassifier, FinetuneConfig, train_from_scratch
from sslcell.data.images import CellImages


@dataclass
class CNNSettings:
    """One training run of the CNN: peak learning rate, epochs and the fixed parts of the recipe."""

    lr: float = 3e-3
    epochs: int = 30
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    batch_size: int = 128
    weight_decay: float = 0.01  # torch's AdamW default
    dropout: float = 0.2
    min_steps: int = 0  # epochs raised so that training makes at least this many optimiser steps
    seed: int = 0

    def label(self) -> str:
        return f"lr {self.lr:g}, {self.epochs} epochs" + (f", >= {self.min_steps} steps" if self.min_steps else "")

    def finetune_config(self, device: torch.device) -> FinetuneConfig:
        """The settings of :func:`~sslcell.classify.train_from_scratch` for this run on ``device``."""
        accelerator = {"cuda": "gpu", "mps": "mps"}.get(device.type, "cpu")
        return FinetuneConfig(**{
            **SCRATCH_RECIPE, "lr": self.lr, "epochs": self.epochs, "batch_size": self.batch_size,
            "weight_decay": self.weight_decay, "dropout": self.dropout, "min_steps": self.min_steps,
            "seed": self.seed, "progress_bar": False, "accelerator": accelerator,
        })


def train_cnn(cells: CellImages, codes: np.ndarray, classes: list[str], settings: CNNSettings,
              device: torch.device) -> CellClassifier:
    """Train a plain-CNN classifier from scratch on ``cells`` (``codes (N,)``: class index of each crop into
    ``classes``). Classes without crops are kept as outputs and never predicted. Returns it on the CPU, in eval
    mode (``info``: the run, effective epochs included); the caller's global random state is left as it was."""
    labels = pd.Categorical.from_codes(np.asarray(codes), categories=list(classes))
    classifier = train_from_scratch(cells, labels, settings.finetune_config(device), encoder="plain_cnn",
                                    encoder_options={"widths": list(settings.widths)})
    classifier.info["settings"] = vars(settings).copy()
    return classifier
