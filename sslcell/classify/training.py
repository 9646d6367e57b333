"""Full fine-tuning of a :class:`CellClassifier`: the Lightning module, the run, precise batch norm.

One loop for a pretrained encoder and for one trained from scratch (the crop benchmark's supervised CNN).
Cells are crops (:class:`~sslcell.data.images.CellImages`, augmented with label-preserving geometry) or counts held in
memory (:class:`~sslcell.data.expression.CountRows`, normalised as the model was pretrained, not augmented: the
head's dropout regularises). Settings come from :class:`~sslcell.classify.finetune.FinetuneConfig` (its docstring
says why each default): the schedule (warm-up + cosine, or one-cycle), class balancing (weighted draws, or
class-weighted cross-entropy) and a minimum number of optimiser steps; the loss and early stopping come from
:mod:`sslcell.classify.objectives`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from sslcell.augment.image import ImageAugment
from sslcell.classify.classifier import CellClassifier
from sslcell.classify.objectives import EarlyStopping, SupervisedLoss, predict_codes
from sslcell.data.image_loader import make_image_dataloader
from sslcell.errors import ConfigError
from sslcell.evaluate.probes import balanced_class_weights
from sslcell.methods.base import step_seed, warmup_cosine
from sslcell.methods.inputs import image_augment_config
from sslcell.train import fit_quietly, on_gpu, resolve_precision

log = logging.getLogger(__name__)


def training_epochs(n_cells: int, config: Any) -> tuple[int, int]:
    """``(epochs, steps per epoch)`` of a run on ``n_cells``: batches of ``min(batch_size, n_cells)``, the last
    partial batch dropped (as the loaders do); ``config.epochs`` raised, if needed, so that the run makes at least
    ``config.min_steps`` optimiser steps."""
    steps = n_cells // min(config.batch_size, n_cells)
    return max(config.epochs, -(-config.min_steps // steps)), steps


class _FinetuneModule(pl.LightningModule):
    def __init__(self, classifier: CellClassifier, cells: Any, codes: np.ndarray, config: Any,
                 validation: tuple[Any, EarlyStopping] | None = None, class_weight: np.ndarray | None = None,
                 weights: np.ndarray | None = None) -> None:
        super().__init__()
        self.classifier, self.config, self.validation = classifier, config, validation
        self.cells, self.weights = cells, weights  # for the batch-norm pass before each validation
        self.register_buffer("codes", torch.from_numpy(codes.astype(np.int64)), persistent=False)
        self.image = classifier.inputs.modality == "image"
        self.augment = ImageAugment(image_augment_config(config.augment)) if self.image else None
        self.loss = SupervisedLoss(config.label_smoothing, config.supcon_weight, config.supcon_temperature,
                                   class_weight=None if class_weight is None else torch.from_numpy(class_weight))
        self.blend = blending(config, len(classifier.classes)) if self.image else None

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        cells, rows = batch
        seed = step_seed(self.config.seed, self.global_step)
        torch.manual_seed(seed)
        if self.image:
            generator = torch.Generator(device=cells.device).manual_seed(seed)
            x = self.classifier.inputs.views(cells, generator, n=1, augment=self.augment)[0]
        else:
            x = self.classifier.inputs.normalize(cells)
        target = self.codes[rows]
        if self.blend is not None:  # crops and labels blended: soft targets (B, K); seeded by the step's seed
            x, target = self.blend(x, target)
        head_input, logits = self.classifier.head_output(self.classifier.features(x))
        loss = self.loss(logits, head_input, target)
        # with blending, agreement with the larger share of each crop's blended label
        accuracy = (logits.argmax(1) == (target if target.ndim == 1 else target.argmax(1))).float().mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(rows))
        self.log("train/accuracy", accuracy, prog_bar=True, batch_size=len(rows))
        n = torch.tensor(float(len(rows)), device=loss.device)
        self._epoch_sums += torch.stack([loss.detach().float() * n, accuracy.detach() * n, n])  # no sync a step
        return loss

    def on_train_epoch_end(self) -> None:
        """Without the progress bar, one line an epoch (logger ``sslcell.classify.training``, shown by the CLI);
        with a validation split, score it and stop when it stops improving."""
        loss, accuracy, n = self._epoch_sums.tolist()
        if not self.config.progress_bar and n:
            log.info("fine-tuning epoch %d/%d: loss %.4f, training accuracy %.3f (%d %s)",
                     self.current_epoch + 1, self.trainer.max_epochs, loss / n, accuracy / n, n,
                     "augmented crops" if self.image else "cells")
        if self.validation is not None:  # scored, and kept when best, as fit_full returns it: batch norm re-estimated
            rows, stopper = self.validation
            with _calibrated_batch_norm(self.classifier, self.cells, self.weights, self.config):
                predicted = predict_codes(self.classifier, rows, self.config.batch_size, self.device)
                stop = stopper.update(self.current_epoch, predicted, self.classifier)
            if stop:
                self.trainer.should_stop = True

    def on_train_epoch_start(self) -> None:
        self._epoch_sums = torch.zeros(3, device=self.device)
        self.trainer.train_dataloader.dataset.set_epoch(self.current_epoch)
        if self.config.encoder_lr_factor == 0:  # a frozen encoder stays as it is: no batch-norm statistics updates
            self.classifier.encoder.eval()

    def configure_optimizers(self) -> Any:
        c = self.config
        head = [p for name, p in self.classifier.named_parameters() if not name.startswith("encoder.")]
        groups = [{"params": head, "lr": c.lr}]
        if c.encoder_lr_factor > 0:
            groups += encoder_groups(self.classifier.encoder, c.lr * c.encoder_lr_factor, c.layer_decay)
        else:
            for p in self.classifier.encoder.parameters():
                p.requires_grad_(False)
        optimizer = torch.optim.AdamW(groups, weight_decay=c.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        if c.schedule == "one_cycle":  # torch's defaults: 30% up from lr/25, cosine down to lr/25e4; Adam's beta1
            # cycles 0.95 -> 0.85 -> 0.95 against the learning rate
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in groups],
                                                            total_steps=total)
        else:
            warmup = int(total * c.warmup_fraction)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                          lambda step: warmup_cosine(step, total, warmup, 0.01))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def blending(config: Any, n_classes: int) -> Any:
    """torchvision's MixUp / CutMix for ``config.mixup`` / ``config.cutmix`` (their Beta alphas; one of the two
    at random per batch when both are on), or None when both are 0. Called as ``blend(x (B, C, H, W), codes (B,))
    -> (blended x, class probabilities (B, K))``; it draws from torch's global generator."""
    from torchvision.transforms import v2

    blends = [kind(alpha=alpha, num_classes=n_classes)
              for kind, alpha in ((v2.MixUp, config.mixup), (v2.CutMix, config.cutmix)) if alpha > 0]
    if not blends:
        return None
    return blends[0] if len(blends) == 1 else v2.RandomChoice(blends)


