"""SimCLR (Chen et al. 2020): NT-Xent between two augmented views, with lightly's head and loss."""

from __future__ import annotations

from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import nn

from sslcell.config import RecipeConfig
from sslcell.methods.base import TwoViewMethod
from sslcell.methods.inputs import Inputs


class SimCLR(TwoViewMethod):
    def __init__(self, config: RecipeConfig, inputs: Inputs, encoder: nn.Module) -> None:
        super().__init__(config, inputs, encoder)
        m = config.method
        self.projection = SimCLRProjectionHead(encoder.embed_dim, m.projection_hidden, m.projection_dim)
        self.criterion = NTXentLoss(temperature=m.temperature, gather_distributed=True)
