"""Tests of the fast paths of sslcell.augment.image against references that do not use them.

The separable (``embedding_bag``) resampling must give ``grid_sample``'s values for the same
drawn parameters, the chunked and threaded ``ImageAugment`` must give what the functional ops
give, and nothing may depend on the number of threads. (Behaviour tests of the ops themselves
are in test_image_augment.py.)
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from sslcell.augment import image as image_module
from sslcell.augment.image import (
    ImageAugment,
    ImageAugmentConfig,
    gaussian_blur,
    gaussian_noise,
    intensity_jitter,
    random_resized_crop_flip_rotate,
    two_views,
)

OFF = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, vflip=0.0, rot90=False,
           rotation_degrees=0.0, brightness=0.0, contrast=0.0, gamma=0.0, blur_p=0.0, noise_p=0.0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((b, c, h, w), generator=gen(seed))


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
    assert set(params["rot90_k"].tolist()) == {0, 1, 2, 3}
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


def test_upright_flips_of_a_whole_non_square_image_are_exact_flips():
    """The whole 12 x 20 image (aspect 20/12), flipped and turned by 0 or 180 degrees."""
    x = images(64, 2, 12, 20)
    y, params = random_resized_crop_flip_rotate(x, ratio=(20 / 12, 20 / 12), hflip=0.5, vflip=0.5,
                                                rot90=True, generator=gen(3), return_params=True)
    upright = 0
    for i in range(64):
        if int(params["rot90_k"][i]) % 2 == 0:
            ref = x[i]
            ref = ref.flip(-1) if params["hflip"][i] else ref
            ref = ref.flip(-2) if params["vflip"][i] else ref
            ref = ref.flip(-1, -2) if int(params["rot90_k"][i]) == 2 else ref
            torch.testing.assert_close(y[i], ref, rtol=0, atol=1e-5)
            upright += 1
    assert upright > 20


def test_image_augment_geometry_equals_the_functional_op():
    x = images(70, 3, 36, 36)
    cfg = ImageAugmentConfig(**{**OFF, "output_size": 32, "scale": (0.4, 1.0), "hflip": 0.5,
                                "vflip": 0.5, "rot90": True, "rotation_degrees": 20.0})
    out = ImageAugment(cfg)(x, gen(4))
    ref = random_resized_crop_flip_rotate(x, 32, cfg.scale, cfg.ratio, 0.5, 0.5, True, 20.0,
                                          generator=gen(4), rotation_p=cfg.rotation_p)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def reference_intensity(x, gamma, factor, shift):
    """Hand-written gamma (on min-max rescaled channels), contrast, brightness."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    span = (x.amax(dim=(2, 3), keepdim=True) - lo).clamp_min(1e-12)
    y = lo + span * ((x - lo) / span) ** gamma[:, :, None, None]
    mean = y.mean(dim=(2, 3), keepdim=True)
    return factor[:, :, None, None] * (y - mean) + mean + shift[:, :, None, None]


def test_image_augment_intensity_equals_reference_for_the_drawn_parameters():
    """ImageAugment reorders samples so those without gamma skip the power: same result."""
    x = images(150, 4, 16, 16)
    cfg = ImageAugmentConfig(**{**OFF, "brightness": 0.3, "contrast": 0.4, "gamma": 0.5,
                                "p_intensity": 0.6})
    out = ImageAugment(cfg)(x, gen(5))
    _, params = intensity_jitter(x, 0.3, 0.4, 0.5, 0.6, generator=gen(5), return_params=True)
    assert 40 < int((params["gamma"] == 1).all(1).sum()) < 80  # both kinds of sample occur
    ref = reference_intensity(x.double(), params["gamma"].double(), params["factor"].double(),
                              params["shift"].double())
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)


def test_intensity_jitter_with_probability_equals_reference():
    """Unsorted samples with and without gamma (the functional op does not reorder them)."""
    x = images(60, 3, 12, 12)
    out, params = intensity_jitter(x, 0.2, 0.3, 0.6, p=0.5, generator=gen(16), return_params=True)
    without = (params["gamma"] == 1).all(1)
    assert without[:10].any() and (~without[:10]).any()  # interleaved, not sorted
    ref = reference_intensity(x.double(), params["gamma"].double(), params["factor"].double(),
                              params["shift"].double())
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)


def torchvision_blur(x, sigma, radius):
    from torchvision.transforms.functional import gaussian_blur as tv_blur

    return tv_blur(x, kernel_size=[2 * radius + 1] * 2, sigma=[float(sigma)] * 2)


def test_blur_equals_torchvision_per_sample_on_non_square_images():
    x = images(24, 3, 14, 22)
    out = gaussian_blur(x, sigma=(0.3, 2.0), p=0.5, generator=gen(6))
    draws = gen(6)  # the draws gaussian_blur makes: sigmas, then which samples
    sigmas = torch.rand(24, generator=draws) * 1.7 + 0.3
    chosen = torch.rand(24, generator=draws) < 0.5
    assert 5 < int(chosen.sum()) < 19
    for i in range(24):  # radius ceil(3 * 2.0) = 6
        ref = torchvision_blur(x[i : i + 1], sigmas[i], 6)[0] if chosen[i] else x[i]
        torch.testing.assert_close(out[i], ref, rtol=0, atol=1e-5)


