"""Tests of sslcell.augment.image against known answers and hand-written references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sslcell.augment.image import (
    ImageAugment,
    ImageAugmentConfig,
    gaussian_blur,
    gaussian_noise,
    intensity_jitter,
    random_resized_crop_flip_rotate,
    two_views,
)
from sslcell.errors import ConfigError, InputError

IDENTITY = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, vflip=0.0, rot90=False,
                rotation_degrees=0.0, brightness=0.0, contrast=0.0, gamma=0.0, blur_p=0.0,
                noise_p=0.0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int = 8, c: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn((b, c, h, w), generator=gen(seed))


@pytest.mark.parametrize("size", [64, 40])
def test_identity_config_returns_input(size):
    x = images(4, 3, size, size)
    out = ImageAugment(ImageAugmentConfig(**IDENTITY))(x, gen())
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)


def test_flips_and_rot90_equal_torch_flip_and_rot90():
    x = images(64, 2, 16, 16)
    out, params = random_resized_crop_flip_rotate(x, hflip=0.5, vflip=0.5, rot90=True,
                                                  generator=gen(1), return_params=True)
    seen = set()
    for i in range(x.shape[0]):
        ref = x[i]
        if params["hflip"][i]:
            ref = ref.flip(-1)
        if params["vflip"][i]:
            ref = ref.flip(-2)
        k = int(params["rot90_k"][i])
        ref = torch.rot90(ref, k, dims=(-2, -1))
        torch.testing.assert_close(out[i], ref, rtol=0, atol=1e-6)
        seen.add((k, bool(params["hflip"][i]), bool(params["vflip"][i])))
    assert len(seen) >= 12  # most of the 16 combinations occur in 64 draws
    # the module draws the same parameters in the same order
    cfg = ImageAugmentConfig(**{**IDENTITY, "hflip": 0.5, "vflip": 0.5, "rot90": True})
    torch.testing.assert_close(ImageAugment(cfg)(x, gen(1)), out, rtol=0, atol=0)


def test_crop_extent_and_centre_on_a_ramp():
    """Input value = column index; a half-width crop steps 0.5 columns per output pixel."""
    w = 64
    ramp = torch.arange(w, dtype=torch.float32).expand(6, 1, w, w).contiguous()
    out, params = random_resized_crop_flip_rotate(ramp, scale=(0.25, 0.25), ratio=(1.0, 1.0),
                                                  generator=gen(2), return_params=True)
    torch.testing.assert_close(params["crop_w"], torch.full((6,), 0.5))
    steps = out[..., 1:] - out[..., :-1]
    torch.testing.assert_close(steps, torch.full_like(steps, 0.5), rtol=0, atol=1e-4)
    centre_px = ((params["centre_x"] + 1) * w - 1) / 2
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), centre_px, rtol=0, atol=1e-3)


@pytest.mark.parametrize("padding_mode", ["reflection", "border"])
def test_crops_of_constant_image_stay_constant(padding_mode):
    x = torch.full((16, 3, 24, 24), 3.7)
    cfg = dict(scale=(0.2, 1.0), ratio=(0.5, 2.0), hflip=0.5, vflip=0.5, rot90=True,
               rotation_degrees=30.0, padding_mode=padding_mode)
    out = random_resized_crop_flip_rotate(x, output_size=(20, 28), generator=gen(), **cfg)
    assert out.shape == (16, 3, 20, 28)
    torch.testing.assert_close(out, torch.full_like(out, 3.7), rtol=0, atol=1e-5)


def reference_intensity(x, gamma, factor, shift):
    """Hand-written gamma (on min-max rescaled channels), contrast, brightness."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    span = (x.amax(dim=(2, 3), keepdim=True) - lo).clamp_min(1e-12)
    y = lo + span * ((x - lo) / span) ** gamma[:, :, None, None]
    mean = y.mean(dim=(2, 3), keepdim=True)
    return factor[:, :, None, None] * (y - mean) + mean + shift[:, :, None, None]


def test_intensity_jitter_matches_reference_and_channels_differ():
    x = images(32, 4, 16, 16).double()
    out, params = intensity_jitter(x, brightness=0.3, contrast=0.4, gamma=0.5, p=1.0,
                                   generator=gen(3), return_params=True)
    ref = reference_intensity(x, params["gamma"], params["factor"], params["shift"])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-8)
    assert (params["gamma"] >= 1 / 1.5 - 1e-9).all() and (params["gamma"] <= 1.5 + 1e-9).all()
    assert (params["factor"] - 1).abs().max() <= 0.4 and params["shift"].abs().max() <= 0.3
    for name in ("gamma", "factor", "shift"):  # every sample jitters its channels separately
        assert (params[name].std(dim=1) > 1e-3).all(), name


def test_intensity_jitter_probability_leaves_unchosen_samples_alone():
    x = images(200, 2, 8, 8)
    out, params = intensity_jitter(x, brightness=0.3, p=0.5, generator=gen(4), return_params=True)
    unchanged = (out == x).flatten(1).all(1)
    assert 60 < int(unchanged.sum()) < 140
    assert (params["shift"][unchanged] == 0).all()
    # brightness is a constant per image-channel shift
    diff = out - x
    torch.testing.assert_close(diff, params["shift"][:, :, None, None].expand_as(diff),
                               rtol=0, atol=1e-6)


