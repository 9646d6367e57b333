"""Image models: ImageInputs (contract, normalisation, checks, views) and the methods MAE, SimCLR, BYOL, DINO."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from sslcell.checkpoint import load, save_model
from sslcell.data.images import CellImages
from sslcell.errors import ChannelMismatchError, ConfigError, InputError
from sslcell.methods import build_method
from sslcell.methods.contracts import ImageContract
from sslcell.methods.inputs import ImageInputs
from tests.conftest import TINY_IMAGE_ENCODERS
from tests.conftest import tiny_image_recipe as image_recipe

C, S = 4, 16  # channels, crop side
NAMES = ["brightfield", "dna", "darkfield", "actin"]
ENCODERS = TINY_IMAGE_ENCODERS


def make_crops(n: int = 32, size: tuple[int, int] = (S, S), dtype=np.uint16, seed: int = 0) -> np.ndarray:
    """Structured crops ``(n, C, H, W)``: a gaussian cell at a random place, channel intensities on different scales."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    centre = rng.uniform(4, [h - 4, w - 4], size=(n, 2))
    radius = rng.uniform(2, 4, size=(n, 1, 1))
    blob = np.exp(-((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2) / (2 * radius**2))
    top = np.iinfo(dtype).max
    scale = np.array([0.9, 0.3, 0.05, 0.6])[:C] * top  # channels on very different scales
    offset = np.array([0.05, 0.0, 0.01, 0.1])[:C] * top
    x = offset[None, :, None, None] + scale[None, :, None, None] * blob[:, None] * rng.uniform(0.5, 1.0, (n, C, 1, 1))
    x = x + rng.normal(0, 0.01 * top, x.shape)
    return np.clip(x, 0, top).astype(dtype)


def image_contract(crops: np.ndarray, names=NAMES) -> dict:
    stats = CellImages.from_array(crops, channel_names=names).channel_stats()
    return {"modality": "image", "channel_names": list(names), "channel_mean": stats["mean"],
            "channel_std": stats["std"], "image_size": list(crops.shape[2:]), "dtype": str(crops.dtype)}


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    return make_crops(200)


@pytest.fixture(scope="module")
def batch(crops) -> torch.Tensor:
    return torch.from_numpy(crops[:32])


# ------------------------------------------------------------------------------------------- ImageInputs
@pytest.mark.parametrize("dtype", [np.uint16, np.uint8])
def test_normalize_standardises_each_channel(dtype):
    x = make_crops(200, dtype=dtype, seed=1)
    c = image_contract(x)
    inputs = ImageInputs(c)
    assert c["channel_std"][0] > 10 * c["channel_std"][2]  # the test data really has channels on different scales
    out = inputs.normalize(torch.from_numpy(x))
    assert out.dtype == torch.float32 and out.shape == x.shape
    per_channel = out.double().transpose(0, 1).reshape(C, -1)
    np.testing.assert_allclose(per_channel.mean(1).numpy(), 0.0, atol=1e-4)
    np.testing.assert_allclose(per_channel.std(1, unbiased=False).numpy(), 1.0, atol=1e-4)
    mean, std = np.asarray(c["channel_mean"])[:, None, None], np.asarray(c["channel_std"])[:, None, None]
    ref = (x.astype(np.float64) - mean) / std
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4)


def _inputs(size=(S, S)) -> ImageInputs:
    return ImageInputs(ImageContract(channel_names=tuple(NAMES), channel_mean=(100.0,) * C, channel_std=(10.0,) * C,
                                     image_size=tuple(size)))


def test_inputs_are_checked():
    inputs = _inputs()
    with pytest.raises(ChannelMismatchError, match=r"3 channels.*expects 4"):
        inputs.normalize(torch.zeros(2, 3, S, S, dtype=torch.uint16))
    with pytest.raises(ChannelMismatchError, match=r"5 channels.*expects 4"):
        inputs.views(torch.zeros(2, 5, S, S, dtype=torch.uint16), torch.Generator().manual_seed(0))
    with pytest.raises(InputError, match=r"\(16, 12\).*\(16, 16\)"):
        inputs.normalize(torch.zeros(2, C, S, 12, dtype=torch.uint8))
    with pytest.raises(InputError, match="4-D"):
        inputs.normalize(torch.zeros(C, S, S, dtype=torch.uint8))
    bad = torch.zeros(2, C, S, S)
    bad[1, 2, 3, 4] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        inputs.normalize(bad)
    bad[1, 2, 3, 4] = float("inf")
    with pytest.raises(InputError, match="inf"):
        inputs.normalize(bad)
    with pytest.raises(InputError, match=r"images are float32; the model was trained on uint8 crops"):
        inputs.normalize(torch.rand(2, C, S, S))  # crops rescaled to [0, 1]: refused, not collapsed silently
    floats = ImageInputs(ImageContract(channel_names=tuple(NAMES), channel_mean=(0.4,) * C, channel_std=(0.1,) * C,
                                       image_size=(S, S), dtype="float32"))
    assert floats.normalize(torch.rand(2, C, S, S)).shape == (2, C, S, S)
    with pytest.raises(InputError, match=r"images are uint8; the model was trained on float32 crops .*means 0\.4"):
        floats.normalize(torch.full((2, C, S, S), 200, dtype=torch.uint8))  # 0..255 for a [0, 1] model: refused


