"""Batched, channel-agnostic augmentation of image crops.

Every operation works on a whole float batch ``(B, C, H, W)`` on any device and for any number
of channels; per-sample random parameters are drawn as ``(B,)`` (or ``(B, C)``) tensors from an
explicit ``torch.Generator`` and applied in one batched op. There is no PIL and no per-sample
Python loop.

Input contract: float32 images that the caller has already converted from uint8/uint16 and
normalised per channel (e.g. ``(x.float() - mean[c]) / std[c]``), so roughly zero mean and unit
standard deviation per channel. Intensity amounts (brightness shift, noise std) are therefore in
units of a channel's standard deviation, and nothing assumes a ``[0, 1]`` or RGB range.

Randomness: every function takes ``generator``. Parameters are drawn on the generator's device
and moved to the images' device; for speed on a GPU pass a generator on that GPU. With
``generator=None`` torch's global generator is used (not reproducible unless globally seeded).
Blur and noise run on the selected samples only; on a GPU that selection costs one host
synchronisation per op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sslcell.errors import ConfigError, InputError

__all__ = [
    "ImageAugmentConfig",
    "ImageAugment",
    "two_views",
    "random_resized_crop_flip_rotate",
    "intensity_jitter",
    "gaussian_blur",
    "gaussian_noise",
]


@dataclass
class ImageAugmentConfig:
    """Settings of :class:`ImageAugment`; defaults suit single-cell microscopy crops.

    Microscopy has no canonical orientation, so flips, 90-degree turns and small rotations are on
    by default. Crops keep at least half of the cell area (``scale``) because cells are centred
    and small; colour is per channel (each stain varies on its own), never hue/saturation.

    Attributes:
        output_size: side (or ``(h, w)``) of the output; ``None`` keeps the input size.
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect ratio (width / height, in pixels), sampled log-uniformly.
        hflip, vflip: probability of a horizontal / vertical flip.
        rot90: turn by a random multiple of 90 degrees.
        rotation_degrees: extra rotation, uniform in ``[-rotation_degrees, rotation_degrees]``.
        padding_mode: ``grid_sample`` padding where a rotated crop leaves the image.
        brightness: additive shift per channel, uniform in ``[-brightness, brightness]``
            (units: channel std of the normalised data).
        contrast: factor per channel around the image-channel mean, uniform in
            ``[1 - contrast, 1 + contrast]``.
        gamma: exponent per channel, log-uniform in ``[1 / (1 + gamma), 1 + gamma]``, applied to
            the image-channel rescaled to ``[0, 1]`` by its min and max and mapped back, so it is
            safe for negative (normalised) values and keeps each channel's range.
        p_intensity: probability, per sample and independently for brightness, contrast and gamma,
            that the op is applied (its parameters then differ per channel).
        blur_p: probability of a gaussian blur; ``blur_sigma`` its sigma range in pixels.
        noise_p: probability of additive gaussian noise; its std is uniform in
            ``[0, noise_std]`` per sample.
    """

    output_size: int | tuple[int, int] | None = None
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.5
    rot90: bool = True
    rotation_degrees: float = 15.0
    padding_mode: str = "reflection"
    brightness: float = 0.2
    contrast: float = 0.2
    gamma: float = 0.2
    p_intensity: float = 0.8
    blur_p: float = 0.3
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    noise_p: float = 0.5
    noise_std: float = 0.05

    def __post_init__(self) -> None:
        def check(ok: bool, field: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"ImageAugmentConfig.{field}={getattr(self, field)!r}: {why}")

        for name in ("hflip", "vflip", "p_intensity", "blur_p", "noise_p"):
            check(0.0 <= getattr(self, name) <= 1.0, name, "must be a probability in [0, 1]")
        for name in ("rotation_degrees", "brightness", "contrast", "gamma", "noise_std"):
            check(getattr(self, name) >= 0.0, name, "must be >= 0")
        check(self.contrast <= 1.0, "contrast", "must be <= 1 (factor 1 - contrast must stay >= 0)")
        check(0.0 < self.scale[0] <= self.scale[1] <= 1.0, "scale", "need 0 < low <= high <= 1")
        check(0.0 < self.ratio[0] <= self.ratio[1], "ratio", "need 0 < low <= high")
        check(0.0 < self.blur_sigma[0] <= self.blur_sigma[1], "blur_sigma", "need 0 < low <= high")
        check(self.padding_mode in ("zeros", "border", "reflection"), "padding_mode",
              "must be 'zeros', 'border' or 'reflection'")
        size = self.output_size
        if size is not None:
            sizes = (size, size) if isinstance(size, int) else tuple(size)
            check(len(sizes) == 2 and all(int(s) == s and s > 0 for s in sizes), "output_size",
                  "must be a positive int, a pair of them, or None")


# --- helpers -------------------------------------------------------------------------------------


def _check_images(images: Tensor, where: str) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise InputError(f"{where}: images must be a (B, C, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise InputError(
            f"{where}: images must be float (convert uint8/uint16 and normalise per channel "
            f"first), got dtype {images.dtype}"
        )


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None,
             like: Tensor) -> Tensor:
    """Uniform ``[low, high)`` draws of ``shape`` on ``like``'s device and dtype."""
    device = generator.device if generator is not None else like.device
    u = torch.rand(shape, generator=generator, device=device, dtype=like.dtype)
    return (u * (high - low) + low).to(like.device)


