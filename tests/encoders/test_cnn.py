"""PlainCNN: shapes, refusals, the ``plain_cnn`` registry entry, and pretraining it with the image methods."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from sslcell.checkpoint import load
from sslcell.data.images import CellImages
from sslcell.encoders import PlainCNN
from sslcell.encoders.image import build_image_encoder
from sslcell.errors import ChannelMismatchError, ConfigError, InputError
from sslcell.methods import build_method
from sslcell.train import image_contract, pretrain
from tests.conftest import tiny_image_recipe

PLAIN = {"name": "plain_cnn", "options": {"widths": [4, 8]}}


def _images(n: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", [8, 16, 40])
def test_shapes_follow_the_widths(size):
    net = PlainCNN(3, (8, 16, 32))
    assert net.embed_dim == 32 and net(_images(2, 3, size)).shape == (2, 32)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 8), (8, 8), (8, 16), (16, 16), (16, 32), (32, 32)]
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 3
    assert net.features(_images(2, 3, size)).shape == (2, 32, size // 8, size // 8)  # halved per block


def test_default_is_the_32_64_128_baseline():
    net = PlainCNN(2)
    assert net.embed_dim == 128 and net.widths == [32, 64, 128]


def test_output_is_the_global_average_of_the_last_block():
    net = PlainCNN(2, [4, 8]).eval()
    x = _images(3, 2, 16)
    torch.testing.assert_close(net(x), net.features(x).mean(dim=(2, 3)))


def test_refusals_name_the_problem():
    with pytest.raises(ConfigError, match="widths"):
        PlainCNN(2, [])
    with pytest.raises(ConfigError, match="widths"):
        PlainCNN(2, [8, 0])
    with pytest.raises(ConfigError, match="in_channels"):
        PlainCNN(0)
    net = PlainCNN(2, [4, 8, 16])
    with pytest.raises(ChannelMismatchError, match="3 channels"):
        net(_images(1, 3, 16))
    with pytest.raises(InputError, match="floating"):
        net(torch.zeros(1, 2, 16, 16, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="at least 8 px"):
        net(_images(1, 2, 4))


def test_registered_as_plain_cnn():
    net = build_image_encoder("plain_cnn", 5, 32, widths=[8, 16])
    assert isinstance(net, PlainCNN) and net.embed_dim == 16 and net.in_channels == 5
    assert build_image_encoder("plain_cnn", 1, 32).embed_dim == 128
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['base_width'\]; valid: \['widths'\]"):
        build_image_encoder("plain_cnn", 2, 32, base_width=8)


@pytest.fixture(scope="module")
def cells() -> CellImages:
    """64 crops, 2 channels, 16 px, uint8: a blob at a random place."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:16, :16]
    centre = rng.uniform(4, 12, size=(64, 2))
    blob = np.exp(-((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2) / 8.0)
    x = 20 + 180 * blob[:, None] * rng.uniform(0.5, 1.0, (64, 2, 1, 1)) + rng.normal(0, 5, (64, 2, 16, 16))
    return CellImages.from_array(np.clip(x, 0, 255).astype(np.uint8), channel_names=["dna", "actin"])


@pytest.mark.parametrize("method", ["simclr", "byol", "dino"])
def test_any_joint_embedding_method_pretrains_it_and_the_model_round_trips(cells, tmp_path, method):
    """Two steps of pretraining move the encoder's weights away from the seeded start; the saved model stores the
    widths as a JSON list and loads back to the same embeddings."""
    recipe = tiny_image_recipe(method, encoder=PLAIN, data={"batch_size": 16})
    out = tmp_path / "run"
    model = pretrain(recipe, cells, out, max_steps=2)
    assert isinstance(model.encoder, PlainCNN) and model.embed_dim == 8
    torch.manual_seed(recipe.train.seed)  # pretraining seeds the same way before building the model
    start = build_method(tiny_image_recipe(method, encoder=PLAIN), image_contract(cells)).encoder.state_dict()
    weights = {k: v for k, v in model.encoder.state_dict().items() if k.endswith("weight")}
    assert all((v - start[k]).abs().max() < 0.05 for k, v in weights.items())  # the same start, two small steps
    assert [k for k, v in weights.items() if not torch.equal(v, start[k])]  # that moved the weights
    assert json.loads((out / "model" / "config.json").read_text())["recipe"]["encoder"]["options"] == {
        "widths": [4, 8]}
    restored = load(out)
    assert isinstance(restored.encoder, PlainCNN) and restored.encoder.widths == [4, 8]
    batch = torch.from_numpy(cells.batch(np.arange(16)))
    torch.testing.assert_close(restored.embed(batch), model.cpu().embed(batch))


def test_image_mae_refuses_it(cells):
    with pytest.raises(ConfigError, match="image MAE needs a ViT encoder"):
        build_method(tiny_image_recipe("mae", encoder=PLAIN), image_contract(cells))
