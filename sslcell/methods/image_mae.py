"""Masked autoencoding of cell crops (He et al. 2022): a ViT encodes only the visible patches, a light
decoder predicts the pixels of every patch, and the loss is the per-patch normalised pixel error on the
masked patches."""

from __future__ import annotations

import torch
from torch import Tensor

from sslcell.config import RecipeConfig
from sslcell.encoders.vit import MAEDecoder, ViTEncoder, mae_loss
from sslcell.errors import ConfigError
from sslcell.methods.base import SSLModule
from sslcell.methods.inputs import ImageInputs


class ImageMAE(SSLModule):
    """``ViTEncoder`` ``(N, C, H, W) -> (N, D)`` and ``MAEDecoder`` over its patch grid."""

    def __init__(self, config: RecipeConfig, inputs: ImageInputs, encoder: ViTEncoder) -> None:
        if not isinstance(encoder, ViTEncoder):
            raise ConfigError(f"encoder.name: image MAE needs a ViT encoder (vit_tiny, vit_small), got {config.encoder.name!r}")
        super().__init__(config, inputs, encoder)
        m = config.method
        self.decoder = MAEDecoder(
            encoder.num_patches, encoder.patch_dim, encoder.embed_dim, m.decoder_dim, m.decoder_depth, m.decoder_heads
        )

    def loss(self, batch: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        x = self.inputs.views(batch, generator, n=1)[0]  # one view (geometry, mild intensity)
        tokens, mask, ids_restore = self.encoder.forward_features(x, self.config.method.mask_rate, generator)
        pred = self.decoder(tokens, ids_restore)
        loss = mae_loss(self.encoder.patchify(x), pred.float(), mask, self.config.method.norm_pix_loss)
        return loss, {}