def _bernoulli(shape: tuple[int, ...], p: float, generator: torch.Generator | None,
               like: Tensor) -> Tensor:
    return _uniform(shape, 0.0, 1.0, generator, like) < p


# --- geometry ------------------------------------------------------------------------------------


def random_resized_crop_flip_rotate(
    images: Tensor,
    output_size: int | tuple[int, int] | None = None,
    scale: tuple[float, float] = (1.0, 1.0),
    ratio: tuple[float, float] = (1.0, 1.0),
    hflip: float = 0.0,
    vflip: float = 0.0,
    rot90: bool = False,
    rotation_degrees: float = 0.0,
    padding_mode: str = "reflection",
    generator: torch.Generator | None = None,
    return_params: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Random resized crop, flips, 90-degree turns and small rotation in ONE ``grid_sample``.

    Per sample the output pixel grid (normalised coordinates ``p``) is mapped to the input by
    ``A p + t`` with ``A = N^-1 R N S F D``: ``D`` a turn by ``k`` x 90 degrees (as
    ``torch.rot90(x, k, dims=(-2, -1))``), ``F`` the flips (as ``torch.flip``; the flips act before
    the turn), ``S`` the crop extent, ``R`` a rotation done in pixel space (``N`` converts
    normalised to pixel units, so non-square images do not shear) and ``t`` the crop centre.
    The crop follows torchvision's ``RandomResizedCrop`` parameters (area fraction ``scale``,
    log-uniform aspect ``ratio``) but clamps to the image instead of retrying. Bilinear sampling
    at pixel centres, so with no crop, no rotation and unchanged size it returns the input
    exactly (flips and 90-degree turns too, for square images).

    Args:
        images: ``(B, C, H, W)`` float.
        output_size: output side or ``(h, w)``; ``None`` keeps ``(H, W)``.

    Returns:
        ``(B, C, h, w)`` float; with ``return_params`` also a dict of the ``(B,)`` parameters
        drawn: ``rot90_k`` (int), ``hflip``/``vflip`` (bool), ``angle`` (degrees), ``crop_w``/``crop_h``
        (fraction of the image side), ``centre_x``/``centre_y`` (normalised) and ``theta`` (B, 2, 3).
    """
    _check_images(images, "random_resized_crop_flip_rotate")
    b, _, height, width = images.shape
    if output_size is None:
        out_h, out_w = height, width
    elif isinstance(output_size, int):
        out_h = out_w = output_size
    else:
        out_h, out_w = output_size
    like = images.new_empty(())
    # crop extent as a fraction of the image side, and crop centre in normalised coordinates
    area = _uniform((b,), scale[0], scale[1], generator, like)
    aspect = _uniform((b,), math.log(ratio[0]), math.log(ratio[1]), generator, like).exp()
    crop_w = (area * aspect * (height / width)).sqrt().clamp(max=1.0)
    crop_h = (area / aspect * (width / height)).sqrt().clamp(max=1.0)
    centre_x = _uniform((b,), -1.0, 1.0, generator, like) * (1.0 - crop_w)
    centre_y = _uniform((b,), -1.0, 1.0, generator, like) * (1.0 - crop_h)
    # F D: flips then k quarter turns, as a signed permutation of (x, y)
    hflipped = _bernoulli((b,), hflip, generator, like)
    vflipped = _bernoulli((b,), vflip, generator, like)
    flip_x = 1.0 - 2.0 * hflipped.to(like.dtype)
    flip_y = 1.0 - 2.0 * vflipped.to(like.dtype)
    if rot90:
        device = generator.device if generator is not None else images.device
        k = torch.randint(0, 4, (b,), generator=generator, device=device).to(images.device)
    else:
        k = torch.zeros(b, dtype=torch.long, device=images.device)
    # (x, y) of the output reads input (cos_k x - sin_k y, sin_k x + cos_k y) with turn k
    cos_k = torch.tensor([1.0, 0.0, -1.0, 0.0], device=images.device, dtype=like.dtype)[k]
    sin_k = torch.tensor([0.0, 1.0, 0.0, -1.0], device=images.device, dtype=like.dtype)[k]
    fd = torch.stack([flip_x * cos_k, -flip_x * sin_k, flip_y * sin_k, flip_y * cos_k], 1)
    fd = fd.view(b, 2, 2)
    # N^-1 R N S: rotation in pixel space of the crop rectangle
    degrees = _uniform((b,), -rotation_degrees, rotation_degrees, generator, like)
    cos, sin = (degrees * (math.pi / 180)).cos(), (degrees * (math.pi / 180)).sin()
    rns = torch.stack(
        [cos * crop_w, -sin * crop_h * (height / width), sin * crop_w * (width / height), cos * crop_h],
        1,
    ).view(b, 2, 2)
    theta = torch.cat([rns @ fd, torch.stack([centre_x, centre_y], 1).unsqueeze(2)], 2)
    grid = _affine_grid(theta, out_h, out_w)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode=padding_mode,
                        align_corners=False)
    if not return_params:
        return out
    params = {"rot90_k": k, "hflip": hflipped, "vflip": vflipped, "angle": degrees,
              "crop_w": crop_w, "crop_h": crop_h, "centre_x": centre_x, "centre_y": centre_y,
              "theta": theta}
    return out, params


def _affine_grid(theta: Tensor, out_h: int, out_w: int) -> Tensor:
    """``F.affine_grid(theta, (B, C, out_h, out_w), align_corners=False)`` by broadcasting.

    ``theta`` (B, 2, 3) -> grid (B, out_h, out_w, 2); several times faster than ``affine_grid``
    on CPU, and exact at pixel centres for an identity ``theta``.
    """
    xs = (torch.arange(out_w, device=theta.device, dtype=theta.dtype) * 2 + 1) / out_w - 1
    ys = (torch.arange(out_h, device=theta.device, dtype=theta.dtype) * 2 + 1) / out_h - 1
    cols = theta.transpose(1, 2)[:, None, None]  # (B, 1, 1, 3, 2): columns of theta
    return cols[..., 0, :] * xs[:, None] + (cols[..., 1, :] * ys[:, None, None] + cols[..., 2, :])


# --- intensity -----------------------------------------------------------------------------------


def intensity_jitter(
    images: Tensor,
    brightness: float = 0.0,
    contrast: float = 0.0,
    gamma: float = 0.0,
    p: float = 1.0,
    generator: torch.Generator | None = None,
    return_params: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Per-channel gamma, contrast and brightness jitter (in that order), each with probability p.

    Each of the three ops is chosen per sample with probability ``p``; its amount is drawn per
    sample AND channel, so channels change independently. Gamma acts on each image-channel
    rescaled to ``[0, 1]`` by its min and max and is mapped back (constant channels stay as they
    are); contrast scales around the image-channel mean; brightness adds a shift:
    ``y = lo + span * ((x - lo) / span) ** gamma``, ``out = factor * (y - mean(y)) + mean(y) + shift``.

    Returns a new ``(B, C, H, W)`` tensor (``images`` is not modified); with ``return_params``
    also a dict of the ``(B, C)`` parameters ``gamma``, ``factor`` and ``shift`` (1, 1, 0 where an
    op was not applied).
    """
    _check_images(images, "intensity_jitter")
    out, params = _intensity_jitter_(images.clone(), brightness, contrast, gamma, p, generator)
    return (out, params) if return_params else out


