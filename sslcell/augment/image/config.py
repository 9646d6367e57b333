"""Settings, input checks and the random parameter draws of the image augmentation.

Every op draws the parameters of the whole batch here, in a few batched torch calls, before any
pixel is touched; an executor (:mod:`.execute`) then applies them. Which parameters are drawn,
in which order and from which generator fixes the seeded results (benchmarks and seeded runs
depend on them), so the draw functions below must keep their order of calls.

The draws return small named tuples (:class:`Geometry`, :class:`Jitter`, :class:`Blur`,
:class:`Noise`) of per-sample tensors, ``B`` = number of output crops.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from sslcell.errors import ConfigError, InputError


@dataclass
class ImageAugmentConfig:
    """Settings of :class:`~sslcell.augment.image.ImageAugment`; defaults suit single-cell microscopy crops.

    Microscopy has no canonical orientation, so flips, 90-degree turns and small rotations are on
    by default. Crops keep at least half of the cell area (``scale``) because cells are centred
    and small; colour is per channel (each stain varies on its own), never hue/saturation.

    Attributes:
        output_size: side (or ``(h, w)``) of the output; ``None`` keeps the input size.
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect ratio (width / height) relative to the image's, sampled log-uniformly: 1 keeps
            the image's own shape (a non-square crop is never stretched by scale 1, ratio 1).
        hflip, vflip: probability of a horizontal / vertical flip.
        rot90: turn by a random multiple of 90 degrees.
        rotation_degrees: extra rotation, uniform in ``[-rotation_degrees, rotation_degrees]``,
            applied with probability ``rotation_p``.
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
        noise_p: probability of additive gaussian noise, i.i.d. within a sample; its std is
            uniform in ``[0, noise_std]`` per sample. The samples of a batch read their noise at
            distinct random offsets from one bank of normal draws, so their noise overlaps,
            shifted (see :func:`~sslcell.augment.image.gaussian_noise`; before, each drew its own).
        rotation_p: probability that a crop gets the ``rotation_degrees`` rotation. Default 0.5
            (before it existed every crop was rotated, i.e. 1.0): flips and 90-degree turns
            already give all 8 lossless orientations, and the CPU kernel resamples an unrotated
            crop 2 to 3 times faster (separably, see :mod:`sslcell.augment.image.cpu_kernel`).
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
    rotation_p: float = 0.5

    def __post_init__(self) -> None:
        def check(ok: bool, field: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"ImageAugmentConfig.{field}={getattr(self, field)!r}: {why}")

        for name in ("hflip", "vflip", "p_intensity", "blur_p", "noise_p", "rotation_p"):
            check(0.0 <= getattr(self, name) <= 1.0, name, "must be a probability in [0, 1]")
        for name in ("rotation_degrees", "brightness", "contrast", "gamma", "noise_std"):
            check(getattr(self, name) >= 0.0, name, "must be >= 0")
        check(self.contrast <= 1.0, "contrast", "must be <= 1 (factor 1 - contrast must stay >= 0)")
        for name in ("scale", "ratio", "blur_sigma"):
            check(isinstance(getattr(self, name), (tuple, list)) and len(getattr(self, name)) == 2, name,
                  "must be a pair (low, high)")
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


# --- drawn parameters ----------------------------------------------------------------------------


class Geometry(NamedTuple):
    """Crop, flips, turns and rotation of ``B`` crops: ``theta`` (B, 2, 3) maps the output's
    normalised pixel coordinates to the input's (as ``F.affine_grid``); ``angle`` (B,) is the
    rotation in degrees (0: none), ``rot90_k`` (B,) the number of quarter turns."""

    theta: Tensor
    angle: Tensor
    rot90_k: Tensor

    @classmethod
    def from_params(cls, params: dict[str, Tensor]) -> Geometry:
        """From the dict of :func:`draw_geometry`."""
        return cls(params["theta"], params["angle"], params["rot90_k"])


class Jitter(NamedTuple):
    """Per-channel intensity parameters (B, C), each ``None`` where the op is off: ``log_gamma``
    (0: no gamma), contrast ``factor`` and brightness ``shift``."""

    log_gamma: Tensor | None
    factor: Tensor | None
    shift: Tensor | None


class Blur(NamedTuple):
    """``sigmas`` (B,) of the gaussian blur, ``chosen`` (B,) bool: which crops get it, and the
    configured ``sigma_range`` (low, high), whose high end sets the kernel radius."""

    sigmas: Tensor
    chosen: Tensor
    sigma_range: tuple[float, float]


class Noise(NamedTuple):
    """``stds`` (B,), ``chosen`` (B,) bool, the ``bank`` (D + R,) of standard normal draws and the
    distinct ``offsets`` (B,) into it of :func:`~sslcell.augment.image.gaussian_noise`."""

    stds: Tensor
    chosen: Tensor
    bank: Tensor
    offsets: Tensor