def test_views_differ_and_are_reproducible(batch):
    inputs = ImageInputs(image_contract(batch.numpy()))
    original = batch.clone()
    views = inputs.views(batch, torch.Generator().manual_seed(5), n=3)
    assert len(views) == 3 and all(v.shape == (32, C, S, S) and v.dtype == torch.float32 for v in views)
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.allclose(views[i], views[j])
    again = inputs.views(batch, torch.Generator().manual_seed(5), n=3)
    assert all(torch.equal(a, b) for a, b in zip(views, again, strict=True))
    other = inputs.views(batch, torch.Generator().manual_seed(6), n=3)
    assert not torch.allclose(views[0], other[0])
    assert torch.equal(batch, original)  # the raw batch is left alone
    assert abs(float(views[0].mean())) < 1.0  # views are made from normalised crops, not raw uint16 values


def test_contract_round_trips_through_build_save_load(crops, batch, tmp_path):
    contract = image_contract(crops)
    model = build_method(image_recipe("simclr"), contract)
    assert model.inputs.channel_names == NAMES and model.encoder.in_channels == C
    stored = model.inputs.contract.to_dict()
    assert stored["channel_names"] == NAMES and stored["image_size"] == [S, S] and stored["dtype"] == "uint16"
    np.testing.assert_allclose(stored["channel_mean"], contract["channel_mean"], rtol=1e-6)
    np.testing.assert_allclose(stored["channel_std"], contract["channel_std"], rtol=1e-6)
    # train a step so the saved state differs from a fresh build (BatchNorm running stats, weights)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss, _ = model.loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    opt.step()
    save_model(model, tmp_path / "m")
    restored = load(tmp_path / "m")
    assert restored.inputs.contract.to_dict() == stored
    assert torch.equal(restored.embed(batch), model.embed(batch))
    fresh = build_method(image_recipe("simclr"), stored)
    assert not torch.allclose(fresh.embed(batch), model.embed(batch))


def test_output_size_other_than_the_crop_is_refused_at_build(crops):
    contract = image_contract(crops)
    with pytest.raises(ConfigError, match=r"output_size.*16x16"):
        build_method(image_recipe("simclr", method={"augment": {"output_size": 12}}), contract)
    with pytest.raises(ConfigError, match="output_size"):
        build_method(image_recipe("byol", method={"augment": {"output_size": [16, 12]}}), contract)
    model = build_method(image_recipe("simclr", method={"augment": {"output_size": [16, 16]}}), contract)
    assert model.inputs.augment_config.output_size == (16, 16)


def test_vit_needs_square_crops_resnet_does_not():
    x = make_crops(8, size=(16, 12))
    contract = image_contract(x)
    with pytest.raises(ConfigError, match=r"square.*16x12"):
        build_method(image_recipe("dino", "vit"), contract)
    model = build_method(image_recipe("simclr", "resnet"), contract)
    assert model.embed(torch.from_numpy(x)).shape == (8, model.embed_dim)
    with pytest.raises(InputError, match=r"\(12, 16\)"):
        model.embed(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 1, 3, 2))))


def test_unknown_method_and_mae_on_resnet_are_config_errors(crops):
    with pytest.raises(ConfigError, match="ViT"):
        build_method(image_recipe("mae", "resnet"), image_contract(crops))
    with pytest.raises(ConfigError, match="barlow_twins"):
        image_recipe("barlow_twins")


# ------------------------------------------------------------------------------------------------ methods
METHODS = [("mae", "vit"), ("simclr", "resnet"), ("simclr", "vit"), ("byol", "resnet"), ("dino", "vit"),
           ("dino", "resnet")]


