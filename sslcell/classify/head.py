"""Train a :class:`CellClassifier`'s MLP head on frozen embeddings (``head="mlp"``).

The encoder is frozen, so the cells are embedded once and the head (hidden layer, GELU, dropout, linear layer) is
trained on the cached embeddings ``(N, D)``, standardised with the training cells' mean and standard deviation
(stored in the classifier). Plain PyTorch, no Lightning: an epoch over a few thousand embeddings takes
milliseconds. AdamW at ``lr``, warm-up and cosine decay, class balancing by weighted draws (``oversample``), the
loss of :class:`~sslcell.classify.objectives.SupervisedLoss` and, with a validation split, early stopping.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from sslcell.classify.classifier import CellClassifier
from sslcell.classify.objectives import EarlyStopping, SupervisedLoss
from sslcell.methods.base import warmup_cosine

log = logging.getLogger(__name__)


def fit_mlp_head(classifier: CellClassifier, x: np.ndarray, codes: np.ndarray, config: Any,
                 validation: tuple[np.ndarray, EarlyStopping] | None = None) -> None:
    """Train ``classifier``'s head on embeddings ``x (N, D)`` with classes ``codes (N,)``; ``validation``:
    ``(validation embeddings (V, D), EarlyStopping)``, whose best epoch's head is restored at the end."""
    mean, std = x.mean(0), x.std(0)
    std[std < 1e-6] = 1.0
    with torch.no_grad():
        classifier.feature_mean.copy_(torch.from_numpy(mean))
        classifier.feature_std.copy_(torch.from_numpy(std))
    z = classifier.standardize(torch.from_numpy(x))
    z_val = classifier.standardize(torch.from_numpy(validation[0])) if validation is not None else None
    y = torch.from_numpy(codes.astype(np.int64))
    head = [p for name, p in classifier.named_parameters() if not name.startswith("encoder.")]
    optimizer = torch.optim.AdamW(head, lr=config.lr, weight_decay=config.weight_decay)
    batch_size = min(config.batch_size, len(y))
    steps_per_epoch = max(len(y) // batch_size, 1)
    total = steps_per_epoch * config.epochs
    warmup = int(total * config.warmup_fraction)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total, warmup, 0.01))
    loss_fn = SupervisedLoss(config.label_smoothing, config.supcon_weight, config.supcon_temperature)
    p = torch.ones(len(y), dtype=torch.float64)
    if config.oversample:
        p = torch.bincount(y).double()[y] ** -float(config.oversample)
    generator = torch.Generator().manual_seed(config.seed)
    for epoch in range(config.epochs):
        classifier.train()
        order = torch.multinomial(p, steps_per_epoch * batch_size, replacement=bool(config.oversample),
                                  generator=generator)
        total_loss = 0.0
        for rows in order.view(steps_per_epoch, batch_size):
            head_input, logits = classifier.head_output(z[rows])
            loss = loss_fn(logits, head_input, y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item()
        if not config.progress_bar:
            log.info("MLP head epoch %d/%d: loss %.4f", epoch + 1, config.epochs, total_loss / steps_per_epoch)
        if validation is not None:
            classifier.eval()
            with torch.no_grad():
                predicted = classifier.head_output(z_val)[1].argmax(1).numpy()
            if validation[1].update(epoch, predicted, classifier):
                break
    if validation is not None:
        validation[1].restore(classifier)
    classifier.eval()
