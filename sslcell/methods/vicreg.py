"""VICReg (Bardes et al. 2022): variance, invariance and covariance terms between two views."""

from __future__ import annotations

from lightly.loss import VICRegLoss
from lightly.models.modules.heads import VICRegProjectionHead
from torch import nn

from sslcell.config import RecipeConfig
from sslcell.methods.base import TwoViewMethod
from sslcell.methods.inputs import Inputs


class VICReg(TwoViewMethod):
    def __init__(self, config: RecipeConfig, inputs: Inputs, encoder: nn.Module) -> None:
        super().__init__(config, inputs, encoder)
        m = config.method
        self.projection = VICRegProjectionHead(encoder.embed_dim, m.projection_hidden, m.projection_dim)
        self.criterion = VICRegLoss(gather_distributed=True)