def _intensity_jitter_(out: Tensor, brightness: float, contrast: float, gamma: float, p: float,
                       generator: torch.Generator | None) -> tuple[Tensor, dict[str, Tensor]]:
    """In-place :func:`intensity_jitter` of ``out``, fused into few passes over the data.

    With ``lo``/``span`` the image-channel min/range and ``z = (x - lo) ** g``, gamma gives
    ``y = span ** (1 - g) * z + lo``; contrast ``f`` and brightness ``s`` then give
    ``f * y + (1 - f) * mean(y) + s``, i.e. one multiply-add of ``z`` with (B, C) coefficients.
    The power uses ``exp2(g * log2(.))``: on CPU ``exp2`` is several times cheaper than ``exp``.
    """
    b, c = out.shape[:2]
    like = out.new_empty(())
    factor = torch.ones((b, c), device=out.device, dtype=out.dtype)
    shift = torch.zeros((b, c), device=out.device, dtype=out.dtype)
    if contrast > 0:
        draw = _uniform((b, c), 1.0 - contrast, 1.0 + contrast, generator, like)
        factor = torch.where(_bernoulli((b, 1), p, generator, like), draw, factor)
    if brightness > 0:
        draw = _uniform((b, c), -brightness, brightness, generator, like)
        shift = torch.where(_bernoulli((b, 1), p, generator, like), draw, shift)
    if gamma > 0:
        log_g = _uniform((b, c), -math.log1p(gamma), math.log1p(gamma), generator, like)
        log_g = torch.where(_bernoulli((b, 1), p, generator, like), log_g, 0.0)[:, :, None, None]
        lo = out.amin(dim=(2, 3), keepdim=True)
        span = out.amax(dim=(2, 3), keepdim=True) - lo
        span = torch.where(span > 0, span, 1.0)  # constant channel: z = 0, y = lo
        out.sub_(lo)  # >= 0 exactly, since lo is the minimum
        out.log2_().mul_(log_g.exp()).exp2_()  # z = (x - lo) ** g; log(0) = -inf gives 0
        scale = span.pow(-log_g.expm1())  # span ** (1 - g)
    else:
        log_g = torch.zeros((b, c, 1, 1), device=out.device, dtype=out.dtype)
        lo = torch.zeros_like(log_g)
        scale = torch.ones_like(lo)
    if contrast > 0:  # mean(y) = scale * mean(z) + lo
        mean = scale * out.mean(dim=(2, 3), keepdim=True) + lo
        offset = factor[:, :, None, None] * lo + (1.0 - factor[:, :, None, None]) * mean
    else:
        offset = lo
    scale = scale * factor[:, :, None, None]
    offset = offset + shift[:, :, None, None]
    if gamma > 0 or contrast > 0 or brightness > 0:
        out.mul_(scale).add_(offset)
    return out, {"gamma": log_g.exp().view(b, c), "factor": factor, "shift": shift}


