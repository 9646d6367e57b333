"""Masked autoencoding of cell crops (He et al., "Masked Autoencoders Are Scalable Vision Learners", 2022).

A ViT encodes only the visible patches, a light decoder predicts the pixels of every patch, and the loss is the
per-patch normalised pixel error on the masked patches. This file reads top to bottom like facebookresearch/mae
``models_mae.py``; the encoder half (``patchify``, ``random_masking``, the visible-token encoder) is the ViT's own,
in :mod:`sslcell.encoders.vit`, so the same encoder serves every method::

    x (N, C, H, W) --- encoder.patchify ----------------------------------> target (N, L, p*p*C)
    x --- forward_encoder: patch embedding + positions,
          encoder.random_masking, CLS token, blocks over visible tokens --> tokens (N, 1 + L_vis, D),
                                                                            mask (N, L), ids_restore (N, L)
    tokens, ids_restore --- forward_decoder (MAEDecoder) -----------------> pred (N, L, p*p*C)
    target, pred, mask --- forward_loss (mae_loss) -----------------------> loss ()

``L = (image_size // patch_size) ** 2`` patches, ``L_vis = round(L * (1 - mask_rate))`` of them visible; ``mask`` is
1 where a patch is masked; ``ids_restore`` puts the shuffled tokens back in image order.
"""

from __future__ import annotations

import math

import torch
from lightly.models import utils as lightly_utils
from torch import Tensor, nn

from sslcell.config import RecipeConfig
from sslcell.encoders.vit import ViTEncoder, _check_heads, _init_mae_weights, _sincos_pos_embed, _transformer_blocks
from sslcell.errors import ConfigError, InputError
from sslcell.methods.base import SSLModule
from sslcell.methods.inputs import ImageInputs


class MAEDecoder(nn.Module):
    """MAE decoder: visible encoder tokens plus mask tokens, in image order, to predicted pixels of every patch."""

    def __init__(self, num_patches: int, patch_dim: int, encoder_dim: int, decoder_dim: int = 128, depth: int = 2,
                 num_heads: int = 4, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        grid_size = math.isqrt(num_patches)
        if num_patches < 1 or grid_size * grid_size != num_patches:
            raise ConfigError(f"MAEDecoder: num_patches={num_patches} must be a square (a square grid of patches)")
        _check_heads(decoder_dim, num_heads, "MAEDecoder")
        self.num_patches, self.patch_dim = num_patches, patch_dim
        self.decoder_embed = nn.Linear(encoder_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("pos_embed", _sincos_pos_embed(decoder_dim, grid_size, "MAEDecoder"),
                             persistent=False)  # (1, 1 + L, Dd), fixed
        self.blocks = _transformer_blocks(decoder_dim, depth, num_heads, mlp_ratio, drop_path=0.0)
        self.norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.pred = nn.Linear(decoder_dim, patch_dim)

        _init_mae_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: Tensor, ids_restore: Tensor) -> Tensor:
        """``tokens (N, 1 + L_vis, D), ids_restore (N, L) -> predicted patches (N, L, p*p*C)``."""
        n, num_tokens, _ = tokens.shape
        if ids_restore.shape != (n, self.num_patches) or num_tokens > 1 + self.num_patches:
            raise InputError(f"MAEDecoder: expected tokens (N, 1 + L_vis <= {1 + self.num_patches}, D) and "
                             f"ids_restore (N, {self.num_patches}), got {tuple(tokens.shape)} and "
                             f"{tuple(ids_restore.shape)}")
        x = self.decoder_embed(tokens)  # (N, 1 + L_vis, Dd)
        mask_tokens = self.mask_token.expand(n, 1 + self.num_patches - num_tokens, -1)  # (N, L - L_vis, Dd)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (N, L, Dd), visible first
        patches = lightly_utils.get_at_index(patches, ids_restore)  # (N, L, Dd), image order
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed  # (N, 1 + L, Dd)
        x = self.norm(self.blocks(x))
        return self.pred(x[:, 1:])  # (N, L, p*p*C)


def mae_loss(target_patches: Tensor, pred_patches: Tensor, mask: Tensor, norm_pix_loss: bool = True) -> Tensor:
    """Mean squared error over the masked patches only: ``(N, L, P), (N, L, P), (N, L) -> ()``.

    With ``norm_pix_loss`` each target patch is standardised by its own mean and (unbiased) variance first, as in
    MAE. The per-patch MSE is averaged over patches with ``mask == 1``; it is 0 if no patch is masked.
    """
    if pred_patches.shape != target_patches.shape or mask.shape != target_patches.shape[:2]:
        raise InputError(f"mae_loss: expected target and prediction (N, L, P) and mask (N, L), got "
                         f"{tuple(target_patches.shape)}, {tuple(pred_patches.shape)} and {tuple(mask.shape)}")
    target = lightly_utils.normalize_mean_var(target_patches, dim=-1) if norm_pix_loss else target_patches
    per_patch = (pred_patches - target).pow(2).mean(dim=-1)  # (N, L)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


class ImageMAE(SSLModule):
    """``ViTEncoder`` ``(N, C, H, W) -> (N, D)`` and ``MAEDecoder`` over its patch grid.

    Parameters are ``encoder.*`` and ``decoder.*`` (checkpoints depend on these names).
    """

    def __init__(self, config: RecipeConfig, inputs: ImageInputs, encoder: ViTEncoder) -> None:
        if not isinstance(encoder, ViTEncoder):
            raise ConfigError(
                f"encoder.name: image MAE needs a ViT encoder (vit_tiny, vit_small), got {config.encoder.name!r}"
            )
        super().__init__(config, inputs, encoder)
        m = config.method
        self.decoder = MAEDecoder(
            encoder.num_patches, encoder.patch_dim, encoder.embed_dim, m.decoder_dim, m.decoder_depth, m.decoder_heads
        )

    def forward_encoder(self, x: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """``x (N, C, H, W) -> tokens (N, 1 + L_vis, D), mask (N, L), ids_restore (N, L)``: mask, encode the rest."""
        return self.encoder.forward_features(x, self.config.method.mask_rate, generator)

    def forward_decoder(self, tokens: Tensor, ids_restore: Tensor) -> Tensor:
        """``tokens (N, 1 + L_vis, D), ids_restore (N, L) -> pred (N, L, p*p*C)``, every patch in image order."""
        return self.decoder(tokens, ids_restore)

    def forward_loss(self, x: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """``x (N, C, H, W), pred (N, L, p*p*C), mask (N, L) -> ()``: pixel error on the masked patches."""
        target = self.encoder.patchify(x)  # (N, L, p*p*C)
        return mae_loss(target, pred.float(), mask, self.config.method.norm_pix_loss)

    def loss(self, batch: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        x = self.inputs.views(batch, generator, n=1)[0]  # (N, C, H, W): one view (geometry, mild intensity)
        tokens, mask, ids_restore = self.forward_encoder(x, generator)
        pred = self.forward_decoder(tokens, ids_restore)
        return self.forward_loss(x, pred, mask), {}
