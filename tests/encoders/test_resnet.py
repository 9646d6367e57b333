from __future__ import annotations

import pytest
import torch
from torch import nn

from sslcell.encoders.image import IMAGE_ENCODERS, build_image_encoder
from sslcell.encoders.resnet import ResNetEncoder
from sslcell.encoders.vit import ViTEncoder
from sslcell.errors import ChannelMismatchError, ConfigError, InputError


def _images(n: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("c", [1, 2, 5])
@pytest.mark.parametrize("size", [32, 40, 48, 64])
def test_tiny_shapes(c, size):
    enc = ResNetEncoder(c, arch="resnet_tiny")
    assert enc.embed_dim == 128
    assert enc(_images(2, c, size)).shape == (2, 128)
    assert enc.forward_feature_map(_images(2, c, size)).shape == (2, 128, size // 8, size // 8)


@pytest.mark.parametrize("arch,dim", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_torchvision_archs(arch, dim):
    enc = ResNetEncoder(5, arch=arch)
    conv = enc.stem[0]
    assert (conv.in_channels, conv.kernel_size, conv.stride) == (5, (3, 3), (1, 1))
    assert not any(isinstance(m, nn.MaxPool2d) for m in enc.modules())
    assert enc.embed_dim == dim
    assert enc(_images(2, 5, 32)).shape == (2, dim)


@pytest.mark.parametrize("arch", ["resnet_tiny", "resnet18"])
def test_stem_keeps_resolution(arch):
    enc = ResNetEncoder(3, arch=arch)
    x = _images(2, 3, 40)
    stem = enc.stem(x)
    assert stem.shape[-2:] == (40, 40)
    assert enc.stages[0](stem).shape[-2:] == (40, 40)  # no pooling before the first stage
    assert enc.forward_feature_map(x).shape[-2:] == (5, 5)


def test_base_width():
    enc = ResNetEncoder(2, arch="resnet_tiny", base_width=8)
    assert enc.embed_dim == 64 and enc(_images(2, 2, 32)).shape == (2, 64)
    with pytest.raises(ConfigError, match="only supported for resnet_tiny"):
        ResNetEncoder(2, arch="resnet18", base_width=32)


def test_errors():
    with pytest.raises(ConfigError, match="resnet_tiny, resnet18, resnet34, resnet50"):
        ResNetEncoder(2, arch="resnet101")
    enc = ResNetEncoder(2, arch="resnet_tiny")
    with pytest.raises(ChannelMismatchError, match="3 channels"):
        enc(_images(1, 3, 32))
    with pytest.raises(InputError, match="floating"):
        enc(torch.zeros(1, 2, 32, 32, dtype=torch.uint8))


def test_gradients_and_sample_independence():
    enc = ResNetEncoder(2, arch="resnet_tiny")
    x = _images(4, 2, 32)
    enc(x).pow(2).sum().backward()
    for name, param in enc.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    enc.eval()
    with torch.no_grad():
        full = enc(x)
        single = torch.cat([enc(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(full, single, rtol=1e-5, atol=1e-5)


def test_zero_init_residual_makes_blocks_identity_plus_shortcut():
    enc = ResNetEncoder(2, arch="resnet_tiny", zero_init_residual=True).eval()
    block = enc.stages[0][1]  # a block without downsampling: output = relu(input) when the residual is zero
    h = enc.stem(_images(2, 2, 32))
    torch.testing.assert_close(block(h), torch.relu(h))


def test_factory():
    assert set(IMAGE_ENCODERS) == {"vit_tiny", "vit_small", "resnet_tiny", "resnet18", "resnet34", "resnet50",
                                "plain_cnn"}
    vit = build_image_encoder("vit_small", 5, 64, patch_size=8, depth=1)
    assert isinstance(vit, ViTEncoder)
    assert (vit.embed_dim, vit.patch_size, vit.in_channels, len(vit.blocks)) == (384, 8, 5, 1)
    assert build_image_encoder("vit_tiny", 2, 32, depth=1)(_images(2, 2, 32)).shape == (2, 192)
    tiny = build_image_encoder("resnet_tiny", 3, 48, base_width=8)
    assert isinstance(tiny, ResNetEncoder) and tiny.embed_dim == 64
    assert build_image_encoder("resnet50", 1, 96).embed_dim == 2048
    with pytest.raises(ConfigError, match="valid names: vit_tiny, vit_small, resnet_tiny"):
        build_image_encoder("vit_huge", 2, 32)
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['patch_size'\]"):
        build_image_encoder("resnet18", 2, 32, patch_size=4)
    with pytest.raises(ConfigError, match="patch_size"):
        build_image_encoder("vit_tiny", 2, 36, patch_size=8)
