"""VICReg (Bardes et al. 2022): variance, invariance and covariance terms between two views."""

from __future__ import annotations

import torch
from lightly.loss import VICRegLoss
from lightly.models.modules.heads import VICRegProjectionHead
from torch import Tensor, nn

from sslcell.config import RecipeConfig
from sslcell.methods.base import SSLModule
from sslcell.methods.inputs import Inputs


class VICReg(SSLModule):
    def __init__(self, config: RecipeConfig, inputs: Inputs, encoder: nn.Module) -> None:
        super().__init__(config, inputs, encoder)
        m = config.method
        self.projection = VICRegProjectionHead(encoder.embed_dim, m.projection_hidden, m.projection_dim)
        self.criterion = VICRegLoss(gather_distributed=True)

    def loss(self, batch: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        x0, x1 = self.inputs.views(batch, generator)
        z0, z1 = self.projection(self.encoder(x0)), self.projection(self.encoder(x1))
        return self.criterion(z0.float(), z1.float()), {}
