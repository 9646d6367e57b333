"""Tests of sslcell.augment.image against known answers and hand-written references.

The ops are checked against torch/torchvision references (``grid_sample``, ``torch.flip``,
``torch.rot90``, torchvision's ``gaussian_blur``) and hand-written formulas for the parameters
they drew; ``ImageAugment`` (one chunked, threaded pipeline) must give what the functional ops
give; the drawn parameters and the noise must follow their documented distributions; nothing may
depend on the number of threads.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F

from sslcell.augment import image as image_module
from sslcell.augment.image import (
    ImageAugment,
    ImageAugmentConfig,
    dihedral_views,
    gaussian_blur,
    gaussian_noise,
    intensity_jitter,
    random_resized_crop_flip_rotate,
    two_views,
)
from sslcell.errors import ConfigError, InputError

OFF = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, vflip=0.0, rot90=False,
           rotation_degrees=0.0, brightness=0.0, contrast=0.0, gamma=0.0, blur_p=0.0, noise_p=0.0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int = 8, c: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn((b, c, h, w), generator=gen(seed))


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
        blob, scale=(1.0, 1.0), ratio=(w / h, w / h), rotation_degrees=45.0,
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


# --- intensity -----------------------------------------------------------------------------------


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


def test_intensity_jitter_with_probability_equals_reference():
    """Unsorted samples with and without gamma (the op computes them apart)."""
    x = images(60, 3, 12, 12)
    out, params = intensity_jitter(x, 0.2, 0.3, 0.6, p=0.5, generator=gen(16), return_params=True)
    without = (params["gamma"] == 1).all(1)
    assert without[:10].any() and (~without[:10]).any()  # interleaved, not sorted
    ref = reference_intensity(x.double(), params["gamma"].double(), params["factor"].double(),
                              params["shift"].double())
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)


def test_image_augment_intensity_equals_reference_for_the_drawn_parameters():
    """ImageAugment's chunks mix samples with and without gamma: same result."""
    x = images(150, 4, 16, 16)
    cfg = ImageAugmentConfig(**{**OFF, "brightness": 0.3, "contrast": 0.4, "gamma": 0.5,
                                "p_intensity": 0.6})
    out = ImageAugment(cfg)(x, gen(5))
    _, params = intensity_jitter(x, 0.3, 0.4, 0.5, 0.6, generator=gen(5), return_params=True)
    assert 40 < int((params["gamma"] == 1).all(1).sum()) < 80  # both kinds of sample occur
    ref = reference_intensity(x.double(), params["gamma"].double(), params["factor"].double(),
                              params["shift"].double())
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)


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


def test_intensity_parameters_follow_their_documented_distributions():
    """Each op is chosen per sample with probability p, independently of the others; its amount
    is uniform (factor, shift) or log-uniform (gamma) over the documented range."""
    b, p, brightness, contrast, gamma = 6000, 0.7, 0.3, 0.4, 0.5
    _, params = intensity_jitter(torch.randn(b, 2, 2, 2, generator=gen(20)), brightness,
                                 contrast, gamma, p, generator=gen(21), return_params=True)
    on = {k: (params[k] != (0.0 if k == "shift" else 1.0)).all(1) for k in params}
    for k, chosen in on.items():
        assert abs(float(chosen.float().mean()) - p) < 0.025, k
    for one, other in (("gamma", "factor"), ("gamma", "shift"), ("factor", "shift")):
        both = float((on[one] & on[other]).float().mean())
        assert abs(both - p * p) < 0.025, (one, other)
    unit = {  # each mapped to uniform [-1, 1] where applied
        "gamma": params["gamma"][on["gamma"]].log() / math.log1p(gamma),
        "factor": (params["factor"][on["factor"]] - 1) / contrast,
        "shift": params["shift"][on["shift"]] / brightness,
    }
    for k, u in unit.items():
        assert u.min() >= -1 - 1e-6 and u.max() <= 1 + 1e-6, k
        assert abs(float(u.mean())) < 0.03 and abs(float(u.var()) - 1 / 3) < 0.02, k
        histogram = torch.histc(u, bins=4, min=-1, max=1) / u.numel()
        assert (histogram - 0.25).abs().max() < 0.025, k


