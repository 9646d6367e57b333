"""A plain convolutional encoder: issue 14's supervised baseline, also pretrainable by any image method.

Per width, two (3x3 conv, batch norm, ReLU) layers and a 2x2 max-pool; then the global average. With the default
widths 32-64-128 it is the "plain 3-block CNN" of the crop benchmark's supervised baseline. Every block halves the
resolution, so crops need at least ``2 ** len(widths)`` pixels a side.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from sslcell.encoders.checks import check_image_batch
from sslcell.errors import ConfigError


class PlainCNN(nn.Module):
    """``(N, C, H, W) -> (N, widths[-1])``; ``embed_dim`` is ``widths[-1]``."""

    def __init__(self, in_channels: int, widths: Sequence[int] = (32, 64, 128)) -> None:
        super().__init__()
        if in_channels < 1:
            raise ConfigError(f"PlainCNN: in_channels must be >= 1, got {in_channels}")
        widths = list(widths)
        if not widths or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
            raise ConfigError(f"PlainCNN: widths must be a non-empty list of integers >= 1, got {widths!r}")
        layers: list[nn.Module] = []
        previous = in_channels
        for width in widths:
            for _ in range(2):
                layers += [nn.Conv2d(previous, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                           nn.ReLU(inplace=True)]
                previous = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.in_channels, self.widths, self.embed_dim = int(in_channels), widths, int(widths[-1])

    def forward(self, images: Tensor) -> Tensor:
        """``(N, C, H, W)`` normalised crops -> ``(N, embed_dim)``."""
        check_image_batch(images, self.in_channels, "PlainCNN")
        smallest = 2 ** len(self.widths)
        if min(images.shape[-2:]) < smallest:
            raise ConfigError(f"PlainCNN: {len(self.widths)} blocks halve the crop {len(self.widths)} times; crops "
                              f"must be at least {smallest} px a side, got {tuple(images.shape[-2:])} (use fewer "
                              "widths)")
        return self.features(images).mean(dim=(2, 3))
