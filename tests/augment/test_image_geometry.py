"""Tests of the geometry of sslcell.augment.image: ``random_resized_crop_flip_rotate`` against
``grid_sample`` (with torch's own ``affine_grid``), ``torch.flip`` and ``torch.rot90`` for the
parameters it drew, and ``ImageAugment``'s crops against the functional op; ``dihedral_views``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sslcell.augment.image import (
    ImageAugment,
    ImageAugmentConfig,
    dihedral_views,
    random_resized_crop_flip_rotate,
)
from sslcell.errors import InputError
from tests.augment.conftest import OFF, gen, images

# --- geometry ------------------------------------------------------------------------------------


def grid_sample_reference(x, theta, out_h, out_w, padding_mode):
    """The resampling the module documents, with torch's own affine_grid."""
    grid = F.affine_grid(theta, (x.shape[0], x.shape[1], out_h, out_w), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


@pytest.mark.parametrize("padding_mode", ["reflection", "border"])
@pytest.mark.parametrize("shape,out", [((3, 32, 32), (32, 32)), ((2, 40, 40), (24, 24)),
                                        ((1, 30, 50), (20, 36)), ((5, 17, 23), (40, 31))])
def test_separable_path_equals_grid_sample_for_the_same_parameters(padding_mode, shape, out):
    x = images(96, *shape)
    y, params = random_resized_crop_flip_rotate(
        x, out, scale=(0.1, 1.0), ratio=(0.5, 2.0), hflip=0.5, vflip=0.5, rot90=True,
        padding_mode=padding_mode, generator=gen(1), return_params=True)
    assert (params["angle"] == 0).all()  # all crops took the separable path
    assert set(params["rot90_k"].tolist()) == ({0, 1, 2, 3} if shape[1] == shape[2] else {0, 2})  # half turns only
    assert params["hflip"].any() and params["vflip"].any() and not params["hflip"].all()
    ref = grid_sample_reference(x, params["theta"], *out, padding_mode)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-4)  # float rounding of coordinates


@pytest.mark.parametrize("padding_mode", ["reflection", "zeros"])
def test_rotated_and_unrotated_crops_together_equal_grid_sample(padding_mode):
    x = images(200, 3, 28, 28)
    y, params = random_resized_crop_flip_rotate(
        x, 24, scale=(0.3, 1.0), ratio=(0.75, 1.33), hflip=0.5, vflip=0.5, rot90=True,
        rotation_degrees=30.0, padding_mode=padding_mode, generator=gen(2), return_params=True,
        rotation_p=0.5)
    rotated = params["angle"] != 0
    assert 70 < int(rotated.sum()) < 130  # rotation_p = 0.5
    assert params["angle"].abs().max() > 20
    ref = grid_sample_reference(x, params["theta"], 24, 24, padding_mode)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-4)  # float rounding of coordinates


def test_default_rotation_p_of_the_function_rotates_every_crop():
    _, params = random_resized_crop_flip_rotate(images(64, 1, 8, 8), rotation_degrees=10.0,
                                                generator=gen(), return_params=True)
    assert (params["angle"] != 0).all()


@pytest.mark.parametrize("size", [64, 40, 33])
def test_identity_geometry_returns_the_input(size):
    x = images(10, 3, size, size)
    torch.testing.assert_close(random_resized_crop_flip_rotate(x, generator=gen()), x,
                               rtol=0, atol=1e-5)
    out = ImageAugment(ImageAugmentConfig(**OFF))(x, gen())
    torch.testing.assert_close(out, x, rtol=0, atol=0)


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
    cfg = ImageAugmentConfig(**{**OFF, "hflip": 0.5, "vflip": 0.5, "rot90": True})
    torch.testing.assert_close(ImageAugment(cfg)(x, gen(1)), out, rtol=0, atol=0)


