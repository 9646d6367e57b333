"""What fine-tuning optimises and how it stops: the supervised loss and early stopping on a validation split.

* :class:`SupervisedLoss`: cross-entropy (optional label smoothing), plus, with ``supcon_weight > 0``, a supervised
  contrastive term (Khosla et al. 2020) from pytorch-metric-learning: ``SupConLoss`` on the head's input (the
  standardised embedding, or the hidden layer's output), over the pairs a ``MultiSimilarityMiner`` finds
  informative in the batch. It pulls cells of one class together and pushes classes apart in the space the last
  linear layer reads, which helps when there are few labels per class.
* :class:`EarlyStopping`: macro-F1 on the validation cells after every epoch; the best epoch's weights are kept and
  restored, and training stops after ``patience`` epochs without improvement.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torch import Tensor, nn

log = logging.getLogger(__name__)


class SupervisedLoss(nn.Module):
    """``loss(logits (B, K), head_input (B, F), labels (B,)) -> scalar``; see the module doc. ``class_weight (K,)``
    weights the cross-entropy per class (torch's weighted mean, ``sum_i w_(y_i) l_i / sum_i w_(y_i)``); the
    supervised contrastive term is unweighted. ``labels`` may instead be class probabilities ``t (B, K)`` (MixUp,
    CutMix; cross-entropy only): cell ``i`` is weighted by ``sum_k w_k t_ik`` in the same weighted mean, so
    one-hot targets give the hard labels' loss."""

    def __init__(self, label_smoothing: float = 0.0, supcon_weight: float = 0.0, supcon_temperature: float = 0.1,
                 miner_epsilon: float = 0.1, class_weight: Tensor | None = None) -> None:
        super().__init__()
        self.label_smoothing, self.supcon_weight = float(label_smoothing), float(supcon_weight)
        self.register_buffer("class_weight", None if class_weight is None else class_weight.float())
        if self.supcon_weight > 0:  # imported here: pytorch-metric-learning takes seconds to import
            from pytorch_metric_learning import losses, miners

            self.supcon = losses.SupConLoss(temperature=supcon_temperature)
            self.miner = miners.MultiSimilarityMiner(epsilon=miner_epsilon)

    def forward(self, logits: Tensor, head_input: Tensor, labels: Tensor) -> Tensor:
        if labels.ndim == 2:  # class probabilities: each cell weighted by its target's class weights
            per_cell = F.cross_entropy(logits.float(), labels.float(), reduction="none",
                                       label_smoothing=self.label_smoothing)
            cell_weight = torch.ones_like(per_cell) if self.class_weight is None else labels.float() @ self.class_weight
            loss = (cell_weight * per_cell).sum() / cell_weight.sum()
        else:
            loss = F.cross_entropy(logits.float(), labels, weight=self.class_weight,
                                   label_smoothing=self.label_smoothing)
        if self.supcon_weight > 0:
            if labels.ndim != 1:
                raise ValueError("the supervised contrastive loss needs one class per cell, not soft labels")
            z = head_input.float()
            loss = loss + self.supcon_weight * self.supcon(z, labels, self.miner(z, labels))
        return loss


class EarlyStopping:
    """Keep the weights of the epoch with the best validation macro-F1; stop after ``patience`` epochs without a
    better one. ``codes (V,)``: the validation cells' classes; ``predict()`` returns their predicted classes."""

    def __init__(self, codes: np.ndarray, patience: int) -> None:
        self.codes, self.patience = np.asarray(codes), int(patience)
        self.labels = np.unique(self.codes)  # macro-F1 over the classes with validation cells
        self.best_score, self.best_epoch, self.best_state = -np.inf, -1, None
        self.history: list[float] = []

    def update(self, epoch: int, predicted: np.ndarray, module: nn.Module) -> bool:
        """Score one epoch's predictions ``(V,)``; keep ``module``'s weights when they are the best so far.
        Returns True when training should stop."""
        score = float(f1_score(self.codes, predicted, labels=self.labels, average="macro", zero_division=0))
        self.history.append(score)
        if score > self.best_score:
            self.best_score, self.best_epoch = score, epoch
            self.best_state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        log.info("validation macro-F1 after epoch %d: %.4f (best %.4f, epoch %d)", epoch + 1, score,
                 self.best_score, self.best_epoch + 1)
        return epoch - self.best_epoch >= self.patience

    def restore(self, module: nn.Module) -> None:
        """Load the best epoch's weights into ``module``."""
        if self.best_state is not None:
            module.load_state_dict(self.best_state)

    def summary(self) -> dict[str, Any]:
        """For ``classifier.info``: the best epoch (1-based), its score and every epoch's score."""
        return {"best_epoch": self.best_epoch + 1, "best_macro_f1": self.best_score,
                "macro_f1_per_epoch": copy.copy(self.history), "patience": self.patience}


def predict_codes(classifier: nn.Module, rows: Any, batch_size: int, device: torch.device) -> np.ndarray:
    """Predicted classes ``(N,)`` of ``rows`` (crops, or in-memory counts) by ``classifier`` (its
    ``predict_proba`` runs in eval mode and restores the training mode)."""
    from sslcell.inference import run_batched

    return run_batched(classifier.predict_proba, rows, len(classifier.classes), batch_size=batch_size,
                       device=device).argmax(1)