def encoder_groups(encoder: torch.nn.Module, lr: float, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """The encoder's trainable parameters as optimiser groups: one at ``lr``, or with ``layer_decay < 1`` one per
    layer ``l`` of ``L`` at ``lr * layer_decay ** (L - l)`` (an encoder with ``layer_id`` and ``num_layers``, the
    ViT; layer-wise decay as MAE's fine-tuning)."""
    named = [(name, p) for name, p in encoder.named_parameters() if p.requires_grad]
    if layer_decay == 1.0:
        return [{"params": [p for _, p in named], "lr": lr}]
    layers: dict[int, list[Tensor]] = {}
    for name, p in named:
        layers.setdefault(encoder.layer_id(name), []).append(p)
    return [{"params": params, "lr": lr * layer_decay ** (encoder.num_layers - layer)}
            for layer, params in sorted(layers.items())]


def fit_full(classifier: CellClassifier, cells: Any, codes: np.ndarray, config: Any,
             validation: tuple[Any, EarlyStopping] | None = None) -> dict[str, int]:
    """Train encoder and head together on ``cells`` (crops or :class:`CountRows`; ``codes`` ``(N,)``: the class of
    each), then re-estimate the batch-norm statistics. ``validation``: ``(validation cells, EarlyStopping)``; every
    epoch is scored with its batch-norm statistics re-estimated (:func:`_calibrated_batch_norm`), and the best
    epoch's weights are restored.

    Classes are balanced with the power ``config.oversample``: ``balance="sampling"`` draws a cell of class ``k``
    with weight ``count_k ** -power``; ``balance="loss"`` keeps the natural draws and weights the cross-entropy
    (:func:`balanced_class_weights`). Returns ``{"epochs": planned epochs (raised to reach config.min_steps),
    "steps": optimiser steps made}``. ``config.layer_decay`` and ``config.drop_path`` need a ViT encoder (they are
    refused for others before anything trains); the encoder's own stochastic depth is restored afterwards."""
    kind = type(classifier.encoder).__name__
    if config.layer_decay != 1.0 and not hasattr(classifier.encoder, "layer_id"):
        raise ConfigError(f"layer_decay: needs an encoder with ordered layers (a ViT); {kind} has none, use 1")
    if config.drop_path is not None and not hasattr(classifier.encoder, "set_drop_path"):
        raise ConfigError(f"drop_path: stochastic depth needs a ViT encoder; {kind} has none, leave it unset")
    power = float(config.oversample)
    weights, class_weight = sampling_weights(codes, config), None
    if power > 0 and config.balance != "sampling":
        class_weight = balanced_class_weights(codes, len(classifier.classes), power).astype(np.float32)
    batch_size = min(config.batch_size, len(codes))
    epochs, steps = training_epochs(len(codes), config)
    if epochs > config.epochs:
        log.info("%d cells make %d step(s) an epoch: %d epochs instead of %d, for min_steps=%d", len(codes), steps,
                 epochs, config.epochs, config.min_steps)
    loader = make_image_dataloader(
        cells, batch_size=batch_size, seed=config.seed, weights=weights, return_index=True
    )
    precision = resolve_precision(config.accelerator, config.precision)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator=config.accelerator,
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=config.progress_bar,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    module = _FinetuneModule(classifier, cells, codes, config, validation, class_weight, weights)
    module.train()  # a loaded model comes in eval mode; dropout and batch norm must train here
    drop_path = None
    if config.drop_path is not None:
        drop_path = classifier.encoder.drop_path
        classifier.encoder.set_drop_path(config.drop_path)
    try:
        fit_quietly(trainer, module, loader)
    finally:
        if drop_path is not None:  # the encoder as its description says (inactive in eval mode either way)
            classifier.encoder.set_drop_path(drop_path)
    if validation is not None:
        validation[1].restore(classifier)
    if config.encoder_lr_factor > 0:
        device = torch.device("cuda") if on_gpu(config.accelerator) else torch.device("cpu")
        _recalibrate_batch_norm(classifier.to(device), cells, weights, batch_size, config.seed)
    classifier.cpu()
    return {"epochs": epochs, "steps": int(trainer.global_step)}


def sampling_weights(codes: np.ndarray, config: Any) -> np.ndarray | None:
    """Each training cell's draw weight ``(N,)``, ``count_k ** -oversample`` for its class ``k`` (balance
    "sampling"), or None: natural draws."""
    power = float(config.oversample)
    return np.bincount(codes)[codes] ** -power if power > 0 and config.balance == "sampling" else None


def calibrate_before_training(classifier: CellClassifier, cells: Any, codes: np.ndarray, config: Any) -> None:
    """Before LP-FT's probe is fitted: re-estimate the encoder's batch-norm statistics on ``cells`` drawn as
    fine-tuning will draw them (:func:`_recalibrate_batch_norm`). Batch norm trains on batch statistics; running
    averages from a short pretraining can differ so much that the probe, fitted on eval-mode embeddings, meets
    features shifted by several of their standard deviations in the first training step (cross-entropy in the
    hundreds, an encoder wrecked before it learns). A frozen encoder (``encoder_lr_factor=0``) stays in eval mode."""
    if config.encoder_lr_factor == 0:
        return
    device = torch.device("cuda") if on_gpu(config.accelerator) else torch.device("cpu")
    _recalibrate_batch_norm(classifier.to(device), cells, sampling_weights(codes, config),
                            min(config.batch_size, len(codes)), config.seed)
    classifier.cpu()


@contextmanager
def _calibrated_batch_norm(classifier: CellClassifier, cells: Any, weights: np.ndarray | None,
                           config: Any) -> Iterator[None]:
    """Within: the encoder's batch-norm statistics re-estimated for its current weights on ``cells``, as
    :func:`fit_full` leaves them at the end (:func:`_recalibrate_batch_norm`), so that early stopping scores, and
    keeps, the network it would return; afterwards the running averages and the training mode are put back. A
    frozen encoder, or one without batch norm, is left as it is."""
    encoder = classifier.encoder
    if config.encoder_lr_factor == 0 or not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                                for m in encoder.modules()):
        yield
        return
    saved = {name: buffer.clone() for name, buffer in encoder.named_buffers()}
    training = encoder.training
    _recalibrate_batch_norm(classifier, cells, weights, min(config.batch_size, len(cells)), config.seed)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buffer in encoder.named_buffers():
                buffer.copy_(saved[name])
        encoder.train(training)


