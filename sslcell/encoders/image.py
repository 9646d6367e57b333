"""Image encoders by name: ``build_image_encoder("vit_small", in_channels=5, image_size=64, patch_size=8)``.

In a recipe: ``encoder: {name: plain_cnn, options: {widths: [32, 64, 128]}}`` (options are the keyword arguments).
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from sslcell.encoders.cnn import PlainCNN
from sslcell.encoders.resnet import ResNetEncoder
from sslcell.encoders.vit import ViTEncoder
from sslcell.errors import ConfigError

# name -> (class, settings); ViT sizes follow DeiT (Tiny 192 x 12 x 3 heads, Small 384 x 12 x 6 heads).
IMAGE_ENCODERS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "vit_tiny": (ViTEncoder, {"embed_dim": 192, "depth": 12, "num_heads": 3}),
    "vit_small": (ViTEncoder, {"embed_dim": 384, "depth": 12, "num_heads": 6}),
    "resnet_tiny": (ResNetEncoder, {"arch": "resnet_tiny"}),
    "resnet18": (ResNetEncoder, {"arch": "resnet18"}),
    "resnet34": (ResNetEncoder, {"arch": "resnet34"}),
    "resnet50": (ResNetEncoder, {"arch": "resnet50"}),
    "plain_cnn": (PlainCNN, {}),  # option widths (default [32, 64, 128]): the crop benchmark's supervised CNN
}


def build_image_encoder(name: str, in_channels: int, image_size: int, **kwargs: Any) -> nn.Module:
    """An encoder ``(N, in_channels, image_size, image_size) -> (N, encoder.embed_dim)``.

    ``kwargs`` override the named settings (e.g. ``patch_size``, ``drop_path``, ``pool`` for ViTs, ``base_width``
    for ``resnet_tiny``, ``widths`` for ``plain_cnn``). ResNets and the plain CNN accept any image size (the plain
    CNN from ``2 ** len(widths)`` px); ``image_size`` only shapes the ViT's patch grid.
    """
    if name not in IMAGE_ENCODERS:
        raise ConfigError(f"unknown image encoder {name!r}; valid names: {', '.join(IMAGE_ENCODERS)}")
    cls, settings = IMAGE_ENCODERS[name]
    allowed = set(inspect.signature(cls).parameters) - {"in_channels", "image_size", *settings}
    allowed |= {key for key in settings if key != "arch"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ConfigError(f"image encoder {name!r}: unknown setting(s) {unknown}; valid: {sorted(allowed)}")
    settings = {**settings, **kwargs}
    if cls is ViTEncoder:
        return cls(in_channels, image_size, **settings)
    return cls(in_channels, **settings)