def test_image_augment_blur_equals_the_functional_op():
    x = images(130, 2, 20, 20)
    cfg = ImageAugmentConfig(**{**OFF, "blur_p": 0.4, "blur_sigma": (0.2, 1.2)})
    out = ImageAugment(cfg)(x, gen(7))
    ref = gaussian_blur(x, (0.2, 1.2), 0.4, gen(7))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    blurred = (out != x).flatten(1).any(1)
    assert 30 < int(blurred.sum()) < 75


def test_noise_of_different_chunks_is_independent(monkeypatch):
    """Each chunk draws from its own generator: their noise must not repeat."""
    monkeypatch.setattr(image_module, "_CHUNK_NUMEL", 8 * 16 * 16)  # chunks of 8 crops
    cfg = ImageAugmentConfig(**{**OFF, "noise_p": 1.0, "noise_std": 0.5})
    noise = ImageAugment(cfg)(torch.zeros(64, 1, 16, 16), gen(8)).flatten(1)
    per_sample = noise.std(1)
    assert (per_sample > 0).all() and per_sample.max() < 0.5 * 1.1
    unit = noise / noise.norm(dim=1, keepdim=True)
    correlation = (unit @ unit.T - torch.eye(64)).abs()
    assert correlation.max() < 0.3  # 256 pixels: independent noise gives |r| ~ 0.06


def test_noise_goes_to_the_chosen_samples_with_their_std():
    out = gaussian_noise(torch.zeros(40, 2, 32, 32), std=0.2, p=0.5, generator=gen(17))
    draws = gen(17)  # the draws gaussian_noise makes: stds, then which samples
    stds = torch.rand(40, generator=draws) * 0.2
    chosen = torch.rand(40, generator=draws) < 0.5
    assert 10 < int(chosen.sum()) < 30
    per_sample = out.flatten(1).std(1)
    assert (per_sample[~chosen] == 0).all()
    torch.testing.assert_close(per_sample[chosen], stds[chosen], rtol=0.1, atol=1e-3)


def test_two_views_equal_forward_on_the_concatenation():
    x = images(37, 3, 24, 24)  # 74 crops: chunks straddle the two copies
    aug = ImageAugment(ImageAugmentConfig(output_size=20, blur_p=0.5, noise_p=0.5))
    v1, v2 = two_views(aug, x, gen(9))
    both = aug(torch.cat([x, x]), gen(9))
    torch.testing.assert_close(torch.cat([v1, v2]), both, rtol=0, atol=0)
    assert (v1 - v2).flatten(1).abs().amax(1).min() > 1e-3


def test_results_do_not_depend_on_the_number_of_threads(monkeypatch):
    monkeypatch.setattr(image_module, "_CHUNK_NUMEL", 10 * 3 * 24 * 24)  # several chunks
    x = images(40, 3, 32, 32)
    aug = ImageAugment(ImageAugmentConfig(output_size=24, blur_p=0.5, noise_p=0.5))
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 3):
            torch.set_num_threads(threads)
            outs.append(aug(x, gen(10)))
            assert torch.get_num_threads() == threads  # the call restores the setting ...
            seen = []  # ... also as the default of threads started later
            later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
            later.start()
            later.join()
            assert seen == [threads]
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_seeded_runs_repeat_and_seeds_differ():
    x = images(20, 2, 32, 32)
    aug = ImageAugment(ImageAugmentConfig(output_size=28, blur_p=0.5, noise_p=0.5))
    torch.testing.assert_close(aug(x, gen(11)), aug(x, gen(11)), rtol=0, atol=0)
    assert not torch.allclose(aug(x, gen(11)), aug(x, gen(12)))
    a = gaussian_noise(x, 0.1, 1.0, gen(13))
    torch.testing.assert_close(a, gaussian_noise(x, 0.1, 1.0, gen(13)), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [1, 2, 7])
def test_dtype_shape_and_channels(dtype, channels):
    x = images(9, channels, 30, 26).to(dtype)
    out = ImageAugment(ImageAugmentConfig(output_size=(20, 16), blur_p=1.0, noise_p=1.0))(x, gen())
    assert out.shape == (9, channels, 20, 16) and out.dtype == dtype
    assert torch.isfinite(out).all()
    v1, v2 = two_views(ImageAugment(ImageAugmentConfig()), x, gen())
    assert v1.shape == v2.shape == x.shape and v1.dtype == dtype


def test_empty_batch():
    out = ImageAugment(ImageAugmentConfig(output_size=8))(torch.zeros(0, 3, 16, 16), gen())
    assert out.shape == (0, 3, 8, 8)


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