@torch.no_grad()
def _recalibrate_batch_norm(classifier: CellClassifier, cells: Any, weights: np.ndarray | None,
                            batch_size: int, seed: int, max_cells: int = 8192) -> None:
    """Re-estimate the encoder's batch-norm statistics for the final weights ("precise BN").

    During fine-tuning batch norm normalises with each batch's statistics, while its running averages trail the
    changing weights (momentum 0.1). After a short run they no longer match the final encoder and its
    predictions in eval mode can collapse to one class. One pass in train mode with cumulative averaging
    (``momentum=None``) over at most ``max_cells`` un-augmented training crops, drawn (seeded) as training drew
    them: with the oversampling ``weights`` when given (``cells``: crops or :class:`CountRows`). The layers after
    batch norm were trained on statistics of class-balanced batches; statistics of the natural class mix would
    shift their inputs.
    """
    norms = [m for m in classifier.encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    rng = np.random.default_rng(seed)
    n = min(len(cells), max_cells)
    if weights is not None:
        rows = rng.choice(len(cells), n, replace=True, p=weights / weights.sum())
    else:
        rows = rng.permutation(len(cells))[:n]
    device = next(classifier.parameters()).device
    classifier.encoder.train()
    for start in range(0, len(rows), batch_size):
        batch = torch.from_numpy(cells.batch(np.sort(rows[start:start + batch_size]))).to(device)
        classifier.encoder(classifier.inputs.normalize(batch))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    classifier.encoder.eval()
