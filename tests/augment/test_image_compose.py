"""Tests of ImageAugment and two_views (sslcell.augment.image) as a whole: views, seeds, threads,
channels, sizes, dtypes, edge cases and errors.
"""

from __future__ import annotations

import threading

import pytest
import torch

from sslcell.augment.image import (
    ImageAugment,
    ImageAugmentConfig,
    gaussian_noise,
    two_views,
)
from sslcell.errors import ConfigError, InputError
from tests.augment.conftest import gen, images

# --- composition ---------------------------------------------------------------------------------


def test_two_views_equal_forward_on_the_concatenation():
    x = images(37, 3, 24, 24)  # 74 crops: the kernel's ranges of the batch straddle the two copies
    aug = ImageAugment(ImageAugmentConfig(output_size=20, blur_p=0.5, noise_p=0.5))
    v1, v2 = two_views(aug, x, gen(9))
    both = aug(torch.cat([x, x]), gen(9))
    torch.testing.assert_close(torch.cat([v1, v2]), both, rtol=0, atol=0)
    assert (v1 - v2).flatten(1).abs().amax(1).min() > 1e-3


def test_results_do_not_depend_on_the_number_of_threads():
    x = images(40, 3, 32, 32)  # 3 threads: 12 ranges of the batch on 3 Python threads
    aug = ImageAugment(ImageAugmentConfig(output_size=24, blur_p=0.5, noise_p=0.5))
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 3):
            torch.set_num_threads(threads)
            outs.append(aug(x, gen(10)))
            assert torch.get_num_threads() == threads  # the call restores the setting ...
            seen = []  # ... also as the default of threads started later
            later = threading.Thread(target=lambda seen=seen: seen.append(torch.get_num_threads()))
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
    with pytest.raises(ConfigError, match="blur_sigma.*pair"):  # not an IndexError
        ImageAugmentConfig(blur_sigma=(0.5,))
