"""SimCLR (Chen et al. 2020): NT-Xent between two augmented views, with lightly's head and loss."""

from __future__ import annotations

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import Tensor, nn

from sslcell.config import RecipeConfig
from sslcell.methods.base import SSLModule
from sslcell.methods.inputs import Inputs


class SimCLR(SSLModule):
    def __init__(self, config: RecipeConfig, inputs: Inputs, encoder: nn.Module) -> None:
        super().__init__(config, inputs, encoder)
        m = config.method
        self.projection = SimCLRProjectionHead(encoder.embed_dim, m.projection_hidden, m.projection_dim)
        self.criterion = NTXentLoss(temperature=m.temperature, gather_distributed=True)

    def loss(self, batch: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        x0, x1 = self.inputs.views(batch, generator)
        z0, z1 = self.projection(self.encoder(x0)), self.projection(self.encoder(x1))
        return self.criterion(z0, z1), {}