# --- blur and noise ------------------------------------------------------------------------------


def gaussian_blur(
    images: Tensor,
    sigma: tuple[float, float] = (0.1, 1.5),
    p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Gaussian blur with a random sigma per sample (shared by its channels), with probability p.

    Separable: one depthwise (grouped) convolution per axis with per-sample kernels of radius
    ``ceil(3 * sigma[1])``, reflect padding (kernels are truncated to the image if it is
    smaller). Only the chosen samples are convolved. Returns a new ``(B, C, H, W)`` tensor.
    """
    _check_images(images, "gaussian_blur")
    return _gaussian_blur_(images.clone(), sigma, p, generator)


def _gaussian_blur_(images: Tensor, sigma: tuple[float, float], p: float,
                    generator: torch.Generator | None) -> Tensor:
    """In-place :func:`gaussian_blur` of ``images``."""
    b, c, height, width = images.shape
    like = images.new_empty(())
    sigmas = _uniform((b,), sigma[0], sigma[1], generator, like)
    chosen = _bernoulli((b,), p, generator, like)
    radius = min(math.ceil(3.0 * sigma[1]), height - 1, width - 1)
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)

    index = chosen.nonzero().squeeze(1)
    n = index.numel()
    if n == 0:
        return images
    kernel = torch.exp(-0.5 * (offsets / sigmas.index_select(0, index)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n * C, k)
    x = F.pad(images.index_select(0, index), (radius,) * 4, mode="reflect")
    x = x.reshape(1, n * c, height + 2 * radius, width + 2 * radius)
    x = x.contiguous(memory_format=torch.channels_last)  # faster depthwise conv on CPU
    x = F.conv2d(x, kernel[:, None, None, :], groups=n * c)
    x = F.conv2d(x, kernel[:, None, :, None], groups=n * c)
    return images.index_copy_(0, index, x.reshape(n, c, height, width))


def gaussian_noise(
    images: Tensor,
    std: float = 0.05,
    p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Add i.i.d. gaussian noise with a per-sample std uniform in ``[0, std]``, with probability p.

    Returns a new ``(B, C, H, W)`` tensor; only the chosen samples draw noise.
    """
    _check_images(images, "gaussian_noise")
    return _gaussian_noise_(images.clone(), std, p, generator)


def _gaussian_noise_(images: Tensor, std: float, p: float,
                     generator: torch.Generator | None) -> Tensor:
    """In-place :func:`gaussian_noise` of ``images``."""
    b = images.shape[0]
    like = images.new_empty(())
    stds = _uniform((b,), 0.0, std, generator, like)
    chosen = _bernoulli((b,), p, generator, like)

    index = chosen.nonzero().squeeze(1)
    device = generator.device if generator is not None else images.device
    shape = (index.numel(), *images.shape[1:])
    noise = torch.randn(shape, generator=generator, device=device, dtype=images.dtype)
    noise = noise.to(images.device).mul_(stds.index_select(0, index)[:, None, None, None])
    return images.index_add_(0, index, noise)


# --- composition ---------------------------------------------------------------------------------


class ImageAugment(torch.nn.Module):
    """Crop/flip/rotate, then intensity jitter, blur and noise, on a whole batch.

    ``forward(images (B, C, H, W) float, generator) -> (B, C, h, w)``; see
    :class:`ImageAugmentConfig` for the ops and the module docstring for the input contract.
    """

    def __init__(self, config: ImageAugmentConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else ImageAugmentConfig()

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        cfg = self.config
        _check_images(images, "ImageAugment")
        if self._geometry_is_identity(images.shape[-2], images.shape[-1]):
            x = images.clone()  # the ops below work in place
        else:
            x = random_resized_crop_flip_rotate(
                images, cfg.output_size, cfg.scale, cfg.ratio, cfg.hflip, cfg.vflip, cfg.rot90,
                cfg.rotation_degrees, cfg.padding_mode, generator,
            )
        if cfg.p_intensity > 0 and (cfg.brightness > 0 or cfg.contrast > 0 or cfg.gamma > 0):
            x, _ = _intensity_jitter_(x, cfg.brightness, cfg.contrast, cfg.gamma,
                                      cfg.p_intensity, generator)
        if cfg.blur_p > 0:
            x = _gaussian_blur_(x, cfg.blur_sigma, cfg.blur_p, generator)
        if cfg.noise_p > 0 and cfg.noise_std > 0:
            x = _gaussian_noise_(x, cfg.noise_std, cfg.noise_p, generator)
        return x

    def _geometry_is_identity(self, height: int, width: int) -> bool:
        """True when the crop is always the whole image, unturned, at its own size."""
        cfg = self.config
        size = cfg.output_size
        size = (size, size) if isinstance(size, int) else size
        return (
            (size is None or tuple(size) == (height, width))
            and cfg.scale == (1.0, 1.0)
            and all(math.isclose(r * height / width, 1.0) for r in cfg.ratio)
            and cfg.hflip == cfg.vflip == cfg.rotation_degrees == 0
            and not cfg.rot90
        )


def two_views(
    augment: ImageAugment, images: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Two independent augmentations of ``images`` (B, C, H, W), made in one batched call."""
    views = augment(torch.cat([images, images]), generator)
    return views[: images.shape[0]], views[images.shape[0] :]
