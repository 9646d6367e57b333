"""Barlow Twins (Zbontar et al. 2021): decorrelate embedding dimensions across two views."""

from __future__ import annotations

import torch
from lightly.loss import BarlowTwinsLoss
from lightly.models.modules import BarlowTwinsProjectionHead
from torch import Tensor, nn

from sslcell.config import RecipeConfig
from sslcell.methods.base import SSLModule
from sslcell.methods.inputs import Inputs


class BarlowTwins(SSLModule):
    def __init__(self, config: RecipeConfig, inputs: Inputs, encoder: nn.Module) -> None:
        super().__init__(config, inputs, encoder)
        m = config.method
        self.projection = BarlowTwinsProjectionHead(encoder.embed_dim, m.projection_hidden, m.projection_dim)
        self.criterion = BarlowTwinsLoss(gather_distributed=True)

    def loss(self, batch: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        x0, x1 = self.inputs.views(batch, generator)
        z0, z1 = self.projection(self.encoder(x0)), self.projection(self.encoder(x1))
        return self.criterion(z0.float(), z1.float()), {}