# --- blur ----------------------------------------------------------------------------------------


def torchvision_blur(x, sigma, radius):
    from torchvision.transforms.functional import gaussian_blur as tv_blur

    return tv_blur(x, kernel_size=[2 * radius + 1] * 2, sigma=[float(sigma)] * 2)


def test_blur_matches_torchvision_and_keeps_constant_images():
    x = images(4, 3, 20, 20)
    out = gaussian_blur(x, sigma=(1.0, 1.0), p=1.0, generator=gen())
    ref = torchvision_blur(x, 1.0, 3)  # radius ceil(3 * sigma) = 3
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    const = torch.full((4, 2, 16, 16), -1.25)
    torch.testing.assert_close(gaussian_blur(const, p=1.0, generator=gen()), const,
                               rtol=0, atol=1e-6)


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


def test_blur_reduces_noise_variance_and_respects_probability():
    noise = images(64, 2, 32, 32)
    blurred = gaussian_blur(noise, sigma=(0.8, 1.5), p=1.0, generator=gen())
    assert (blurred.var(dim=(1, 2, 3)) < 0.5 * noise.var(dim=(1, 2, 3))).all()
    torch.testing.assert_close(blurred.mean(), noise.mean(), rtol=0, atol=1e-2)
    partly = gaussian_blur(noise, p=0.3, generator=gen(1))
    unchanged = (partly == noise).flatten(1).all(1)
    assert 30 < int(unchanged.sum()) < 60


def test_image_augment_blur_equals_the_functional_op(monkeypatch):
    monkeypatch.setattr(image_module, "_CHUNK_NUMEL", 9 * 2 * 20 * 20)  # blurred rows in chunks
    x = images(130, 2, 20, 20)
    cfg = ImageAugmentConfig(**{**OFF, "blur_p": 0.4, "blur_sigma": (0.2, 1.2)})
    out = ImageAugment(cfg)(x, gen(7))
    ref = gaussian_blur(x, (0.2, 1.2), 0.4, gen(7))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    blurred = (out != x).flatten(1).any(1)
    assert 30 < int(blurred.sum()) < 75
    draws = gen(7)
    sigmas = torch.rand(130, generator=draws) * 1.0 + 0.2
    chosen = torch.rand(130, generator=draws) < 0.4
    assert torch.equal(blurred, chosen)  # exactly the chosen samples change ...
    for i in torch.nonzero(chosen).flatten()[:12].tolist():  # ... into their own blur
        torch.testing.assert_close(out[i], torchvision_blur(x[i : i + 1], sigmas[i], 4)[0],
                                   rtol=0, atol=1e-5)


# --- noise ---------------------------------------------------------------------------------------


