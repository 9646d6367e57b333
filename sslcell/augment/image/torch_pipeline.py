"""The torch executor of the image augmentation: GPUs, float64 and autograd.

:func:`run` applies parameters drawn beforehand (:mod:`.config`) to a whole batch in plain,
out-of-place batched torch ops, so it runs on any device and gradients reach the images:
``grid_sample`` for the crop, flips, turns and rotation; per image-channel statistics for
gamma, contrast and brightness; a grouped convolution with reflect padding for the blur;
windows of the noise bank for the noise. Ops that touch only some crops (blur, noise, gamma)
are computed for every crop and selected with ``torch.where``: no host synchronisation.

On CPU, float32 / uint8 / uint16 batches without autograd go to the compiled kernel instead
(:mod:`.cpu_kernel`); both give the same values from the same parameters, up to float rounding
(``tests/augment/test_image_cpu_kernel.py`` holds them to that).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sslcell.augment.image.config import Blur, Geometry, Jitter, Noise, blur_kernels, blur_radius


def run(images: Tensor, repeats: int, out_size: tuple[int, int], padding_mode: str,
        geometry: Geometry | None = None, jitter: Jitter | None = None, blur: Blur | None = None,
        noise: Noise | None = None) -> Tensor:
    """The ops on ``torch.cat([images] * repeats)`` with the parameters of its ``B`` crops.

    ``images`` (N, C, H, W) float -> a new (B, C, h, w) tensor, ``B = N * repeats`` and
    ``(h, w) = out_size``; an op whose parameters are ``None`` is skipped (no ``geometry``:
    each crop is its image, at its size).
    """
    x = resample(images, repeats, out_size, padding_mode, geometry)
    if jitter is not None:
        x = intensity(x, jitter)
    if blur is not None:
        x = gaussian_blur(x, blur)
    if noise is not None:
        x = add_noise(x, noise)
    return x


def resample(images: Tensor, repeats: int, out_size: tuple[int, int], padding_mode: str,
             geometry: Geometry | None) -> Tensor:
    """Bilinear crops (N * repeats, C, h, w) of ``images`` (N, C, H, W) by ``geometry.theta``
    (``grid_sample``, align_corners=False); a copy of the repeated images without geometry."""
    if geometry is None:
        return images.repeat(repeats, 1, 1, 1)
    n = images.shape[0]
    grid = affine_grid(geometry.theta, *out_size)
    crops = [F.grid_sample(images, grid[r * n:(r + 1) * n], mode="bilinear",
                           padding_mode=padding_mode, align_corners=False) for r in range(repeats)]
    return crops[0] if repeats == 1 else torch.cat(crops)


def affine_grid(theta: Tensor, out_h: int, out_w: int) -> Tensor:
    """``F.affine_grid(theta, (B, C, out_h, out_w), align_corners=False)`` by broadcasting.

    ``theta`` (B, 2, 3) -> grid (B, out_h, out_w, 2), exact at pixel centres for an identity
    ``theta`` (so an identity crop returns its image exactly).
    """
    xs, ys = pixel_centres(out_w, theta), pixel_centres(out_h, theta)
    cols = theta.transpose(1, 2)[:, None, None]  # (B, 1, 1, 3, 2): columns of theta
    return cols[..., 0, :] * xs[:, None] + (cols[..., 1, :] * ys[:, None, None] + cols[..., 2, :])


def pixel_centres(size: int, like: Tensor) -> Tensor:
    """Normalised coordinates (align_corners=False) of the ``size`` pixel centres of an axis."""
    return (torch.arange(size, device=like.device, dtype=like.dtype) * 2 + 1) / size - 1


def intensity(x: Tensor, jitter: Jitter) -> Tensor:
    """Gamma, contrast and brightness per image-channel of ``x`` (B, C, h, w), in that order.

    With ``lo``/``span`` the image-channel min/range, gamma ``g = exp(log_gamma)`` gives
    ``y = lo + span * ((x - lo) / span) ** g = span ** (1 - g) * (x - lo) ** g + lo`` (channels
    with ``log_gamma == 0`` are left as they are, constant channels stay constant); contrast
    ``f`` then gives ``f * y + (1 - f) * mean(y)`` and brightness adds ``shift``. At ``x = lo``
    the power is 0 with gradient 0 (not the infinite slope of ``z ** g`` at 0 for ``g < 1``).
    """
    log_gamma, factor, shift = jitter
    if log_gamma is not None:
        lo = x.amin(dim=(2, 3), keepdim=True)
        z = x - lo  # >= 0
        span = z.amax(dim=(2, 3), keepdim=True)
        scale = torch.where(span > 0, span, 1.0) ** -log_gamma.expm1()[:, :, None, None]  # span ** (1 - g)
        positive = z > 0
        power = torch.where(positive, torch.where(positive, z, 1.0) ** log_gamma.exp()[:, :, None, None], 0.0)
        x = torch.where((log_gamma != 0)[:, :, None, None], scale * power + lo, x)
    if factor is not None:
        factor = factor[:, :, None, None]
        x = factor * x + (1.0 - factor) * x.mean(dim=(2, 3), keepdim=True)
    if shift is not None:
        x = x + shift[:, :, None, None]
    return x


def gaussian_blur(x: Tensor, blur: Blur) -> Tensor:
    """The chosen crops of ``x`` (B, C, h, w) blurred by their own sigma, the others as they are.

    Separable gaussian of radius :func:`~.config.blur_radius` with reflect padding (as
    torchvision's ``gaussian_blur``): a grouped convolution along each axis, one group per
    image-channel.
    """
    b, c, h, w = x.shape
    radius = blur_radius(blur.sigma_range, h, w)
    if radius == 0 or b == 0:
        return x
    kernels = blur_kernels(blur.sigmas, radius).to(x.dtype).repeat_interleave(c, 0)  # (B * C, K)
    weight = kernels[:, None, :, None]  # (B * C, 1, K, 1): along the rows
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), weight, groups=b * c)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), weight.transpose(2, 3), groups=b * c)
    return torch.where(blur.chosen[:, None, None, None], y.view(b, c, h, w), x)


def add_noise(x: Tensor, noise: Noise) -> Tensor:
    """``x`` (B, C, h, w) plus, for the chosen crops, their std times their window of the bank
    (the ``C * h * w`` values from their offset on)."""
    windows = noise.bank.unfold(0, x.shape[1:].numel(), 1).index_select(0, noise.offsets)  # (B, C * h * w)
    stds = torch.where(noise.chosen, noise.stds, 0.0)[:, None]
    return x + (stds * windows).view_as(x)