def test_channels_are_augmented_independently():
    """Changing one channel's content leaves the other channels' output unchanged."""
    x = images(8, 3, 32, 32)
    x2 = x.clone()
    x2[:, 1] = x2[:, 1] * 5 + 2
    aug = ImageAugment(ImageAugmentConfig(output_size=24, blur_p=0.5, noise_p=0.5))
    out, out2 = aug(x, gen(5)), aug(x2, gen(5))
    torch.testing.assert_close(out[:, [0, 2]], out2[:, [0, 2]], rtol=0, atol=1e-5)
    assert not torch.allclose(out[:, 1], out2[:, 1])


def test_reproducible_with_seed_and_different_across_samples_and_views():
    x = images(1, 2, 32, 32).expand(16, -1, -1, -1).contiguous()  # 16 copies of one image
    aug = ImageAugment(ImageAugmentConfig(output_size=24))
    a, b = aug(x, gen(7)), aug(x, gen(7))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, aug(x, gen(8)))
    flat = a.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(16) * 1e9).min() > 1e-3  # all samples differ
    v1, v2 = two_views(aug, x, gen(9))
    assert v1.shape == v2.shape == (16, 2, 24, 24)
    assert (v1 - v2).flatten(1).abs().amax(1).min() > 1e-3


@pytest.mark.parametrize("channels", [1, 2, 5, 8])
@pytest.mark.parametrize("output_size,expected", [(None, (40, 40)), (32, (32, 32)),
                                                  ((24, 36), (24, 36))])
def test_any_channel_count_and_output_size(channels, output_size, expected):
    x = images(6, channels, 40, 40)
    out = ImageAugment(ImageAugmentConfig(output_size=output_size, blur_p=1.0, noise_p=1.0))(
        x, gen())
    assert out.shape == (6, channels, *expected) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_blur_matches_torchvision_and_keeps_constant_images():
    from torchvision.transforms.functional import gaussian_blur as tv_blur

    x = images(4, 3, 20, 20)
    out = gaussian_blur(x, sigma=(1.0, 1.0), p=1.0, generator=gen())
    ref = tv_blur(x, kernel_size=[7, 7], sigma=[1.0, 1.0])  # radius ceil(3 * sigma) = 3
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    const = torch.full((4, 2, 16, 16), -1.25)
    torch.testing.assert_close(gaussian_blur(const, p=1.0, generator=gen()), const,
                               rtol=0, atol=1e-6)


def test_blur_reduces_noise_variance_and_respects_probability():
    noise = images(64, 2, 32, 32)
    blurred = gaussian_blur(noise, sigma=(0.8, 1.5), p=1.0, generator=gen())
    assert (blurred.var(dim=(1, 2, 3)) < 0.5 * noise.var(dim=(1, 2, 3))).all()
    torch.testing.assert_close(blurred.mean(), noise.mean(), rtol=0, atol=1e-2)
    partly = gaussian_blur(noise, p=0.3, generator=gen(1))
    unchanged = (partly == noise).flatten(1).all(1)
    assert 30 < int(unchanged.sum()) < 60


def test_noise_std_and_probability():
    x = torch.zeros(400, 2, 32, 32)
    out = gaussian_noise(x, std=0.2, p=0.5, generator=gen())
    per_sample = out.flatten(1).std(1)
    noisy = per_sample > 0
    assert 150 < int(noisy.sum()) < 250
    assert per_sample.max() < 0.2 * 1.1
    # std uniform in [0, 0.2]: mean 0.1
    assert abs(float(per_sample[noisy].mean()) - 0.1) < 0.015


@pytest.mark.parametrize("value", [0.0, 5.0, -3.0])
def test_no_nan_for_constant_images(value):
    x = torch.full((8, 3, 16, 16), value)
    cfg = ImageAugmentConfig(p_intensity=1.0, gamma=0.5, noise_p=0.0)
    out = ImageAugment(cfg)(x, gen())
    assert torch.isfinite(out).all()
    # only brightness can move a constant image: each channel stays constant
    assert out.flatten(2).std(2).max() < 1e-5


def test_input_and_config_errors_name_the_problem():
    aug = ImageAugment()
    with pytest.raises(InputError, match="float"):
        aug(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(InputError, match=r"\(B, C, H, W\)"):
        aug(torch.zeros(3, 8, 8))
    with pytest.raises(ConfigError, match="hflip"):
        ImageAugmentConfig(hflip=1.5)
    with pytest.raises(ConfigError, match="scale"):
        ImageAugmentConfig(scale=(0.0, 1.0))


def test_rotation_is_in_pixel_space_for_non_square_images():
    """Rotating a round blob in a 31 x 51 image about its centre leaves it round (no shear)."""
    h, w = 31, 51
    yy, xx = torch.meshgrid(torch.arange(h) - 15.0, torch.arange(w) - 25.0, indexing="ij")
    blob = torch.exp(-(xx**2 + yy**2) / (2 * 4.0**2)).expand(8, 1, h, w).contiguous()
    out, params = random_resized_crop_flip_rotate(
        blob, scale=(1.0, 1.0), ratio=(w / h, w / h), rotation_degrees=45.0,
        padding_mode="zeros", generator=gen(), return_params=True)
    assert params["angle"].abs().max() > 20  # real rotations happened
    torch.testing.assert_close(out, blob, rtol=0, atol=0.02)