def test_a_whole_non_square_image_is_never_stretched():
    """The whole 12 x 20 image at scale 1, ratio 1: flipped and turned by 0 or 180 degrees only, each view exact.
    Before, ratio 1 meant a square crop (a 12 x 12 part stretched to 12 x 20) and a quarter turn stretched it too."""
    x = images(64, 2, 12, 20)
    y, params = random_resized_crop_flip_rotate(x, hflip=0.5, vflip=0.5, rot90=True, generator=gen(3),
                                                return_params=True)
    assert set(params["rot90_k"].tolist()) == {0, 2}
    for i in range(64):
        ref = x[i]
        ref = ref.flip(-1) if params["hflip"][i] else ref
        ref = ref.flip(-2) if params["vflip"][i] else ref
        ref = ref.flip(-1, -2) if int(params["rot90_k"][i]) == 2 else ref
        torch.testing.assert_close(y[i], ref, rtol=0, atol=1e-5)
    taller = images(4, 1, 40, 32)
    torch.testing.assert_close(ImageAugment(ImageAugmentConfig(**OFF))(taller, gen()), taller, rtol=0, atol=0)


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


def test_rotation_is_in_pixel_space_for_non_square_images():
    """Rotating a round blob in a 31 x 51 image about its centre leaves it round (no shear)."""
    h, w = 31, 51
    yy, xx = torch.meshgrid(torch.arange(h) - 15.0, torch.arange(w) - 25.0, indexing="ij")
    blob = torch.exp(-(xx**2 + yy**2) / (2 * 4.0**2)).expand(8, 1, h, w).contiguous()
    out, params = random_resized_crop_flip_rotate(
        blob, scale=(1.0, 1.0), ratio=(1.0, 1.0), rotation_degrees=45.0,
        padding_mode="zeros", generator=gen(), return_params=True)
    assert params["angle"].abs().max() > 20  # real rotations happened
    torch.testing.assert_close(out, blob, rtol=0, atol=0.02)


def test_image_augment_geometry_equals_the_functional_op():
    x = images(70, 3, 36, 36)
    cfg = ImageAugmentConfig(**{**OFF, "output_size": 32, "scale": (0.4, 1.0), "hflip": 0.5,
                                "vflip": 0.5, "rot90": True, "rotation_degrees": 20.0})
    out = ImageAugment(cfg)(x, gen(4))
    ref = random_resized_crop_flip_rotate(x, 32, cfg.scale, cfg.ratio, 0.5, 0.5, True, 20.0,
                                          generator=gen(4), rotation_p=cfg.rotation_p)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu_geometry():
    x = images(50, 3, 32, 32)
    kwargs = dict(output_size=24, scale=(0.3, 1.0), hflip=0.5, vflip=0.5, rot90=True,
                  rotation_degrees=15.0, rotation_p=0.5, return_params=True)
    y_cpu, params = random_resized_crop_flip_rotate(x, generator=gen(14), **kwargs)
    y_gpu, _ = random_resized_crop_flip_rotate(x.cuda(), generator=gen(14), **kwargs)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=0, atol=1e-4)
    aug = ImageAugment(ImageAugmentConfig(output_size=24))
    assert aug(x.cuda(), gen(15)).device.type == "cuda"


def test_dihedral_views_are_the_lossless_orientations():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    views = dihedral_views(x)
    assert len(views) == 8 and torch.equal(views[0], x)
    keys = {tuple(v.flatten().tolist()) for v in views}
    assert len(keys) == 8  # all distinct
    assert {tuple(v.flatten().tolist()) for v in dihedral_views(x.transpose(-1, -2).rot90(1, (-2, -1)))} == keys
    rect = torch.randn(1, 2, 4, 6)
    views = dihedral_views(rect)
    assert len(views) == 4 and all(v.shape == rect.shape for v in views)
    assert torch.equal(views[0], rect) and torch.equal(views[3], rect.flip(-1, -2).flip(-1))
    with pytest.raises(InputError, match="dihedral_views"):
        dihedral_views(torch.zeros(3, 5, 5))
