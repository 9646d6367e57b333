"""DINO (Caron et al. 2021): a student matches a momentum teacher's centred, sharpened distribution over
prototypes across augmented views, with lightly's head and loss. Views are full-size (the ViT's patch grid
is fixed); the augmentation's crop scale makes some of them close-ups."""

from __future__ import annotations

import copy

import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad
from torch import Tensor, nn

from sslcell.config import RecipeConfig
from sslcell.methods.base import MomentumMethod
from sslcell.methods.inputs import Inputs


class DINO(MomentumMethod):
    def __init__(self, config: RecipeConfig, inputs: Inputs, encoder: nn.Module) -> None:
        super().__init__(config, inputs, encoder)
        m = config.method
        self.projection = DINOProjectionHead(
            encoder.embed_dim, m.projection_hidden, m.bottleneck_dim, m.projection_dim, freeze_last_layer=1
        )
        self.teacher_encoder = copy.deepcopy(self.encoder)
        self.teacher_projection = DINOProjectionHead(
            encoder.embed_dim, m.projection_hidden, m.bottleneck_dim, m.projection_dim
        )
        self.teacher_projection.load_state_dict(self.projection.state_dict())
        deactivate_requires_grad(self.teacher_encoder)
        deactivate_requires_grad(self.teacher_projection)
        self.momentum_pairs = [(self.encoder, self.teacher_encoder), (self.projection, self.teacher_projection)]
        self.criterion = DINOLoss(
            output_dim=m.projection_dim,
            warmup_teacher_temp=min(0.04, m.teacher_temp),
            teacher_temp=m.teacher_temp,
            warmup_teacher_temp_epochs=m.warmup_teacher_temp_epochs,
            student_temp=m.temperature,
        )

    def loss(self, batch: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        views = self.inputs.views(batch, generator, n=self.config.method.n_views)
        with torch.no_grad():
            teacher = [self.teacher_projection(self.teacher_encoder(v)).float() for v in views[:2]]
        student = [self.projection(self.encoder(v)).float() for v in views]
        return self.criterion(teacher, student, epoch=self.current_epoch), {}

    def on_after_backward(self) -> None:
        self.projection.cancel_last_layer_gradients(current_epoch=self.current_epoch)
