"""Tests of the pixel ops of sslcell.augment.image: intensity jitter, blur and noise.

Each is checked against hand-written formulas or torchvision's ``gaussian_blur`` for the
parameters it drew, its parameters and noise against their documented distributions, and
``ImageAugment`` against the functional op (same draws, same values).
"""

from __future__ import annotations

import math

import torch

from sslcell.augment.image import (
    ImageAugment,
    ImageAugmentConfig,
    gaussian_blur,
    gaussian_noise,
    intensity_jitter,
)
from tests.augment.conftest import OFF, gen, images

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


def test_image_augment_blur_equals_the_functional_op():
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