# --- checks --------------------------------------------------------------------------------------


def check_images(images: Tensor, where: str, raw: bool = False) -> None:
    """Raise unless ``images`` is (B, C, H, W) float (``raw``: or uint8 / uint16)."""
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise InputError(f"{where}: images must be a (B, C, H, W) tensor, got {shape}")
    if raw and images.dtype in (torch.uint8, torch.uint16):
        return
    if not images.is_floating_point():
        hint = ("" if raw else "; or pass mean= and std= to ImageAugment to normalise them "
                "on the way")
        raise InputError(
            f"{where}: images must be float (convert uint8/uint16 and normalise per channel "
            f"first{hint}), got dtype {images.dtype}"
        )


def normalization(mean: Sequence[float] | Tensor | None, std: Sequence[float] | Tensor | None,
                  channels: int, where: str) -> tuple[Tensor, Tensor] | None:
    """``(scale, bias)`` (C,) float32 on CPU with ``(x - mean) / std = scale * x + bias``."""
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise InputError(f"{where}: pass both mean and std (one value per channel), or neither")
    mean = torch.as_tensor(mean, dtype=torch.float32).detach().cpu().flatten()
    std = torch.as_tensor(std, dtype=torch.float32).detach().cpu().flatten()
    if mean.shape != (channels,) or std.shape != (channels,):
        raise InputError(f"{where}: mean and std need one value per channel ({channels}); got "
                         f"{tuple(mean.shape)} and {tuple(std.shape)}")
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
        raise InputError(f"{where}: mean must be finite and std finite and > 0; got mean "
                         f"{mean.tolist()}, std {std.tolist()}")
    return 1.0 / std, -mean / std


def resolved_size(size: int | tuple[int, int] | None, height: int, width: int) -> tuple[int, int]:
    """``(h, w)`` of the output for a configured ``size`` and an input of ``(height, width)``."""
    if size is None:
        return height, width
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


# --- draws ---------------------------------------------------------------------------------------


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the calling thread's torch ops on one intra-op thread, restoring the setting after.

    For the per-batch draws: many ops on tensors of a few hundred elements, of which several
    (exp, cos, sqrt, ...) go through MKL's vector math and start an OpenMP team even that small.
    On a loaded machine without ``OMP_WAIT_POLICY=PASSIVE`` each of those took 3 to 8 ms (~90 ms
    per batch of 512 crops instead of ~2).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None,
             like: Tensor) -> Tensor:
    """Uniform ``[low, high)`` draws of ``shape`` on ``like``'s device and dtype."""
    device = generator.device if generator is not None else like.device
    u = torch.rand(shape, generator=generator, device=device, dtype=like.dtype)
    return (u * (high - low) + low).to(like.device)


def _bernoulli(shape: tuple[int, ...], p: float, generator: torch.Generator | None,
               like: Tensor) -> Tensor:
    return _uniform(shape, 0.0, 1.0, generator, like) < p