@pytest.mark.parametrize("method,encoder", METHODS)
def test_loss_is_finite_and_training_moves_it(crops, batch, method, encoder):
    torch.manual_seed(0)
    extra = {"method": {"n_views": 3}} if method == "dino" else {}
    model = build_method(image_recipe(method, encoder, **extra), image_contract(crops))
    model.train()
    before = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(12):
        loss, logs = model.loss(batch, torch.Generator().manual_seed(0))  # same views each step: a fixed objective
        assert loss.ndim == 0 and isinstance(logs, dict)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    if method in ("mae", "simclr", "byol"):  # DINO's teacher centre moves with every call: no fixed objective
        assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    if method == "byol":
        assert all(-1.0 <= v <= 1.0 for v in losses)  # negative cosine similarity
    after = dict(model.named_parameters())
    moved = [k for k, p in before.items() if not torch.equal(p, after[k].detach())]
    assert any(k.startswith("encoder.") for k in moved)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if method in ("byol", "dino"):  # the momentum networks get no gradient
        target = model.encoder_momentum if method == "byol" else model.teacher_encoder
        assert not any(p.requires_grad for p in target.parameters())


@pytest.mark.parametrize("method,encoder", METHODS)
def test_embed_is_float32_of_encoder_width_and_deterministic(crops, batch, method, encoder):
    model = build_method(image_recipe(method, encoder, encoder={"options": {**ENCODERS[encoder]["options"]}}),
                         image_contract(crops))
    model.train()
    emb = model.embed(batch)
    assert emb.shape == (32, model.encoder.embed_dim) and emb.dtype == torch.float32
    assert model.embed_dim == model.encoder.embed_dim
    assert torch.isfinite(emb).all()
    assert torch.equal(model.embed(batch), emb)
    torch.testing.assert_close(model.embed(batch[:5]), emb[:5])  # eval mode: no batch statistics
    assert model.training  # restored
    normalized = model.inputs.normalize(batch)
    torch.testing.assert_close(model.embed(normalized, normalized=True), emb)


def test_vit_embed_ignores_drop_path(crops, batch):
    options = {**ENCODERS["vit"]["options"], "drop_path": 0.5, "depth": 2}
    model = build_method(image_recipe("simclr", "vit", encoder={"options": options}), image_contract(crops))
    model.train()
    assert torch.equal(model.embed(batch), model.embed(batch))


