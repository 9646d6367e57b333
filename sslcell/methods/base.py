"""The shared Lightning module: optimiser, schedule, per-step seeding, exact resume bookkeeping.

A method subclass supplies ``loss(batch, generator) -> (loss, logs)``; the modality's :class:`Inputs`
supplies normalisation, augmented views and the input contract.
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from lightly.models.utils import update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import Tensor, nn

from sslcell.config import RecipeConfig
from sslcell.methods.inputs import Inputs


class SSLModule(pl.LightningModule):
    """An encoder trained by a self-supervised objective.

    Attributes:
        config: the recipe it was built from.
        inputs: the modality's input contract (genes or channels, normalisation, augmentation).
        encoder: ``(N, *input_shape) -> (N, D)``; ``embed_dim`` is ``D``.
    """

    def __init__(self, config: RecipeConfig, inputs: Inputs, encoder: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.inputs = inputs
        self.encoder = encoder
        self.embed_dim: int = encoder.embed_dim
        self._batches_done = 0  # batches finished in the current epoch, saved for exact mid-epoch resume
        self._resume_state: dict[str, int] | None = None

    # --- to be supplied by each method -------------------------------------------------------
    def loss(self, batch: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def before_step(self) -> None:
        """Called at the start of each training step, before the loss (momentum updates, as in lightly's examples)."""

    # --- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, batch: Tensor, *, normalized: bool = False) -> Tensor:
        """Raw model input (counts ``(N, G)`` or images ``(N, C, H, W)``) -> embedding ``(N, D)`` float32.

        With ``normalized=True`` the batch has already been through ``inputs.normalize``.
        """
        was_training = self.training
        self.eval()
        try:
            x = batch.to(self.device)
            x = x.float() if normalized else self.inputs.normalize(x)
            return self.encoder(x).float()
        finally:
            self.train(was_training)

    # --- training -------------------------------------------------------------------------------
    @property
    def step_seed(self) -> int:
        """A seed fixed by (recipe seed, global step, rank): resuming reproduces the same randomness."""
        return step_seed(self.config.train.seed, self.global_step, self.global_rank)

    def _train_dataset(self) -> Any:
        return getattr(self.trainer.train_dataloader, "dataset", None)

    def on_train_start(self) -> None:
        # A run restored mid-epoch gets no ``on_train_epoch_start`` for that epoch. ``train.pretrain`` has already
        # put the loader at the saved batch (before fit: Lightning makes the epoch's iterator, and starts its
        # workers, before any hook runs), so only the count of finished batches is restored here.
        resume, self._resume_state = self._resume_state, None
        if resume and 0 < resume["batches_done"] < self.trainer.num_training_batches:
            self._batches_done = resume["batches_done"]

    def on_train_epoch_start(self) -> None:
        dataset = self._train_dataset()
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.current_epoch)
        self._batches_done = 0

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        torch.manual_seed(self.step_seed)  # dropout and any other global randomness
        self.before_step()
        generator = torch.Generator(device=batch.device).manual_seed(self.step_seed)
        loss, logs = self.loss(batch, generator)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch.shape[0])
        for name, value in logs.items():
            self.log(f"train/{name}", value, batch_size=batch.shape[0])
        self._batches_done += 1
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["sslcell_loader"] = {"epoch": int(self.current_epoch), "batches_done": int(self._batches_done)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resume_state = checkpoint.get("sslcell_loader")

    def configure_optimizers(self) -> Any:
        opt = self.config.optim
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=opt.lr,
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(total * opt.warmup_fraction)
        schedule = lambda step: warmup_cosine(step, total, warmup, opt.min_lr_fraction)  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @property
    def training_progress(self) -> float:
        """Fraction of planned optimiser steps done, in [0, 1] (for momentum schedules)."""
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        return min(self.global_step / total, 1.0)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of one training step: fixed by (run seed, global step, rank), so a resumed run draws the same."""
    return (seed * 1_000_003 + step * 7919 + rank) % (2**63 - 1)


def warmup_cosine(step: int, total: int, warmup: int, floor: float) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class TwoViewMethod(SSLModule):
    """Joint-embedding methods scored on the projections of two augmented views.

    Subclasses set ``self.projection`` (a lightly head) and ``self.criterion`` (a lightly loss).
    """

    projection: nn.Module
    criterion: nn.Module

    def loss(self, batch: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        x0, x1 = self.inputs.views(batch, generator)
        z0, z1 = self.projection(self.encoder(x0)), self.projection(self.encoder(x1))
        return self.criterion(z0.float(), z1.float()), {}


class MomentumMethod(SSLModule):
    """Methods with a momentum (EMA) target network (BYOL, DINO).

    Subclasses list ``self.momentum_pairs = [(online, target), ...]``; before each step every target moves
    towards its online module with a momentum cosine-annealed from ``method.momentum`` to 1, as in lightly's
    examples.
    """

    momentum_pairs: list[tuple[nn.Module, nn.Module]]

    def before_step(self) -> None:
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        momentum = cosine_schedule(self.global_step, total, self.config.method.momentum, 1.0)
        for online, target in self.momentum_pairs:
            update_momentum(online, target, m=momentum)
