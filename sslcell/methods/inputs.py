"""What a model reads: its input contract (genes or channels, normalisation) and its augmented views.

The contract is stored in every checkpoint's ``config.json`` and checked against every input.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sslcell.augment.expression import ExpressionAugment, ExpressionAugmentConfig, normalize_log1p
from sslcell.config import from_dict


class Inputs(nn.Module):
    """Base class: ``normalize`` for inference, ``views`` for joint-embedding training."""

    modality: str = ""

    def normalize(self, batch: Tensor) -> Tensor:
        raise NotImplementedError

    def views(self, batch: Tensor, generator: torch.Generator, n: int = 2) -> list[Tensor]:
        raise NotImplementedError

    def contract(self) -> dict[str, Any]:
        raise NotImplementedError


class ExpressionInputs(Inputs):
    """Counts ``(N, G)`` over the model's genes -> library-size normalised log1p values ``(N, G)``.

    Normalisation runs per batch on the model's device. With ``counts_are_log_normalized`` the input is
    taken as already ``log1p(count / library * target_sum)`` and passed through unchanged.
    """

    modality = "expression"

    def __init__(
        self,
        genes: list[str],
        *,
        target_sum: float = 1e4,
        counts_are_log_normalized: bool = False,
        augment: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.genes = list(genes)
        self.target_sum = float(target_sum)
        self.counts_are_log_normalized = bool(counts_are_log_normalized)
        self.augment_config = from_dict(ExpressionAugmentConfig, dict(augment or {}), "method.augment")
        self.augment = ExpressionAugment(
            self.augment_config,
            target_sum=self.target_sum,
            counts_are_log_normalized=self.counts_are_log_normalized,
        )

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    def normalize(self, batch: Tensor) -> Tensor:
        """(N, G) counts -> (N, G) log-normalised float32."""
        batch = batch.float()
        if self.counts_are_log_normalized:
            return batch
        return normalize_log1p(batch, self.target_sum)

    def views(self, batch: Tensor, generator: torch.Generator, n: int = 2) -> list[Tensor]:
        """n independently augmented, normalised views of the same cells, each (N, G)."""
        batch = batch.float()
        return [self.augment(batch, generator) for _ in range(n)]

    def contract(self) -> dict[str, Any]:
        return {
            "modality": self.modality,
            "genes": self.genes,
            "target_sum": self.target_sum,
            "counts_are_log_normalized": self.counts_are_log_normalized,
        }