@pytest.mark.parametrize("mask_rate", [0.75, 0.5])
def test_mae_encoder_sees_only_visible_tokens(crops, batch, mask_rate):
    model = build_method(image_recipe("mae", "vit", method={"mask_rate": mask_rate}), image_contract(crops))
    n_patches = (S // 4) ** 2
    seen = []
    model.encoder.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    loss, _ = model.loss(batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    assert seen == [(32, 1 + round(n_patches * (1 - mask_rate)), 32)]
    seen.clear()
    model.embed(batch)  # inference: every patch
    assert seen == [(32, 1 + n_patches, 32)]


def test_mae_loss_scores_masked_patches_only(crops, batch):
    """The loss equals the normalised-pixel error recomputed by hand over the masked patches."""
    model = build_method(image_recipe("mae", "vit", method={"mask_rate": 0.75}), image_contract(crops))
    loss, _ = model.loss(batch, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # replay the same draws
    x = model.inputs.augment(model.inputs.normalize(batch), g)
    tokens, mask, ids_restore = model.encoder.forward_features(x, 0.75, g)
    pred = model.decoder(tokens, ids_restore)  # (N, L, p*p*C)
    p = 4
    target = x.unfold(2, p, p).unfold(3, p, p)  # (N, C, 4, 4, p, p)
    target = target.permute(0, 2, 3, 4, 5, 1).reshape(32, (S // p) ** 2, p * p * C)  # (p, p, C) pixel order
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((pred - target) ** 2).mean(-1)
    assert mask.sum().item() == 32 * 12
    torch.testing.assert_close(loss, per_patch[mask.bool()].mean(), rtol=1e-4, atol=1e-5)


def test_unnamed_channels_are_positions_not_names():
    """A model of 2 unnamed channels on 3 unnamed ones: refused unless told which (channel_0 names no stain)."""
    inputs = ImageInputs({"modality": "image", "channel_names": ["channel_0", "channel_1"], "channel_mean": [0, 0],
                          "channel_std": [1, 1], "image_size": [8, 8], "dtype": "uint8"})
    three = CellImages.from_array(np.zeros((4, 3, 8, 8), dtype=np.uint8))
    with pytest.raises(ChannelMismatchError, match="3 unnamed channels, the model 2 unnamed ones"):
        inputs.align(three)
    with pytest.warns(UserWarning, match=r"channels \['channel_2', 'channel_0'\] are taken as the model's"):
        assert inputs.align(three, channels=[2, 0]).channel_names == ["channel_0", "channel_1"]
    assert inputs.align(three.select_channels([0, 1])).n_channels == 2


def test_other_positions_of_unnamed_crops_than_the_models_are_taken_with_a_warning():
    """A model pretrained on positions 0 and 2 of unnamed crops took [2, 0] or [1, 2] of the same crops silently."""
    inputs = ImageInputs({"modality": "image", "channel_names": ["channel_0", "channel_2"], "channel_mean": [0, 0],
                          "channel_std": [1, 1], "image_size": [8, 8], "dtype": "uint8"})
    three = CellImages.from_array(np.zeros((4, 3, 8, 8), dtype=np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert inputs.align(three, channels=[0, 2]).channel_names == ["channel_0", "channel_2"]  # the same: quiet
    for other in ([2, 0], [1, 2]):
        with pytest.warns(UserWarning, match="positions in the crops it was trained on"):
            inputs.align(three, channels=other)


def test_a_channel_that_never_varied_is_not_divided_by_a_millionth():
    """A channel all zero in pretraining: faint signal in new crops stayed x1e6 and swamped the embedding."""
    inputs = ImageInputs({"modality": "image", "channel_names": ["dna", "fl"], "channel_mean": [10.0, 0.0],
                          "channel_std": [2.0, 0.0], "image_size": [8, 8], "dtype": "uint8"})
    x = torch.full((1, 2, 8, 8), 2, dtype=torch.uint8)
    z = inputs.normalize(x)
    assert torch.allclose(z[:, 0], torch.tensor(-4.0)) and torch.allclose(z[:, 1], torch.tensor(2.0))


def test_integer_crops_on_another_intensity_scale_warn():
    """8-bit values in a uint16 array pass every dtype check and collapsed the embeddings without a word."""
    inputs = ImageInputs({"modality": "image", "channel_names": ["bf", "df"], "channel_mean": [14000.0, 7000.0],
                          "channel_std": [3000.0, 1500.0], "image_size": [8, 8], "dtype": "uint16"})
    rng = np.random.default_rng(0)
    full = rng.normal([14000, 7000], [3000, 1500], size=(40, 8, 8, 2)).clip(0, 65535).astype(np.uint16)
    full = CellImages.from_array(np.moveaxis(full, -1, 1).copy(), channel_names=["bf", "df"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inputs.align(full)  # the training scale, or 20% brighter (within the spread): quiet
        brighter = (np.asarray(full.images) * 1.2).astype(np.uint16)
        inputs.align(CellImages.from_array(brighter, channel_names=["bf", "df"]))
    low = CellImages.from_array(np.asarray(full.images) >> 8, channel_names=["bf", "df"])
    with pytest.warns(UserWarning, match=r"channel means bf 54\.\d+ \(model 1\.4e\+04 ± 3000\), df 2\d\.\d+ "
                                         r"\(model 7000 ± 1500\)"):
        inputs.align(low)
    dimmer = CellImages.from_array(np.asarray(full.images) // 4, channel_names=["bf", "df"])  # 2 bits short
    with pytest.warns(UserWarning, match=r"channel means bf 3\d{3}\.?\d* \(model 1\.4e\+04 ± 3000\), df 1\d{3}"):
        inputs.align(dimmer)
    blank = CellImages.from_array(np.asarray(full.images) * np.array([1, 0], np.uint16)[None, :, None, None],
                                  channel_names=["bf", "df"])
    with pytest.warns(UserWarning, match=r"channel means df 0 \(model 7000 ± 1500\)"):
        inputs.align(blank)


def test_twice_the_exposure_warns_but_not_on_a_sparse_channel():
    """A Jurkat-like brightfield (mean 675, spread 63) at twice the exposure lies 11 spreads off: a classifier called
    one class for every crop without a word (the warning came only at 16x). A stain's sparse bright spots (spread
    wider than the mean) at twice the intensity stay inside what the model saw."""
    inputs = ImageInputs({"modality": "image", "channel_names": ["bf", "spots"], "channel_mean": [675.0, 30.0],
                          "channel_std": [63.0, 100.0], "image_size": [8, 8], "dtype": "uint16"})
    rng = np.random.default_rng(0)
    bf = rng.normal(675, 63, size=(40, 1, 8, 8))
    spots = np.where(rng.random((40, 1, 8, 8)) < 0.1, 300.0, 0.0)
    x = np.concatenate([bf, spots], axis=1).clip(0, 65535)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inputs.align(CellImages.from_array(x.astype(np.uint16), channel_names=["bf", "spots"]))
        inputs.align(CellImages.from_array((x * [[[[1]], [[2]]]]).astype(np.uint16), channel_names=["bf", "spots"]))
    with pytest.warns(UserWarning, match=r"channel means bf 13\d\d \(model 675 ± 63\) are 1.5x or more and over 3 "):
        inputs.align(CellImages.from_array((x * 2).astype(np.uint16), channel_names=["bf", "spots"]))
