"""BYOL (Grill et al. 2020): an online network predicts a momentum (EMA) target network's projection."""

from __future__ import annotations

import copy

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad
from torch import Tensor, nn

from sslcell.config import RecipeConfig
from sslcell.methods.base import MomentumMethod
from sslcell.methods.inputs import Inputs


class BYOL(MomentumMethod):
    def __init__(self, config: RecipeConfig, inputs: Inputs, encoder: nn.Module) -> None:
        super().__init__(config, inputs, encoder)
        m = config.method
        self.projection = BYOLProjectionHead(encoder.embed_dim, m.projection_hidden, m.projection_dim)
        self.prediction = BYOLPredictionHead(m.projection_dim, m.projection_hidden, m.projection_dim)
        self.encoder_momentum = copy.deepcopy(self.encoder)
        self.projection_momentum = copy.deepcopy(self.projection)
        deactivate_requires_grad(self.encoder_momentum)
        deactivate_requires_grad(self.projection_momentum)
        self.momentum_pairs = [(self.encoder, self.encoder_momentum), (self.projection, self.projection_momentum)]
        self.criterion = NegativeCosineSimilarity()

    def _online(self, x: Tensor) -> Tensor:
        return self.prediction(self.projection(self.encoder(x)))

    @torch.no_grad()
    def _target(self, x: Tensor) -> Tensor:
        return self.projection_momentum(self.encoder_momentum(x)).detach()

    def loss(self, batch: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        x0, x1 = self.inputs.views(batch, generator)
        p0, p1 = self._online(x0), self._online(x1)
        t0, t1 = self._target(x0), self._target(x1)
        return 0.5 * (self.criterion(p0, t1) + self.criterion(p1, t0)), {}
