"""The compiled CPU kernel of ImageAugment against the torch pipeline, and its building blocks.

On CPU, float32 / uint8 / uint16 batches go through ``sslcell.augment.image.cpu_kernel``; the
torch pipeline (``sslcell.augment.image.torch_pipeline``) serves GPUs, float64 and autograd. Both
must give the same values from the same drawn parameters, for every resampling path, padding
mode, shape and channel count.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sslcell.augment.image import ImageAugment, ImageAugmentConfig, two_views
from sslcell.augment.image import cpu_kernel as kernel
from sslcell.augment.image import execute as execute_module
from sslcell.errors import InputError
from tests.augment.conftest import gen

ALL_OPS = dict(scale=(0.2, 1.0), ratio=(0.5, 2.0), hflip=0.5, vflip=0.5, rot90=True,
               rotation_degrees=40.0, rotation_p=0.5, brightness=0.3, contrast=0.3, gamma=0.5,
               p_intensity=0.8, blur_p=0.5, noise_p=0.5)


def torch_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(execute_module, "use_cpu_kernel", lambda images: False)


@pytest.mark.parametrize("padding_mode", ["reflection", "border", "zeros"])
@pytest.mark.parametrize("shape,out", [((3, 32, 32), 24), ((1, 30, 50), (20, 36)),
                                        ((4, 17, 23), (40, 31)), ((2, 8, 8), 8)])
def test_kernel_equals_the_torch_pipeline(monkeypatch, padding_mode, shape, out):
    x = torch.randn((60, *shape), generator=gen(1))
    aug = ImageAugment(ImageAugmentConfig(output_size=out, padding_mode=padding_mode, **ALL_OPS))
    fast = aug(x, gen(2))
    torch_pipeline(monkeypatch)
    reference = aug(x, gen(2))
    assert fast.shape == reference.shape and fast.dtype == torch.float32
    torch.testing.assert_close(fast, reference, rtol=0, atol=2e-4)


def test_kernel_equals_the_torch_pipeline_for_two_views_and_the_identity(monkeypatch):
    x = torch.randn((20, 3, 16, 16), generator=gen(3))
    identity = ImageAugment(ImageAugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0,
                                               vflip=0.0, rot90=False, rotation_degrees=0.0))
    default = ImageAugment(ImageAugmentConfig(output_size=12))
    fast = [*two_views(default, x, gen(4)), identity(x, gen(5))]
    torch_pipeline(monkeypatch)
    for got, want in zip(fast, [*two_views(default, x, gen(4)), identity(x, gen(5))], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-4)


def test_autograd_takes_the_torch_pipeline_with_the_kernel_values_and_finite_gradients():
    x = torch.randn((40, 3, 20, 20), generator=gen(10))
    aug = ImageAugment(ImageAugmentConfig(output_size=16, **ALL_OPS))
    fast = aug(x, gen(11))
    leaf = x.clone().requires_grad_()
    out = aug(leaf, gen(11))
    assert out.requires_grad
    torch.testing.assert_close(out.detach(), fast, rtol=0, atol=2e-4)
    (out * torch.randn(out.shape, generator=gen(12))).sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0


@pytest.mark.parametrize("repeats", [1, 3])
def test_torch_pipeline_takes_an_empty_batch_and_repeats(monkeypatch, repeats):
    aug = ImageAugment(ImageAugmentConfig(output_size=8, **ALL_OPS))
    x = torch.randn((5, 2, 12, 12), generator=gen(15))
    fast = aug._augment(x, gen(16), repeats)
    torch_pipeline(monkeypatch)
    assert aug._augment(x[:0], gen(16), repeats).shape == (0, 2, 8, 8)
    torch.testing.assert_close(aug._augment(x, gen(16), repeats), fast, rtol=0, atol=2e-4)


@pytest.mark.parametrize("dtype,top", [(torch.uint8, 255), (torch.uint16, 60000)])
@pytest.mark.parametrize("padding_mode", ["reflection", "zeros"])
def test_raw_crops_are_normalised_on_the_way(monkeypatch, dtype, top, padding_mode):
    raw = torch.randint(0, top, (30, 2, 20, 20), generator=gen(6)).to(dtype)
    mean = raw.float().mean((0, 2, 3))
    std = raw.float().std((0, 2, 3))
    normalised = (raw.float() - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    aug = ImageAugment(ImageAugmentConfig(output_size=16, padding_mode=padding_mode, **ALL_OPS))
    want = aug(normalised, gen(7))
    torch.testing.assert_close(aug(raw, gen(7), mean=mean, std=std), want, rtol=0, atol=1e-4)
    torch_pipeline(monkeypatch)  # the torch path normalises first, then augments
    torch.testing.assert_close(aug(raw, gen(7), mean=mean, std=std), want, rtol=0, atol=1e-4)


def test_path_numbering_is_shared():
    assert (kernel.GENERAL, kernel.UPRIGHT, kernel.TURNED, kernel.COPY) == (
        execute_module.GRID, execute_module.UPRIGHT, execute_module.TURNED, execute_module.COPY)


def test_normalisation_errors_name_the_problem():
    aug = ImageAugment()
    raw = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(InputError, match="mean= and std="):
        aug(raw)
    with pytest.raises(InputError, match="both mean and std"):
        aug(raw, mean=[0.0, 0.0, 0.0])
    with pytest.raises(InputError, match="one value per channel \\(3\\)"):
        aug(raw, mean=[0.0, 0.0], std=[1.0, 1.0])
    with pytest.raises(InputError, match="std finite and > 0"):
        aug(raw, mean=[0.0, 0.0, 0.0], std=[1.0, 0.0, 1.0])
    with pytest.raises(InputError, match="float"):
        aug(torch.zeros(2, 3, 8, 8, dtype=torch.int32), mean=[0.0] * 3, std=[1.0] * 3)


def test_results_do_not_depend_on_the_number_of_threads():
    x = torch.randn((50, 3, 24, 24), generator=gen(8))
    aug = ImageAugment(ImageAugmentConfig(output_size=20, **ALL_OPS))
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(aug(x, gen(9)))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_power_is_accurate_from_zero_to_large_values():
    x = np.concatenate([[0.0, 1e-30, 1e-12, 1e-6], np.geomspace(1e-4, 1e4, 2000)]).astype(np.float32)
    for g in (1 / 1.5, 0.9, 1.0, 1.25, 1.5):
        got = np.array([kernel._pow(np.float32(v), np.float32(g)) for v in x])
        want = x.astype(np.float64) ** g
        assert got[0] == 0.0
        np.testing.assert_allclose(got[1:], want[1:], rtol=1e-5, atol=1e-37)


def test_min_max_orders_negative_and_positive_floats():
    rng = np.random.default_rng(0)
    for values in (rng.normal(size=1000), -rng.random(77) - 1, rng.random(5) * 1e-40,
                   np.array([-0.0, 0.0, -3.5, 2.25])):
        values = values.astype(np.float32)
        assert kernel._min_max(values) == (values.min(), values.max())
