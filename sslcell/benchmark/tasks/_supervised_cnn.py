"""The supervised baseline of ``crop_classification``: a plain CNN trained from scratch on the labelled crops.

The recipe is issue 14's reference: three blocks of (3x3 conv, batch norm, ReLU) x 2 and a 2x2 max-pool, widths
32-64-128, global average pooling, then dropout and a linear layer; AdamW with a one-cycle schedule to ``lr``,
cross-entropy with balanced class weights, flips and 90-degree turns (``classify``'s label-preserving
augmentation), a fixed number of epochs. The network is wrapped in a :class:`~sslcell.classify.CellClassifier`
whose input contract standardises each channel with the training crops' statistics, so it predicts (plain or with
test-time augmentation) through the same ``tl.predict`` as the sslcell entries.

It has its own small loop because ``classify.finetune(head="full")`` cannot express this recipe: its encoders come
from a pretraining recipe (no plain CNN), it balances classes by oversampling rather than by loss weights, and its
schedule is warm-up + cosine rather than one-cycle.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslcell.augment.image import ImageAugment
from sslcell.classify import CellClassifier
from sslcell.classify.finetune import LABEL_PRESERVING_AUGMENT
from sslcell.data.image_loader import make_image_dataloader
from sslcell.data.images import CellImages
from sslcell.methods.contracts import ImageContract
from sslcell.methods.inputs import ImageInputs, image_augment_config

log = logging.getLogger(__name__)


class PlainCNN(nn.Module):
    """``(N, C, H, W) -> (N, widths[-1])``: per width, two 3x3 conv-BN-ReLU layers and a 2x2 max-pool; then the
    global average. ``embed_dim`` is ``widths[-1]``."""

    def __init__(self, in_channels: int, widths: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for width in widths:
            for _ in range(2):
                layers += [nn.Conv2d(previous, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                           nn.ReLU(inplace=True)]
                previous = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.embed_dim = int(widths[-1])

    def forward(self, images: Tensor) -> Tensor:
        """``(N, C, H, W)`` standardised crops -> ``(N, embed_dim)``."""
        return self.features(images).mean(dim=(2, 3))


@dataclass
class CNNSettings:
    """One training run of the CNN: peak learning rate, epochs and the fixed parts of the recipe."""

    lr: float = 3e-3
    epochs: int = 30
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    batch_size: int = 128
    weight_decay: float = 0.01  # torch's AdamW default
    dropout: float = 0.2
    seed: int = 0

    def label(self) -> str:
        return f"lr {self.lr:g}, {self.epochs} epochs"


def image_contract(cells: CellImages, seed: int = 0, max_cells: int = 10000) -> ImageContract:
    """The contract a pretraining run would fix on ``cells``: channel names, per-channel mean / std, size, dtype."""
    stats = cells.channel_stats(max_cells=max_cells, seed=seed)
    return ImageContract(channel_names=tuple(cells.channel_names), channel_mean=tuple(stats["mean"]),
                         channel_std=tuple(stats["std"]), image_size=tuple(int(s) for s in cells.shape[2:]),
                         dtype=str(cells.dtype))


def balanced_class_weights(codes: np.ndarray, n_classes: int) -> np.ndarray:
    """``(K,)`` float32: ``n / (K_present * count_k)`` for the classes present in ``codes (N,)``, 0 for the others."""
    counts = np.bincount(codes, minlength=n_classes)
    present = counts > 0
    weights = np.zeros(n_classes, dtype=np.float32)
    weights[present] = len(codes) / (present.sum() * counts[present])
    return weights


def train_cnn(cells: CellImages, codes: np.ndarray, classes: list[str], settings: CNNSettings,
              device: torch.device) -> CellClassifier:
    """Train a :class:`PlainCNN` classifier from scratch on ``cells`` (``codes (N,)``: class index of each crop into
    ``classes``). Classes without crops are kept as outputs and never predicted. Returns it on the CPU, in eval
    mode; the caller's global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        contract = image_contract(cells, settings.seed)
        encoder = PlainCNN(cells.n_channels, tuple(settings.widths))
        classifier = CellClassifier(ImageInputs(contract), encoder, classes,
                                    base={"architecture": "plain_cnn", "widths": list(settings.widths),
                                          "contract": contract.to_dict()}, dropout=settings.dropout)
        weights = balanced_class_weights(codes, len(classes))
        loader = make_image_dataloader(cells, batch_size=min(settings.batch_size, len(codes)), seed=settings.seed,
                                       return_index=True)
        steps = settings.epochs * len(loader.dataset)
        optimizer = torch.optim.AdamW(classifier.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=steps)
        augment = ImageAugment(image_augment_config(LABEL_PRESERVING_AUGMENT))
        generator = torch.Generator(device=device).manual_seed(settings.seed)
        labels = torch.from_numpy(codes.astype(np.int64)).to(device)
        class_weight = torch.from_numpy(weights).to(device)
        classifier.to(device).train()
        for epoch in range(settings.epochs):
            loader.dataset.set_epoch(epoch)
            total, n = 0.0, 0
            for batch, rows in loader:
                x = classifier.inputs.views(batch.to(device), generator, n=1, augment=augment)[0]
                loss = F.cross_entropy(classifier(x), labels[rows.to(device)], weight=class_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total, n = total + float(loss.detach()) * len(rows), n + len(rows)
            log.info("supervised CNN epoch %d/%d: weighted loss %.4f", epoch + 1, settings.epochs, total / max(n, 1))
        with torch.no_grad():  # a class without training crops is never predicted
            classifier.head.bias[torch.from_numpy(weights == 0)] = -1e4
    classifier.info = {"settings": vars(settings).copy(), "n_train": int(len(codes))}
    return classifier.cpu().eval()