def noise_draws(b: int, std: float, p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The draws gaussian_noise makes: stds uniform in [0, std], then which samples."""
    draws = gen(seed)
    return torch.rand(b, generator=draws) * std, torch.rand(b, generator=draws) < p


def test_noise_std_and_probability():
    x = torch.zeros(400, 2, 32, 32)
    out = gaussian_noise(x, std=0.2, p=0.5, generator=gen())
    per_sample = out.flatten(1).std(1)
    noisy = per_sample > 0
    assert 150 < int(noisy.sum()) < 250
    assert per_sample.max() < 0.2 * 1.1
    # std uniform in [0, 0.2]: mean 0.1, and uniform quantiles
    assert abs(float(per_sample[noisy].mean()) - 0.1) < 0.015
    quantiles = per_sample[noisy].sort().values / 0.2
    uniform = (torch.arange(len(quantiles)) + 0.5) / len(quantiles)
    assert (quantiles - uniform).abs().max() < 0.1  # Kolmogorov-Smirnov distance


def test_noise_goes_to_the_chosen_samples_with_their_std():
    out = gaussian_noise(torch.zeros(40, 2, 32, 32), std=0.2, p=0.5, generator=gen(17))
    stds, chosen = noise_draws(40, 0.2, 0.5, 17)
    assert 10 < int(chosen.sum()) < 30
    per_sample = out.flatten(1).std(1)
    assert (out[~chosen] == 0).all()
    torch.testing.assert_close(per_sample[chosen], stds[chosen], rtol=0.1, atol=1e-3)


def test_noise_within_a_sample_is_iid_standard_normal_times_its_std():
    b, std = 48, 0.3
    out = gaussian_noise(torch.zeros(b, 3, 32, 32), std=std, p=1.0, generator=gen(18))
    stds, _ = noise_draws(b, std, 1.0, 18)
    z = out.flatten(1) / stds[:, None]  # standard normal, if as documented
    d = z.shape[1]
    assert z.mean(1).abs().max() < 5 / math.sqrt(d)
    assert (z.var(1) - 1).abs().max() < 0.12
    kurtosis = (z**4).mean(1) / z.var(1) ** 2
    assert (kurtosis - 3).abs().max() < 0.6 and abs(float(kurtosis.mean()) - 3) < 0.2
    within_1sd = float((z.abs() < 1).float().mean())  # pooled: P(|z| < 1) = 0.6827
    assert abs(within_1sd - 0.6827) < 0.02
    lag1 = (z[:, 1:] * z[:, :-1]).mean(1)  # neighbours along the flattened sample
    assert lag1.abs().max() < 5 / math.sqrt(d)


def test_noise_samples_of_a_batch_read_distinct_windows_of_one_bank():
    """As documented: each sample adds D consecutive draws of one bank of D + max(3 D, B), at
    distinct offsets."""
    b, d = 12, 2 * 8 * 8
    out = gaussian_noise(torch.zeros(b, 2, 8, 8), std=1.0, p=1.0, generator=gen(19))
    stds, _ = noise_draws(b, 1.0, 1.0, 19)
    z = out.flatten(1).double() / stds[:, None].double()  # the bank's draws, to ~1e-7

    def same(u, v):  # the same draw (relative error of the rescaling ~1e-7)
        return (u - v).abs() <= 1e-6 * u.abs().maximum(v.abs())

    values = z.flatten().sort().values
    distinct = 1 + int((~same(values[1:], values[:-1])).sum())
    assert distinct <= 4 * d  # independent noise would give b * d = 1536 distinct values
    overlapping = 0
    for i in range(1, b):  # sample i is sample 0's window shifted by one offset, never 0
        pairs = same(z[i, :, None], z[0, None, :]).nonzero()  # z[i][k] == z[0][k + shift]
        if len(pairs):
            shifts = pairs[:, 1] - pairs[:, 0]
            assert (shifts == shifts[0]).all() and shifts[0] != 0
            assert len(pairs) == d - abs(int(shifts[0]))
            overlapping += 1
    assert overlapping > 0  # offsets in [0, 3 d): most windows overlap sample 0's


def test_no_two_samples_get_the_same_noise():
    """Distinct offsets: the noise of two samples is never the same stretch of the bank."""
    cfg = ImageAugmentConfig(**{**OFF, "noise_p": 1.0, "noise_std": 0.5})
    noise = ImageAugment(cfg)(torch.zeros(64, 1, 16, 16), gen(8)).flatten(1)
    per_sample = noise.std(1)
    assert (per_sample > 0).all() and per_sample.max() < 0.5 * 1.1
    unit = noise / noise.norm(dim=1, keepdim=True)
    correlation = (unit @ unit.T - torch.eye(64)).abs()
    assert correlation.max() < 0.3  # 256 pixels: independent noise gives |r| ~ 0.06


def test_image_augment_noise_equals_the_functional_op_and_spares_unchosen_samples():
    x = images(100, 2, 16, 16)
    cfg = ImageAugmentConfig(**{**OFF, "noise_p": 0.5, "noise_std": 0.2})
    out = ImageAugment(cfg)(x, gen(22))
    torch.testing.assert_close(out, gaussian_noise(x, 0.2, 0.5, gen(22)), rtol=0, atol=0)
    _, chosen = noise_draws(100, 0.2, 0.5, 22)
    assert torch.equal((out != x).flatten(1).any(1), chosen)


# --- composition ---------------------------------------------------------------------------------


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
    v1, v2 = two_views(aug, x, gen(13))
    w1, w2 = two_views(aug, x, gen(13))
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    a = gaussian_noise(x, 0.1, 1.0, gen(13))
    torch.testing.assert_close(a, gaussian_noise(x, 0.1, 1.0, gen(13)), rtol=0, atol=0)
    assert not torch.equal(a, gaussian_noise(x, 0.1, 1.0, gen(14)))


def test_samples_and_views_of_one_image_differ():
    x = images(1, 2, 32, 32).expand(16, -1, -1, -1).contiguous()  # 16 copies of one image
    aug = ImageAugment(ImageAugmentConfig(output_size=24))
    a = aug(x, gen(7))
    flat = a.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(16) * 1e9).min() > 1e-3  # all samples differ
    v1, v2 = two_views(aug, x, gen(9))
    assert v1.shape == v2.shape == (16, 2, 24, 24)
    assert (v1 - v2).flatten(1).abs().amax(1).min() > 1e-3


def test_channels_are_augmented_independently():
    """Changing one channel's content leaves the other channels' output unchanged."""
    x = images(8, 3, 32, 32)
    x2 = x.clone()
    x2[:, 1] = x2[:, 1] * 5 + 2
    aug = ImageAugment(ImageAugmentConfig(output_size=24, blur_p=0.5, noise_p=0.5))
    out, out2 = aug(x, gen(5)), aug(x2, gen(5))
    torch.testing.assert_close(out[:, [0, 2]], out2[:, [0, 2]], rtol=0, atol=1e-5)
    assert not torch.allclose(out[:, 1], out2[:, 1])


@pytest.mark.parametrize("channels", [1, 2, 5, 8])
@pytest.mark.parametrize("output_size,expected", [(None, (40, 40)), (32, (32, 32)),
                                                  ((24, 36), (24, 36))])
def test_any_channel_count_and_output_size(channels, output_size, expected):
    x = images(6, channels, 40, 40)
    out = ImageAugment(ImageAugmentConfig(output_size=output_size, blur_p=1.0, noise_p=1.0))(
        x, gen())
    assert out.shape == (6, channels, *expected) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("channels", [1, 7])
def test_float64_non_square_and_two_views_shapes(channels):
    x = images(9, channels, 30, 26).double()
    out = ImageAugment(ImageAugmentConfig(output_size=(20, 16), blur_p=1.0, noise_p=1.0))(x, gen())
    assert out.shape == (9, channels, 20, 16) and out.dtype == torch.float64
    assert torch.isfinite(out).all()
    v1, v2 = two_views(ImageAugment(ImageAugmentConfig()), x, gen())
    assert v1.shape == v2.shape == x.shape and v1.dtype == torch.float64


@pytest.mark.parametrize("value", [0.0, 5.0, -3.0])
def test_no_nan_for_constant_images(value):
    x = torch.full((8, 3, 16, 16), value)
    cfg = ImageAugmentConfig(p_intensity=1.0, gamma=0.5, noise_p=0.0)
    out = ImageAugment(cfg)(x, gen())
    assert torch.isfinite(out).all()
    # only brightness can move a constant image: each channel stays constant
    assert out.flatten(2).std(2).max() < 1e-5


def test_empty_batch():
    out = ImageAugment(ImageAugmentConfig(output_size=8))(torch.zeros(0, 3, 16, 16), gen())
    assert out.shape == (0, 3, 8, 8)


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
