"""A compact Vision Transformer for single-cell crops with any number of channels, with MAE masking.

The encoder half of facebookresearch/mae ``models_mae.py`` (He et al., "Masked Autoencoders Are Scalable Vision
Learners", 2021): ``patchify``, ``random_masking`` (argsort of noise, then gather) and an encoder that only sees the
visible tokens. The MAE decoder and loss, and the model that joins them, are in :mod:`sslcell.methods.image_mae`.
Differences from MAE: ``C`` input channels instead of 3, no host synchronisation in the forward (the number of kept
tokens is computed from Python numbers), explicit ``torch.Generator`` for the masks, and torchvision's
``EncoderBlock`` as the transformer block.

Shapes: images ``(N, C, H, W)`` with ``H == W == image_size``; ``L = (image_size // patch_size) ** 2`` patches;
a patch flattened in ``(p, p, C)`` order has ``patch_dim = p * p * C`` values; tokens ``(N, 1 + L, D)`` with the CLS
token first.
"""

from __future__ import annotations

import importlib
import warnings
from functools import partial
from typing import Any

import torch
from lightly.models import utils as lightly_utils
from torch import Tensor, nn
from torchvision.models.vision_transformer import EncoderBlock
from torchvision.ops import StochasticDepth

from sslcell.encoders.checks import check_image_batch
from sslcell.errors import ConfigError, InputError

POOLS = ("cls", "mean")


def _sincos_pos_embed(dim: int, grid_size: int, where: str) -> Tensor:
    """Fixed 2-D sin-cos positional embedding, a zero row first for the CLS token: ``(1, 1 + grid_size**2, dim)``."""
    if dim % 4:
        raise ConfigError(
            f"{where}: the embedding dimension must be divisible by 4 for 2-D sin-cos positions, got {dim}"
        )
    table = lightly_utils.get_2d_sine_cosine_positional_embedding(dim, grid_size, cls_token=True)
    return torch.from_numpy(table).float().unsqueeze(0)


def _transformer_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float, drop_path: float) -> nn.Sequential:
    """``depth`` pre-norm blocks ``(N, T, dim) -> (N, T, dim)``; stochastic depth rises linearly from 0 to
    ``drop_path``.

    The drop-path modules replace the parameter-free dropouts of torchvision's block, so parameter names (and
    checkpoints) are the same whatever ``drop_path`` is.
    """
    blocks = nn.Sequential()
    for _ in range(depth):
        block = EncoderBlock(num_heads, dim, int(dim * mlp_ratio), dropout=0.0, attention_dropout=0.0,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6))
        block.dropout = StochasticDepth(0.0, mode="row")  # after attention, before the residual sum
        block.mlp[-1] = StochasticDepth(0.0, mode="row")  # last module of the MLP is its output dropout
        blocks.append(block)
    _set_drop_path(blocks, drop_path)
    return blocks


def _set_drop_path(blocks: nn.Sequential, drop_path: float) -> None:
    """Stochastic depth of block ``i`` of ``blocks`` (built by :func:`_transformer_blocks`): ``drop_path * i /
    (depth - 1)``, rising linearly from 0 for the first block to ``drop_path`` for the last."""
    for i, block in enumerate(blocks):
        for module in (block.dropout, block.mlp[-1]):
            module.p = drop_path * i / max(len(blocks) - 1, 1)


