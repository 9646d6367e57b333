"""Barlow Twins (Zbontar et al. 2021): decorrelate embedding dimensions across two views."""

from __future__ import annotations

from lightly.loss import BarlowTwinsLoss
from lightly.models.modules import BarlowTwinsProjectionHead
from torch import nn

from sslcell.config import RecipeConfig
from sslcell.methods.base import TwoViewMethod
from sslcell.methods.inputs import Inputs


class BarlowTwins(TwoViewMethod):
    def __init__(self, config: RecipeConfig, inputs: Inputs, encoder: nn.Module) -> None:
        super().__init__(config, inputs, encoder)
        m = config.method
        self.projection = BarlowTwinsProjectionHead(encoder.embed_dim, m.projection_hidden, m.projection_dim)
        self.criterion = BarlowTwinsLoss(gather_distributed=True)