def draw_geometry(b: int, height: int, width: int, scale: tuple[float, float],
                  ratio: tuple[float, float], hflip: float, vflip: float, rot90: bool,
                  rotation_degrees: float, rotation_p: float, generator: torch.Generator | None,
                  like: Tensor) -> dict[str, Tensor]:
    """The ``(B,)`` parameters and ``theta`` (B, 2, 3) of ``random_resized_crop_flip_rotate``
    for images of ``(height, width)``, drawn on ``like``'s device and dtype."""
    device = like.device
    # crop extent as a fraction of the image side, and crop centre in normalised coordinates; the aspect is the
    # crop's relative to the image's, so scale 1 and ratio 1 read the whole image unstretched, square or not
    area = _uniform((b,), scale[0], scale[1], generator, like)
    aspect = _uniform((b,), math.log(ratio[0]), math.log(ratio[1]), generator, like).exp()
    crop_w = (area * aspect).sqrt().clamp(max=1.0)
    crop_h = (area / aspect).sqrt().clamp(max=1.0)
    centre_x = _uniform((b,), -1.0, 1.0, generator, like) * (1.0 - crop_w)
    centre_y = _uniform((b,), -1.0, 1.0, generator, like) * (1.0 - crop_h)
    # F D: flips then k quarter turns, as a signed permutation of (x, y)
    hflipped = _bernoulli((b,), hflip, generator, like)
    vflipped = _bernoulli((b,), vflip, generator, like)
    flip_x = 1.0 - 2.0 * hflipped.to(like.dtype)
    flip_y = 1.0 - 2.0 * vflipped.to(like.dtype)
    if rot90:
        gen_device = generator.device if generator is not None else device
        k = torch.randint(0, 4, (b,), generator=generator, device=gen_device).to(device)
        if height != width:  # a quarter turn of an H x W crop into an H x W view would stretch it: half turns only
            k = (k // 2) * 2
    else:
        k = torch.zeros(b, dtype=torch.long, device=device)
    # (x, y) of the output reads input (cos_k x - sin_k y, sin_k x + cos_k y) with turn k
    cos_k = torch.tensor([1.0, 0.0, -1.0, 0.0], device=device, dtype=like.dtype)[k]
    sin_k = torch.tensor([0.0, 1.0, 0.0, -1.0], device=device, dtype=like.dtype)[k]
    fd = torch.stack([flip_x * cos_k, -flip_x * sin_k, flip_y * sin_k, flip_y * cos_k], 1)
    fd = fd.view(b, 2, 2)
    # N^-1 R N S: rotation in pixel space of the crop rectangle
    degrees = _uniform((b,), -rotation_degrees, rotation_degrees, generator, like)
    if rotation_degrees > 0 and rotation_p < 1:  # (no draw otherwise: streams stay as before)
        degrees = torch.where(_bernoulli((b,), rotation_p, generator, like), degrees, 0.0)
    cos, sin = (degrees * (math.pi / 180)).cos(), (degrees * (math.pi / 180)).sin()
    rns = torch.stack(
        [cos * crop_w, -sin * crop_h * (height / width), sin * crop_w * (width / height), cos * crop_h],
        1,
    ).view(b, 2, 2)
    theta = torch.cat([rns @ fd, torch.stack([centre_x, centre_y], 1).unsqueeze(2)], 2)
    return {"rot90_k": k, "hflip": hflipped, "vflip": vflipped, "angle": degrees,
            "crop_w": crop_w, "crop_h": crop_h, "centre_x": centre_x, "centre_y": centre_y,
            "theta": theta}


def draw_intensity(b: int, c: int, brightness: float, contrast: float, gamma: float, p: float,
                   generator: torch.Generator | None, like: Tensor) -> Jitter:
    """The (B, C) parameters of ``intensity_jitter``: contrast, then brightness, then gamma."""
    log_g = factor = shift = None
    if contrast > 0:
        draw = _uniform((b, c), 1.0 - contrast, 1.0 + contrast, generator, like)
        factor = torch.where(_bernoulli((b, 1), p, generator, like), draw, 1.0)
    if brightness > 0:
        draw = _uniform((b, c), -brightness, brightness, generator, like)
        shift = torch.where(_bernoulli((b, 1), p, generator, like), draw, 0.0)
    if gamma > 0:
        draw = _uniform((b, c), -math.log1p(gamma), math.log1p(gamma), generator, like)
        log_g = torch.where(_bernoulli((b, 1), p, generator, like), draw, 0.0)
    return Jitter(log_g, factor, shift)


def draw_blur(b: int, sigma: tuple[float, float], p: float, generator: torch.Generator | None,
              like: Tensor) -> Blur:
    """The sigmas (B,), then which crops are blurred (B,), of ``gaussian_blur``."""
    sigmas = _uniform((b,), sigma[0], sigma[1], generator, like)
    return Blur(sigmas, _bernoulli((b,), p, generator, like), sigma)


def draw_noise(b: int, numel: int, std: float, p: float, generator: torch.Generator | None,
               like: Tensor) -> Noise:
    """The stds (B,), which crops get noise (B,), the bank ``(numel + R,)`` and the distinct
    offsets (B,) into it of ``gaussian_noise``, for crops of ``numel`` values each."""
    stds, chosen = _uniform((b,), 0.0, std, generator, like), _bernoulli((b,), p, generator, like)
    gen_device = generator.device if generator is not None else like.device
    span = max(3 * numel, b)
    bank = torch.randn(numel + span, generator=generator, device=gen_device, dtype=like.dtype)
    offsets = torch.randperm(span, generator=generator, device=gen_device)[:b]
    return Noise(stds, chosen, bank.to(like.device), offsets.to(like.device))


# --- derived from the draws ----------------------------------------------------------------------


def blur_radius(sigma_range: tuple[float, float], height: int, width: int) -> int:
    """Radius of the blur kernels of crops ``(height, width)``: ``ceil(3 * sigma_high)``,
    truncated to the crop; 0 means no blur."""
    return max(0, min(math.ceil(3.0 * sigma_range[1]), height - 1, width - 1))


def blur_kernels(sigmas: Tensor, radius: int) -> Tensor:
    """Normalised gaussian kernels (B, 2 * radius + 1) of ``sigmas`` (B,)."""
    offsets = torch.arange(-radius, radius + 1, device=sigmas.device, dtype=sigmas.dtype)
    kernels = torch.exp(-0.5 * (offsets / sigmas[:, None]) ** 2)
    return kernels / kernels.sum(1, keepdim=True)