def _init_mae_weights(module: nn.Module) -> None:
    """MAE initialisation: Xavier-uniform linear weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _check_heads(dim: int, num_heads: int, where: str) -> None:
    if num_heads < 1 or dim % num_heads:
        raise ConfigError(f"{where}: num_heads={num_heads} must divide the embedding dimension {dim}")


class ViTEncoder(nn.Module):
    """Vision Transformer on ``(N, C, H, W)`` crops: patch embedding, CLS token, fixed 2-D sin-cos positions.

    ``forward`` returns ``(N, embed_dim)``: by default the CLS token after the final LayerNorm (``pool="cls"``),
    the usual choice for contrastive methods and MAE linear probing; ``pool="mean"`` averages the normalised patch
    tokens instead, which often probes better after MAE pretraining.
    """

    def __init__(self, in_channels: int, image_size: int, patch_size: int = 4, embed_dim: int = 192, depth: int = 6,
                 num_heads: int = 3, mlp_ratio: float = 4.0, drop_path: float = 0.0, pool: str = "cls") -> None:
        super().__init__()
        if in_channels < 1:
            raise ConfigError(f"ViTEncoder: in_channels must be >= 1, got {in_channels}")
        if patch_size < 1 or image_size < patch_size or image_size % patch_size:
            raise ConfigError(f"ViTEncoder: image_size={image_size} must be a positive multiple of "
                              f"patch_size={patch_size}")
        _check_heads(embed_dim, num_heads, "ViTEncoder")
        if not 0.0 <= drop_path < 1.0:
            raise ConfigError(f"ViTEncoder: drop_path must be in [0, 1), got {drop_path}")
        if pool not in POOLS:
            raise ConfigError(f"ViTEncoder: pool must be one of {POOLS}, got {pool!r}")
        self.in_channels, self.image_size, self.patch_size = in_channels, image_size, patch_size
        self.embed_dim, self.pool = embed_dim, pool
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size**2
        self.patch_dim = patch_size * patch_size * in_channels

        self.patch_embed = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", _sincos_pos_embed(embed_dim, self.grid_size, "ViTEncoder"),
                             persistent=False)  # (1, 1 + L, D), fixed
        self.blocks = _transformer_blocks(embed_dim, depth, num_heads, mlp_ratio, drop_path)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        _init_mae_weights(self)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(embed_dim, -1))  # as a linear layer, like MAE
        nn.init.normal_(self.cls_token, std=0.02)

    @property
    def drop_path(self) -> float:
        """Stochastic depth rate of the last block (0 when there are no blocks)."""
        return float(self.blocks[-1].dropout.p) if len(self.blocks) else 0.0

    def set_drop_path(self, drop_path: float) -> None:
        """Set the stochastic depth, rising linearly over the blocks to ``drop_path`` (e.g. for fine-tuning a
        model pretrained without it); parameters are unchanged and in eval mode it does nothing."""
        if not 0.0 <= drop_path < 1.0:
            raise ConfigError(f"ViTEncoder: drop_path must be in [0, 1), got {drop_path}")
        _set_drop_path(self.blocks, drop_path)

    @property
    def num_layers(self) -> int:
        """``L = depth + 1``, the top layer for layer-wise learning-rate decay (see :meth:`layer_id`)."""
        return len(self.blocks) + 1

    def layer_id(self, name: str) -> int:
        """Layer of parameter ``name`` (as ``named_parameters`` gives it): 0 for the patch embedding and the CLS
        token, ``i + 1`` for block ``i``, :attr:`num_layers` for the final norm (as MAE's ``lr_decay.py``)."""
        if name.startswith(("patch_embed.", "cls_token")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.num_layers

    def _check_images(self, images: Tensor) -> None:
        """Raise if ``images`` is not a floating ``(N, in_channels, image_size, image_size)`` batch."""
        check_image_batch(images, self.in_channels, "ViTEncoder")
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise InputError(f"ViTEncoder: images are {tuple(images.shape[-2:])} pixels (H, W), the model expects "
                             f"({self.image_size}, {self.image_size})")

    def patchify(self, images: Tensor) -> Tensor:
        """``(N, C, H, W) -> (N, L, p*p*C)``, patches in row-major order, pixels in ``(p, p, C)`` order."""
        self._check_images(images)
        return lightly_utils.patchify(images, self.patch_size)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """``(N, L, p*p*C) -> (N, C, H, W)``, the inverse of :meth:`patchify`."""
        if patches.shape[1:] != (self.num_patches, self.patch_dim):
            raise InputError(f"ViTEncoder.unpatchify: expected patches (N, {self.num_patches}, {self.patch_dim}), "
                             f"got {tuple(patches.shape)}")
        return lightly_utils.unpatchify(patches, self.patch_size, self.in_channels)

    @staticmethod
    def random_masking(tokens: Tensor, mask_ratio: float,
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Keep a random ``round(L * (1 - mask_ratio))`` tokens of each sample.

        ``tokens (N, L, D) -> kept (N, L_vis, D), mask (N, L) float32 with 1 = masked, ids_restore (N, L)``;
        ``ids_restore`` puts ``cat(kept, masked)`` back into the original order. ``generator`` must live on
        ``tokens.device``.
        """
        n, length, _ = tokens.shape
        len_keep = _num_visible(length, mask_ratio)
        noise = torch.rand(n, length, generator=generator, device=tokens.device)  # (N, L)
        ids_shuffle = noise.argsort(dim=1)  # (N, L): the tokens with the smallest noise are kept
        ids_restore = ids_shuffle.argsort(dim=1)  # (N, L)
        kept = lightly_utils.get_at_index(tokens, ids_shuffle[:, :len_keep])  # (N, L_vis, D)
        mask = (ids_restore >= len_keep).float()  # (N, L)
        return kept, mask, ids_restore

    def forward_features(self, images: Tensor, mask_ratio: float = 0.0,
                         generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(N, C, H, W) -> tokens (N, 1 + L_vis, D), mask (N, L), ids_restore (N, L)``.

        Only the CLS token and the visible patch tokens enter the blocks; tokens are after the final norm.
        With ``mask_ratio == 0`` nothing is masked or shuffled (``ids_restore`` is the identity).
        """
        self._check_images(images)
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (N, L, D), row-major patches
        x = x + self.pos_embed[:, 1:]
        if mask_ratio > 0.0:
            x, mask, ids_restore = self.random_masking(x, mask_ratio, generator)  # (N, L_vis, D)
        else:
            _num_visible(self.num_patches, mask_ratio)  # validates the ratio
            mask = x.new_zeros(x.shape[:2], dtype=torch.float32)  # (N, L)
            ids_restore = torch.arange(self.num_patches, device=x.device).expand(x.shape[0], -1)  # (N, L)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (N, 1, D)
        x = torch.cat([cls, x], dim=1)  # (N, 1 + L_vis, D)
        return self.norm(self.blocks(x)), mask, ids_restore

    def forward(self, images: Tensor) -> Tensor:
        """``(N, C, H, W) -> (N, D)``: CLS token, or the mean patch token if ``pool == "mean"``."""
        tokens, _, _ = self.forward_features(images)  # (N, 1 + L, D)
        return tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(dim=1)


def _num_visible(length: int, mask_ratio: float) -> int:
    """Number of tokens kept out of ``length``: ``round(length * (1 - mask_ratio))``, computed on the host."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ConfigError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return int(round(length * (1.0 - mask_ratio)))


# Moved to sslcell.methods.image_mae; the old names forward there, with a warning, for one release. The import is
# lazy because sslcell.methods imports this module (an eager import here would be a cycle).
_MOVED = {"MAEDecoder": "sslcell.methods.image_mae", "mae_loss": "sslcell.methods.image_mae"}


def __getattr__(name: str) -> Any:
    """PEP 562: ``from sslcell.encoders.vit import MAEDecoder, mae_loss`` still works, with a DeprecationWarning."""
    if name in _MOVED:
        warnings.warn(f"sslcell.encoders.vit.{name} has moved to {_MOVED[name]}.{name}; import it from there "
                      "(the old path will be removed in the next release)", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
