"""ResNets for small single-cell crops (32 to 96 px) with any number of channels.

ImageNet ResNets divide the resolution by 4 before the first stage (7x7 stride-2 conv, then max-pool), which
leaves a 32 px crop at 8x8. As in CIFAR ResNets, the stem here is a 3x3 stride-1 conv of ``C`` input channels with no
max-pool, so the first stage runs at full resolution and the last at 1/8 of it. ``resnet18/34/50`` are torchvision's
(random weights) with the stem swapped; ``resnet_tiny`` is the ResNet-18 layout at a quarter of the width, built from
torchvision's ``BasicBlock``, for fast tests and small data sets.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision import models
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from sslcell.encoders.checks import check_image_batch
from sslcell.errors import ConfigError

_TORCHVISION_ARCHS = {"resnet18": models.resnet18, "resnet34": models.resnet34, "resnet50": models.resnet50}
ARCHS = ("resnet_tiny", *_TORCHVISION_ARCHS)


def _basic_stages(base_width: int, blocks_per_stage: int = 2) -> nn.Sequential:
    """Four stages of ``BasicBlock`` with widths ``w, 2w, 4w, 8w``: ``(N, w, H, W) -> (N, 8w, H/8, W/8)``."""
    stages, inplanes = nn.Sequential(), base_width
    for i in range(4):
        planes, stride = base_width * 2**i, 1 if i == 0 else 2
        downsample = None
        if stride != 1 or inplanes != planes:
            downsample = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
        blocks = [BasicBlock(inplanes, planes, stride, downsample)]
        blocks += [BasicBlock(planes, planes) for _ in range(blocks_per_stage - 1)]
        stages.append(nn.Sequential(*blocks))
        inplanes = planes
    return stages


class ResNetEncoder(nn.Module):
    """``(N, C, H, W) -> (N, embed_dim)``: small-image stem, four residual stages, global average pooling.

    ``base_width`` (channels of the stem and first stage) can only be changed for ``resnet_tiny`` (default 16);
    torchvision's architectures are fixed at 64. ``embed_dim`` is 8 * base_width for ``resnet_tiny``, 512 for
    ResNet-18/34 and 2048 for ResNet-50. ``zero_init_residual`` zeroes the last BatchNorm of every residual branch.
    """

    def __init__(self, in_channels: int, arch: str = "resnet18", base_width: int | None = None,
                 zero_init_residual: bool = False) -> None:
        super().__init__()
        if in_channels < 1:
            raise ConfigError(f"ResNetEncoder: in_channels must be >= 1, got {in_channels}")
        if arch not in ARCHS:
            raise ConfigError(f"ResNetEncoder: unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
        if arch == "resnet_tiny":
            width = 16 if base_width is None else base_width
            if width < 1:
                raise ConfigError(f"ResNetEncoder: base_width must be >= 1, got {width}")
            stages, self.embed_dim = _basic_stages(width), 8 * width
        else:
            if base_width not in (None, 64):
                raise ConfigError(f"ResNetEncoder: base_width={base_width} is only supported for resnet_tiny; "
                                  f"{arch} is fixed at 64")
            net = _TORCHVISION_ARCHS[arch](weights=None)
            width, self.embed_dim = 64, net.fc.in_features
            stages = nn.Sequential(net.layer1, net.layer2, net.layer3, net.layer4)
        self.in_channels, self.arch = in_channels, arch
        self.stem = nn.Sequential(  # (N, C, H, W) -> (N, width, H, W)
            nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.stages = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        """torchvision's ResNet initialisation: Kaiming-normal convs (fan-out), unit BatchNorms."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward_feature_map(self, images: Tensor) -> Tensor:
        """``(N, C, H, W) -> (N, D, ceil(H/8), ceil(W/8))``, the last stage before pooling."""
        check_image_batch(images, self.in_channels, "ResNetEncoder")
        return self.stages(self.stem(images))

    def forward(self, images: Tensor) -> Tensor:
        """``(N, C, H, W) -> (N, D)``."""
        return torch.flatten(self.pool(self.forward_feature_map(images)), 1)
