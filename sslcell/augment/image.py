"""Batched, channel-agnostic augmentation of image crops.

Every operation works on a whole float batch ``(B, C, H, W)`` on any device and for any number
of channels; per-sample random parameters are drawn as ``(B,)`` (or ``(B, C)``) tensors from an
explicit ``torch.Generator`` and applied in batched ops. There is no PIL and no per-sample
Python loop.

Input contract: float images that the caller has already converted from uint8/uint16 and
normalised per channel (e.g. ``(x.float() - mean[c]) / std[c]``), so roughly zero mean and unit
standard deviation per channel; or, for :class:`ImageAugment` and :func:`two_views`, raw crops
(uint8, uint16 or float) with ``mean=`` and ``std=``, normalised on the way. Intensity amounts
(brightness shift, noise std) are therefore in units of a channel's standard deviation, and
nothing assumes a ``[0, 1]`` or RGB range.

Randomness: every function takes ``generator``. Parameters are drawn on the generator's device
and moved to the images' device; for speed on a GPU pass a generator on that GPU. With
``generator=None`` torch's global generator is used (not reproducible unless globally seeded).
All per-sample parameters are drawn for the whole batch first (geometry, intensity, blur, noise,
then the noise bank); results depend on the seed, the batch, the device and the dtype of the
draws (float64 images draw float64 parameters), not on the number of threads or on which of the
two executors below runs.

Speed: the parameters are drawn in a few batched torch calls (:func:`_one_thread`), then one of
two executors applies them (:func:`_execute`):

* On CPU (float32, uint8 or uint16 without autograd), a compiled kernel
  (:mod:`sslcell.augment._cpu_kernel`, numba) makes each crop in one loop nest while it is in
  cache: resampling with the per-channel normalisation folded in, gamma / contrast / brightness,
  blur, noise; ranges of the batch run on ``torch.get_num_threads()`` Python threads (the kernel
  releases the GIL). About 2x faster than the torch pipeline on CPU, and raw uint8 / uint16
  crops are read as they are (no float copy of the batch).
* Elsewhere (GPU, float64, autograd), the torch pipeline (:class:`_Pipeline`). Crops that are
  not rotated (by ``rotation_p`` or ``rotation_degrees=0``) are resampled by two passes of
  weighted row gathers (``embedding_bag``, an exact separable bilinear), the rotated ones by
  ``grid_sample``; the blur uses the same row gathers. The samples are sorted by resampling path
  (within a path, those without gamma first), and what depends only on the drawn parameters
  (taps and weights, which rows get gamma, blur and noise) is computed once per batch. On a GPU
  a path is one chunk, and the bookkeeping costs a few host synchronisations per batch; on CPU
  the batch is cut into chunks of about 4 MiB that go through all ops while in cache, on
  ``torch.get_num_threads()`` Python threads with one intra-op thread each, and the gamma's
  logarithm and exponential are numpy's (:func:`_pow_`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
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
    "dihedral_views",
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
            shifted (see :func:`gaussian_noise`; before, each drew its own).
        rotation_p: probability that a crop gets the ``rotation_degrees`` rotation. Default 0.5
            (before it existed every crop was rotated, i.e. 1.0): flips and 90-degree turns
            already give all 8 lossless orientations, and an unrotated crop is resampled 2 to 3
            times faster on CPU (see the module docstring).
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


def _check_images(images: Tensor, where: str, raw: bool = False) -> None:
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


def _normalization(mean: Sequence[float] | Tensor | None, std: Sequence[float] | Tensor | None,
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


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None,
             like: Tensor) -> Tensor:
    """Uniform ``[low, high)`` draws of ``shape`` on ``like``'s device and dtype."""
    device = generator.device if generator is not None else like.device
    u = torch.rand(shape, generator=generator, device=device, dtype=like.dtype)
    return (u * (high - low) + low).to(like.device)


def _bernoulli(shape: tuple[int, ...], p: float, generator: torch.Generator | None,
               like: Tensor) -> Tensor:
    return _uniform(shape, 0.0, 1.0, generator, like) < p


def _output_size(output_size: int | tuple[int, int] | None, height: int,
                 width: int) -> tuple[int, int]:
    if output_size is None:
        return height, width
    if isinstance(output_size, int):
        return output_size, output_size
    return int(output_size[0]), int(output_size[1])


#: float32 elements per chunk on CPU (4 MiB; 85 crops of 3 x 64 x 64), see the module docstring.
_CHUNK_NUMEL = 1 << 20


def _chunks(start: int, stop: int, numel_per_sample: int,
            device: torch.device) -> list[tuple[int, int]]:
    """Near-equal ``(a, b)`` ranges covering ``range(start, stop)``: ~4 MiB on CPU, else one."""
    total = stop - start
    size = max(1, _CHUNK_NUMEL // max(1, numel_per_sample)) if device.type == "cpu" else total
    count = max(1, -(-total // max(1, size)))
    bounds = [start + round(i * total / count) for i in range(count + 1)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _run(tasks: list[Callable[[], None]], device: torch.device) -> None:
    """Run independent ``tasks`` on ``torch.get_num_threads()`` Python threads (CPU), else in turn.

    torch ops release the GIL; each worker sets one intra-op thread for itself, and the global
    default that this also changes is restored afterwards.
    """
    threads = min(torch.get_num_threads(), len(tasks)) if device.type == "cpu" else 1
    if threads <= 1:
        for task in tasks:
            task()
        return
    queue, lock, errors = iter(tasks), threading.Lock(), []

    def work() -> None:
        torch.set_num_threads(1)
        while not errors:
            with lock:
                task = next(queue, None)
            if task is None:
                return
            try:
                task()
            except BaseException as error:  # re-raised in the calling thread
                errors.append(error)

    workers = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    torch.set_num_threads(torch.get_num_threads())  # the caller's setting, as the global default
    if errors:
        raise errors[0]


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run the calling thread's torch ops on one intra-op thread, restoring the setting after.

    For the per-batch draws and bookkeeping: many ops on tensors of a few hundred elements, of
    which several (exp, cos, sqrt, ...) go through MKL's vector math and start an OpenMP team
    even that small. On a loaded machine without ``OMP_WAIT_POLICY=PASSIVE`` each of those took
    3 to 8 ms (~90 ms per batch of 512 crops instead of ~2).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class _RowPass:
    """Weighted gathers of whole rows (one ``embedding_bag``) for a range of samples.

    Sample ``i`` of the range gives ``out[i, c, r] = sum_k weight[i, r, k] * table[image[i], c,
    index[i, r, k]]`` from a table (N, C, L, M): interpolation or filtering along dim -2 at about
    the cost of a copy. Holds ``base`` (m, C), the first row of each sample's image-channels in
    the table viewed as ``(N * C * L, M)``, ``index`` (m or 1, R, K) and ``weight`` (m, R or 1,
    K); the bags (m * C * R, K) are built per call, in the chunk's thread (int32, cheaper than
    int64, where the row numbers fit).
    """

    base: Tensor
    index: Tensor
    weight: Tensor

    @classmethod
    def build(cls, index: Tensor, weight: Tensor, image: Tensor,
              table: tuple[int, int, int]) -> _RowPass:
        """From row numbers ``index`` in ``[0, L)``, ``weight`` and the ``image`` (m,) that each
        sample reads, for a table of shape ``table`` = (N, C, L)."""
        n, channels, length = table
        dtype = torch.int32 if n * channels * length < 2**31 else torch.long
        channel = torch.arange(channels, device=image.device, dtype=dtype)
        return cls((image.to(dtype)[:, None] * channels + channel) * length, index.to(dtype),
                   weight)

    def __call__(self, table: Tensor, a: int, z: int) -> Tensor:
        """Outputs (z - a, C, R, M) of the samples ``a:z`` of the range, from ``table``."""
        (m, channels), (rows, taps) = self.base[a:z].shape, self.index.shape[1:]
        index = self.index if self.index.shape[0] == 1 else self.index[a:z]
        bags = (self.base[a:z, :, None, None] + index[:, None]).view(-1, taps)
        weights = self.weight[a:z, None].expand(m, channels, rows, taps).reshape(-1, taps)
        width = table.shape[-1]
        out = F.embedding_bag(bags, table.reshape(-1, width), per_sample_weights=weights,
                              mode="sum")
        return out.view(m, channels, rows, width)


# --- geometry ------------------------------------------------------------------------------------

# how a crop is resampled, see _resample_paths
_GRID, _UPRIGHT, _TURNED, _COPY = 0, 1, 2, 3


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
    *,
    rotation_p: float = 1.0,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Random resized crop, flips, 90-degree turns and small rotation, as one bilinear resampling.

    Per sample the output pixel grid (normalised coordinates ``p``) is mapped to the input by
    ``A p + t`` with ``A = N^-1 R N S F D``: ``D`` a turn by ``k`` x 90 degrees (as
    ``torch.rot90(x, k, dims=(-2, -1))``), ``F`` the flips (as ``torch.flip``; the flips act before
    the turn), ``S`` the crop extent, ``R`` a rotation done in pixel space (``N`` converts
    normalised to pixel units, so non-square images do not shear) and ``t`` the crop centre.
    The crop follows torchvision's ``RandomResizedCrop`` parameters (area fraction ``scale``,
    log-uniform aspect ``ratio``) but clamps to the image instead of retrying. Bilinear sampling
    at pixel centres, so with no crop, no rotation and unchanged size it returns the input
    exactly (flips and 90-degree turns too, for square images). The rotation is applied with
    probability ``rotation_p`` (keyword only; ``ImageAugmentConfig`` defaults it to 0.5).

    Rotated crops (and every crop with ``padding_mode="zeros"``) go through ``grid_sample``; the
    others lie inside the image and go through two separable passes that give the same values
    (up to float rounding) 2 to 3 times faster on CPU (:func:`_separable_taps`).

    Args:
        images: ``(B, C, H, W)`` float.
        output_size: output side or ``(h, w)``; ``None`` keeps ``(H, W)``.

    Returns:
        ``(B, C, h, w)`` float; with ``return_params`` also a dict of the ``(B,)`` parameters
        drawn: ``rot90_k`` (int), ``hflip``/``vflip`` (bool), ``angle`` (degrees, 0 where not
        rotated), ``crop_w``/``crop_h`` (fraction of the image side), ``centre_x``/``centre_y``
        (normalised) and ``theta`` (B, 2, 3).
    """
    _check_images(images, "random_resized_crop_flip_rotate")
    b, _, height, width = images.shape
    with _one_thread():
        params = _draw_geometry(b, height, width, scale, ratio, hflip, vflip, rot90,
                                rotation_degrees, rotation_p, generator, images.new_empty(()))
        geometry = (params["theta"], _resample_paths(params, padding_mode))
    out = _execute(images, 1, _output_size(output_size, height, width), padding_mode,
                   geometry=geometry)
    return (out, params) if return_params else out


def _draw_geometry(b: int, height: int, width: int, scale: tuple[float, float],
                   ratio: tuple[float, float], hflip: float, vflip: float, rot90: bool,
                   rotation_degrees: float, rotation_p: float, generator: torch.Generator | None,
                   like: Tensor) -> dict[str, Tensor]:
    """The ``(B,)`` parameters and ``theta`` (B, 2, 3) of ``random_resized_crop_flip_rotate``."""
    device = like.device
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
        gen_device = generator.device if generator is not None else device
        k = torch.randint(0, 4, (b,), generator=generator, device=gen_device).to(device)
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


def _resample_paths(params: dict[str, Tensor], padding_mode: str) -> Tensor:
    """``(B,)`` resampling path per crop: ``_GRID`` if rotated, else ``_UPRIGHT``/``_TURNED``.

    An unrotated crop lies inside the image, where ``"reflection"`` and ``"border"`` padding both
    reduce to clamping at the edge pixels, so the separable path gives ``grid_sample``'s values;
    with ``"zeros"`` the edge pixels blend with zero and every crop takes ``grid_sample``.
    """
    if padding_mode == "zeros":
        return torch.full_like(params["rot90_k"], _GRID)
    return torch.where(params["angle"] == 0, _UPRIGHT + params["rot90_k"] % 2, _GRID)


def _plan(paths: Tensor, numel_per_sample: int, device: torch.device,
          first: Tensor | None = None) -> tuple[Tensor, list[tuple[int, int, int]]]:
    """Samples sorted by path (``order``) and ``(path, start, stop)`` chunks of that order.

    Within a path, samples where ``first`` (B,) is true come first.
    """
    key = paths if first is None else paths * 2 + (~first).long()
    order = torch.argsort(key, stable=True)
    plan, start = [], 0
    for path, count in enumerate(torch.bincount(paths, minlength=_COPY + 1).tolist()):
        plan += [(path, a, b) for a, b in _chunks(start, start + count, numel_per_sample, device)]
        start += count
    return order, plan


def _affine_grid(theta: Tensor, out_h: int, out_w: int) -> Tensor:
    """``F.affine_grid(theta, (B, C, out_h, out_w), align_corners=False)`` by broadcasting.

    ``theta`` (B, 2, 3) -> grid (B, out_h, out_w, 2); several times faster than ``affine_grid``
    on CPU, and exact at pixel centres for an identity ``theta``.
    """
    xs, ys = _pixel_centres(out_w, theta), _pixel_centres(out_h, theta)
    cols = theta.transpose(1, 2)[:, None, None]  # (B, 1, 1, 3, 2): columns of theta
    return cols[..., 0, :] * xs[:, None] + (cols[..., 1, :] * ys[:, None, None] + cols[..., 2, :])


def _pixel_centres(size: int, like: Tensor) -> Tensor:
    """Normalised coordinates (align_corners=False) of the ``size`` pixel centres of an axis."""
    return (torch.arange(size, device=like.device, dtype=like.dtype) * 2 + 1) / size - 1


def _separable_taps(theta: Tensor, height: int, width: int, out_h: int, out_w: int,
                    turned: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bilinear taps of unrotated crops ``theta`` (m, 2, 3) that lie inside the image.

    Unrotated, ``theta`` maps output rows to input rows and columns to columns (``turned``, an
    odd number of 90-degree turns: rows to columns and columns to rows), so ``grid_sample``'s
    bilinear sampling is separable: a 2-tap interpolation of the input's rows, then of its
    columns. Returns ``(row_index, row_weight, col_index, col_weight)``, each (m, R or S, 2):
    for each output row (``turned``: column) the 2 input rows to blend, and for each output
    column (row) the 2 input columns. Coordinates are computed as in ``_affine_grid`` and
    ``grid_sample``, and clamped to the edge pixels as its border and reflection padding do
    inside the image.
    """
    us, vs = _pixel_centres(out_w, theta)[None], _pixel_centres(out_h, theta)[None]
    tx, ty = theta[:, 0, 2:], theta[:, 1, 2:]
    if turned:  # output columns read input rows, output rows read input columns
        rows, cols = theta[:, 1, 0:1] * us + ty, theta[:, 0, 1:2] * vs + tx
    else:
        rows, cols = theta[:, 1, 1:2] * vs + ty, theta[:, 0, 0:1] * us + tx
    return (*_linear_taps(rows, height), *_linear_taps(cols, width))


def _linear_taps(coords: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Normalised coordinates (m, R) -> the 2 pixel indices and weights (m, R, 2) to blend."""
    pixel = ((coords + 1) * (size / 2) - 0.5).clamp_(0, size - 1)
    low = pixel.floor()
    frac = pixel - low
    low = low.long()
    index = torch.stack([low, (low + 1).clamp_(max=size - 1)], -1)
    return index, torch.stack([1 - frac, frac], -1)


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
    Samples whose gamma is not chosen skip the power (they are computed apart from the others).

    Returns a new ``(B, C, H, W)`` tensor (``images`` is not modified); with ``return_params``
    also a dict of the ``(B, C)`` parameters ``gamma``, ``factor`` and ``shift`` (1, 1, 0 where an
    op was not applied).
    """
    _check_images(images, "intensity_jitter")
    b, c = images.shape[:2]
    with _one_thread():
        params = _draw_intensity(b, c, brightness, contrast, gamma, p, generator,
                                 images.new_empty(()))
    out = _execute(images, 1, images.shape[2:], "reflection", jitter=params)
    if not return_params:
        return out
    log_g, factor, shift = params
    ones = torch.ones((b, c), device=images.device, dtype=images.dtype)
    return out, {"gamma": ones if log_g is None else log_g.exp(),
                 "factor": ones if factor is None else factor,
                 "shift": ones - 1 if shift is None else shift}


def _draw_intensity(b: int, c: int, brightness: float, contrast: float, gamma: float, p: float,
                    generator: torch.Generator | None,
                    like: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(log_gamma, factor, shift)``, each ``(B, C)``, or ``None`` where the op is off."""
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
    return log_g, factor, shift


def _intensity_jitter_(x: Tensor, first: int, gamma: list[Tensor] | None,
                       factor: Tensor | None, shift: Tensor | None) -> None:
    """Apply :func:`intensity_jitter` to ``x`` (m, C, H, W) in place; only ``x[first:]`` has gamma.

    ``gamma`` is ``[g, 1 - g]`` of the rows ``x[first:]``, ``factor`` and ``shift`` are for all
    rows; each (m or m - first, C, 1, 1). With ``lo``/``span`` the image-channel min/range and
    ``z = (x - lo) ** g``, gamma gives ``y = span ** (1 - g) * z + lo``, and contrast ``f`` and
    brightness ``s`` then give ``f * y + (1 - f) * mean(y) + s``: one multiply-add of ``z`` with
    (m, C) coefficients, ``scale = f * span ** (1 - g)`` and
    ``offset = lo + (1 - f) * span ** (1 - g) * mean(z) + s``.
    """
    lo = scale = None
    if gamma is not None and first < x.shape[0]:
        z = x[first:]
        lo = z.amin(dim=(2, 3), keepdim=True)
        span = z.amax(dim=(2, 3), keepdim=True).sub_(lo)
        _pow_(z.sub_(lo), gamma[0])  # >= 0 exactly, since lo is the minimum
        scale = torch.where(span > 0, span, 1.0).pow_(gamma[1])  # constant channel: z = 0, y = lo
        if first:  # rows without gamma: lo 0, scale 1
            lo = F.pad(lo, (0, 0, 0, 0, 0, 0, first, 0))
            scale = F.pad(scale, (0, 0, 0, 0, 0, 0, first, 0), value=1.0)
    offset = lo
    if factor is not None:
        mean = x.mean(dim=(2, 3), keepdim=True)
        mean = (1.0 - factor) * (mean if scale is None else scale * mean)
        offset = mean if lo is None else mean.add_(lo)
        scale = factor if scale is None else scale * factor
    if shift is not None:
        offset = shift if offset is None else offset + shift
    if scale is not None:
        x.mul_(scale)  # (addcmul with broadcast operands is several times slower)
    if offset is not None:
        x.add_(offset)


def _pow_(x: Tensor, exponent: Tensor) -> None:
    """``x **= exponent`` in place for ``x >= 0`` (``0 ** g = 0``), as ``exp2(g * log2(x))``.

    ``exponent`` broadcasts against ``x``. On CPU the logarithm and exponential are numpy's
    (SIMD, within 2 ulp in float32): about 5x (log2) and 2x (exp2) faster than torch's there;
    ``torch.pow`` with a tensor exponent is slower still.
    """
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not x.requires_grad:
        array = x.numpy()
        with np.errstate(divide="ignore"):  # log2(0) = -inf, then exp2(-inf) = 0
            np.log2(array, out=array)
        x.mul_(exponent)
        np.exp2(array, out=array)
    else:
        x.log2_().mul_(exponent).exp2_()


# --- blur and noise ------------------------------------------------------------------------------


def gaussian_blur(
    images: Tensor,
    sigma: tuple[float, float] = (0.1, 1.5),
    p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Gaussian blur with a random sigma per sample (shared by its channels), with probability p.

    Separable, with per-sample kernels of radius ``ceil(3 * sigma[1])`` (truncated to the image
    if it is smaller) and reflect padding, as torchvision's ``gaussian_blur``; each axis is one
    pass of weighted row gathers (:class:`_RowPass`, the padding folded into the row numbers).
    Only the chosen samples are blurred. Returns a new ``(B, C, H, W)`` tensor.
    """
    _check_images(images, "gaussian_blur")
    with _one_thread():
        sigmas, chosen = _draw_blur(images.shape[0], sigma, p, generator, images.new_empty(()))
    return _execute(images, 1, images.shape[2:], "reflection",
                    blur=(sigmas, chosen, sigma))


def _draw_blur(b: int, sigma: tuple[float, float], p: float, generator: torch.Generator | None,
               like: Tensor) -> tuple[Tensor, Tensor]:
    """``(sigmas, chosen)``, each ``(B,)``."""
    return _uniform((b,), sigma[0], sigma[1], generator, like), _bernoulli((b,), p, generator, like)


def _blur_radius(sigma: tuple[float, float], height: int, width: int) -> int:
    return max(0, min(math.ceil(3.0 * sigma[1]), height - 1, width - 1))


def _blur_kernels(sigmas: Tensor, radius: int) -> Tensor:
    """Normalised gaussian kernels (B, 2 * radius + 1) of ``sigmas`` (B,)."""
    offsets = torch.arange(-radius, radius + 1, device=sigmas.device, dtype=sigmas.dtype)
    kernels = torch.exp(-0.5 * (offsets / sigmas[:, None]) ** 2)
    return kernels / kernels.sum(1, keepdim=True)


def _reflected_taps(radius: int, size: int, like: Tensor) -> Tensor:
    """(1, size, K) row numbers ``i + offset``, reflected at the edges as ``F.pad`` "reflect"."""
    index = torch.arange(size, device=like.device)[:, None]
    index = (index + torch.arange(-radius, radius + 1, device=like.device)).abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)[None]


def gaussian_noise(
    images: Tensor,
    std: float = 0.05,
    p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Add gaussian noise with a per-sample std uniform in ``[0, std]``, with probability p.

    Within a sample the noise is i.i.d. ``N(0, std_i ** 2)`` per pixel and channel. It is read
    from a bank: the batch draws ``D + R`` standard normal values (``D = C * H * W``,
    ``R = max(3 * D, B)``), and each sample adds the ``D`` consecutive values at its own offset
    in ``[0, R)`` (distinct offsets, drawn without replacement), times its std. So samples get
    overlapping, shifted stretches of the same draws, never the same stretch; which samples
    share draws is random and independent of the images, so it tells nothing about which samples
    are views of one image. One bank per batch instead of ``D`` draws per sample made the noise
    about 5x cheaper on CPU, where ``torch.randn`` dominated its cost.

    Returns a new ``(B, C, H, W)`` tensor; only the chosen samples get noise.
    """
    _check_images(images, "gaussian_noise")
    with _one_thread():
        draws = _draw_noise(images.shape[0], images[0].numel(), std, p, generator,
                            images.new_empty(()))
    return _execute(images, 1, images.shape[2:], "reflection", noise=draws)


def _draw_noise(b: int, numel: int, std: float, p: float, generator: torch.Generator | None,
                like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(stds, chosen, bank, offsets)``: ``(B,)``, ``(B,)``, the bank ``(numel + R,)`` and the
    distinct ``(B,)`` offsets into it of :func:`gaussian_noise`, for samples of ``numel``."""
    stds, chosen = _uniform((b,), 0.0, std, generator, like), _bernoulli((b,), p, generator, like)
    gen_device = generator.device if generator is not None else like.device
    span = max(3 * numel, b)
    bank = torch.randn(numel + span, generator=generator, device=gen_device, dtype=like.dtype)
    offsets = torch.randperm(span, generator=generator, device=gen_device)[:b]
    return stds, chosen, bank.to(like.device), offsets.to(like.device)


def _add_noise_(x: Tensor, rows: Tensor, stds: Tensor, bank: Tensor, offsets: Tensor) -> None:
    """Add ``stds`` (k,) times the ``bank`` windows at ``offsets`` (k,) to ``x[rows]`` in place.

    ``x`` (m, C, H, W) contiguous, ``rows`` (k,) distinct.
    """
    windows = bank.unfold(0, x[0].numel(), 1).index_select(0, offsets)
    x.view(x.shape[0], -1).index_add_(0, rows, windows.mul_(stds[:, None]))


# --- execution -----------------------------------------------------------------------------------


def _execute(images: Tensor, repeats: int, out_size: tuple[int, int] | torch.Size,
             padding_mode: str, geometry: tuple[Tensor, Tensor] | None = None,
             jitter: tuple[Tensor | None, Tensor | None, Tensor | None] | None = None,
             blur: tuple[Tensor, Tensor, tuple[float, float]] | None = None,
             noise: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
             normalization: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The ops with parameters drawn beforehand, on ``torch.cat([images] * repeats)`` normalised
    first by ``normalization`` = ``(scale, bias)`` (C,) when given.

    On CPU, float32 / uint8 / uint16 without autograd: the compiled kernel
    (:func:`_execute_cpu`), which normalises while it resamples; otherwise (GPU, float64,
    autograd) torch normalises and the torch pipeline (:class:`_Pipeline`) runs. Both compute
    the same values from the same parameters, up to float rounding.
    """
    if _use_cpu_kernel(images):
        return _execute_cpu(images, repeats, out_size, padding_mode, geometry, jitter, blur, noise,
                            normalization)
    if normalization is not None:
        scale, bias = (t.to(images.device).view(1, -1, 1, 1) for t in normalization)
        dtype = images.dtype if images.is_floating_point() else torch.float32
        images = images.to(dtype) * scale.to(dtype) + bias.to(dtype)
    with _one_thread():
        pipeline = _Pipeline(images, repeats, out_size, padding_mode, geometry, jitter, blur, noise)
    return pipeline.run()


def _use_cpu_kernel(images: Tensor) -> bool:
    return (images.device.type == "cpu" and not images.requires_grad
            and images.dtype in (torch.float32, torch.uint8, torch.uint16))


def _execute_cpu(images: Tensor, repeats: int, out_size: tuple[int, int] | torch.Size,
                 padding_mode: str, geometry: tuple[Tensor, Tensor] | None,
                 jitter: tuple[Tensor | None, Tensor | None, Tensor | None] | None,
                 blur: tuple[Tensor, Tensor, tuple[float, float]] | None,
                 noise: tuple[Tensor, Tensor, Tensor, Tensor] | None,
                 normalization: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """:func:`_execute` by :func:`sslcell.augment._cpu_kernel.augment_range` on ranges of the
    batch, run on ``torch.get_num_threads()`` Python threads (the kernel releases the GIL)."""
    from sslcell.augment import _cpu_kernel as kernel  # compiled on first use (cached on disk)

    n, c = images.shape[:2]
    b, (h, w) = n * repeats, (int(out_size[0]), int(out_size[1]))
    zeros = np.zeros((b, c), np.float32)
    if geometry is None:
        theta, paths = np.zeros((b, 2, 3), np.float32), np.full(b, kernel.COPY, np.int64)
    else:
        theta, paths = geometry[0].numpy(), geometry[1].numpy().astype(np.int64)
    log_g, factor, shift = jitter if jitter is not None else (None, None, None)
    log_g = zeros if log_g is None else log_g.numpy()
    factor = zeros + 1 if factor is None else factor.numpy()
    shift = zeros if shift is None else shift.numpy()
    radius = 0 if blur is None else _blur_radius(blur[2], h, w)
    if radius > 0:  # zero taps up to a multiple of 4, as the kernel's blur wants
        kernels = F.pad(_blur_kernels(blur[0], radius), (0, (-(2 * radius + 1)) % 4)).numpy()
        blurred = blur[1].numpy()
    else:
        kernels, blurred = np.zeros((b, 4), np.float32), np.zeros(b, np.bool_)
    if noise is None:
        stds, offsets = np.zeros(b, np.float32), np.zeros(b, np.int64)
        bank = np.zeros(c * h * w, np.float32)
    else:
        stds = torch.where(noise[1], noise[0], 0.0).numpy()
        bank, offsets = noise[2].numpy(), noise[3].numpy()
    padding = {"zeros": kernel.ZEROS, "border": kernel.BORDER, "reflection": kernel.REFLECTION}
    out = np.empty((b, c, h, w), np.float32)
    if normalization is None:
        scale, bias = np.ones(c, np.float32), np.zeros(c, np.float32)
    else:
        scale, bias = (t.numpy() for t in normalization)
    args = (images.contiguous().numpy(), scale, bias, np.arange(b, dtype=np.int64) % n, theta, paths,
            padding[padding_mode], log_g, factor, shift, kernels, radius, blurred, stds, offsets,
            bank, out)
    threads = max(1, torch.get_num_threads())
    bounds = [round(i * b / (4 * threads)) for i in range(4 * threads + 1)]
    _run([lambda a=a, z=z: kernel.augment_range(*args, a, z)
          for a, z in zip(bounds[:-1], bounds[1:]) if z > a], images.device)
    return torch.from_numpy(out)


# --- the torch pipeline --------------------------------------------------------------------------


class _Pipeline:
    """The ops of one call on ``torch.cat([images] * repeats)``, chunk by chunk.

    Takes the parameters of the ``B = N * repeats`` samples, drawn beforehand: ``geometry``
    ``(theta (B, 2, 3), paths (B,))`` (None: each crop is its image), ``jitter`` as
    :func:`_draw_intensity`, ``blur`` ``(sigmas (B,), chosen (B,), sigma range)`` and ``noise``
    ``(stds (B,), chosen (B,), bank, offsets (B,))`` (:func:`_draw_noise`). The
    constructor sorts the samples (by resampling path, within a path those without gamma first)
    and computes per batch what does not need the pixels: the taps and weights of the separable
    resampling and of the blur, and which rows of each chunk get gamma, blur and noise. :meth:`run`
    then makes the ``(B, C, out_h, out_w)`` output chunk by chunk.
    """

    def __init__(self, images: Tensor, repeats: int, out_size: tuple[int, int] | torch.Size,
                 padding_mode: str, geometry: tuple[Tensor, Tensor] | None = None,
                 jitter: tuple[Tensor | None, Tensor | None, Tensor | None] | None = None,
                 blur: tuple[Tensor, Tensor, tuple[float, float]] | None = None,
                 noise: tuple[Tensor, Tensor] | None = None) -> None:
        self.images = images = images.contiguous()
        n, c = images.shape[:2]
        b, device = n * repeats, images.device
        self.out_h, self.out_w = int(out_size[0]), int(out_size[1])
        self.padding_mode = padding_mode
        paths = torch.full((b,), _COPY, device=device) if geometry is None else geometry[1]
        no_gamma = None if jitter is None or jitter[0] is None else (jitter[0] == 0).all(1)
        self.order, self.plan = _plan(paths, c * self.out_h * self.out_w, device, no_gamma)
        self.sources = self.order % n  # the image of `images` that each sorted sample reads
        sizes = torch.tensor([z - a for _, a, z in self.plan], dtype=torch.long, device=device)
        chunk = torch.repeat_interleave(torch.arange(len(self.plan), device=device), sizes)
        local = torch.arange(b, device=device) - (torch.cumsum(sizes, 0) - sizes)[chunk]

        # the sorted rows without gamma, with blur, with noise; their range in each chunk
        blur_on = blur is not None and _blur_radius(blur[2], self.out_h, self.out_w) > 0
        selected = {"no_gamma": no_gamma, "blur": blur[1] if blur_on else None,
                    "noise": None if noise is None else noise[1]}
        selected = {k: self._sort(v).nonzero().squeeze(1) for k, v in selected.items()
                    if v is not None}
        counts = {k: torch.bincount(chunk[v], minlength=len(self.plan))
                  for k, v in selected.items()}
        ends = {k: v.cumsum(0) for k, v in counts.items()}
        ends_list = torch.stack(list(ends.values())).tolist() if ends else []  # host sync
        self.bounds = {k: [0, *v] for k, v in zip(ends, ends_list)}

        self.theta = None if geometry is None else self._sort(geometry[0])
        self.separable = {path: self._separable(path, local) for path in (_UPRIGHT, _TURNED)
                          if any(p == path for p, _, _ in self.plan)}
        self.gamma = self.factor = self.shift = None
        if jitter is not None:
            log_g, self.factor, self.shift = (
                None if t is None else self._sort(t)[:, :, None, None] for t in jitter)
            self.gamma = None if log_g is None else (log_g.exp(), -log_g.expm1())  # g, 1 - g
        self.blur = None
        if "blur" in selected:
            rows = selected["blur"]
            first = (ends["blur"] - counts["blur"])[chunk[rows]]  # of the chunk's blurred rows
            rank = torch.arange(rows.shape[0], device=device) - first
            self.blur = self._blur_passes(blur, rows, local[rows], rank)
        self.noise = None
        if "noise" in selected:
            rows = selected["noise"]
            self.noise = (local[rows], self._sort(noise[0]).index_select(0, rows), noise[2],
                          self._sort(noise[3]).index_select(0, rows))

    def _sort(self, t: Tensor) -> Tensor:
        """Per-sample ``t`` (B, ...) in sorted order."""
        return t.index_select(0, self.order)

    def _separable(self, path: int, local: Tensor) -> tuple[int, _RowPass, _RowPass]:
        """The first sorted sample on ``path`` (_UPRIGHT or _TURNED) and its two row passes.

        Rows of the images, then of the transposed result (a chunk's own crops, ``local``).
        """
        spans = [(a, z) for p, a, z in self.plan if p == path]
        a, z = spans[0][0], spans[-1][1]
        n, c, height, width = self.images.shape
        row_index, row_weight, col_index, col_weight = _separable_taps(
            self.theta[a:z], height, width, self.out_h, self.out_w, turned=path == _TURNED)
        return (a, _RowPass.build(row_index, row_weight, self.sources[a:z], (n, c, height)),
                _RowPass.build(col_index, col_weight, local[a:z], (len(self.order), c, width)))

    def _blur_passes(self, blur: tuple[Tensor, Tensor, tuple[float, float]], rows: Tensor,
                     local: Tensor, rank: Tensor) -> tuple[Tensor, _RowPass, _RowPass]:
        """For the blurred sorted ``rows``: their row in the chunk and the vertical and horizontal
        passes (the latter on the transposed result, whose rows are ``rank``)."""
        b, c, h, w = len(self.order), self.images.shape[1], self.out_h, self.out_w
        radius = _blur_radius(blur[2], h, w)
        kernels = _blur_kernels(self._sort(blur[0]).index_select(0, rows), radius)[:, None]
        return (local,
                _RowPass.build(_reflected_taps(radius, h, kernels), kernels, local, (b, c, h)),
                _RowPass.build(_reflected_taps(radius, w, kernels), kernels, rank, (b, c, w)))

    def run(self) -> Tensor:
        images = self.images
        out = images.new_empty((self.order.shape[0], images.shape[1], self.out_h, self.out_w))
        _run([lambda task=task: self._chunk(task, out) for task in range(len(self.plan))],
             images.device)
        return out

    def _chunk(self, task: int, out: Tensor) -> None:
        """Make the crops of chunk ``task`` and write them to their rows of ``out``."""
        path, start, stop = self.plan[task]
        x = self._resample(path, start, stop)
        if self.gamma is not None or self.factor is not None or self.shift is not None:
            bounds = self.bounds.get("no_gamma")
            first = 0 if bounds is None else bounds[task + 1] - bounds[task]  # rows w/o gamma
            gamma = None if self.gamma is None else [t[start + first:stop] for t in self.gamma]
            factor, shift = (None if t is None else t[start:stop]
                             for t in (self.factor, self.shift))
            _intensity_jitter_(x, first, gamma, factor, shift)
        if self.blur is not None and self.bounds["blur"][task + 1] > self.bounds["blur"][task]:
            a, z = self.bounds["blur"][task:task + 2]
            rows, vertical, horizontal = self.blur
            y = vertical(x, a, z)  # (k, C, h, w)
            y = horizontal(y.transpose(-1, -2).contiguous(), a, z)  # (k, C, w, h)
            x.index_copy_(0, rows[a:z], y.transpose(-1, -2))
        if self.noise is not None and self.bounds["noise"][task + 1] > self.bounds["noise"][task]:
            a, z = self.bounds["noise"][task:task + 2]
            rows, stds, bank, offsets = self.noise
            _add_noise_(x, rows[a:z], stds[a:z], bank, offsets[a:z])
        out.index_copy_(0, self.order[start:stop], x)

    def _resample(self, path: int, start: int, stop: int) -> Tensor:
        """Crops (m, C, out_h, out_w) of the sorted samples ``start:stop``, all on ``path``."""
        images, sources = self.images, self.sources[start:stop]
        if path == _COPY:
            return images.index_select(0, sources)
        if path == _GRID:
            grid = _affine_grid(self.theta[start:stop], self.out_h, self.out_w)
            return F.grid_sample(images.index_select(0, sources), grid, mode="bilinear",
                                 padding_mode=self.padding_mode, align_corners=False)
        first, rows, columns = self.separable[path]
        x = rows(images, start - first, stop - first)  # (m, C, R, W)
        x = columns(x.transpose(-1, -2).contiguous(), start - first, stop - first)  # (m, C, S, R)
        return x if path == _TURNED else x.transpose(-1, -2).contiguous()


# --- composition ---------------------------------------------------------------------------------


class ImageAugment(torch.nn.Module):
    """Crop/flip/rotate, then intensity jitter, blur and noise, on a whole batch.

    ``forward(images (B, C, H, W) float, generator) -> (B, C, h, w)``; see
    :class:`ImageAugmentConfig` for the ops and the module docstring for the input contract.
    The parameters are those of the functional ops above, drawn in the same order for the whole
    batch; then each chunk of crops (grouped by resampling path) goes through all ops while it
    is in cache.
    """

    def __init__(self, config: ImageAugmentConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else ImageAugmentConfig()

    def forward(self, images: Tensor, generator: torch.Generator | None = None, *,
                mean: Sequence[float] | Tensor | None = None,
                std: Sequence[float] | Tensor | None = None) -> Tensor:
        """Augment ``images`` (B, C, H, W) -> (B, C, h, w) float.

        ``images`` are float and already normalised, or, with ``mean`` and ``std`` (C,), raw crops
        (uint8, uint16 or float) normalised here as ``(x - mean[c]) / std[c]``; on CPU the
        normalisation is fused into the resampling, which saves converting the batch to float
        first.
        """
        return self._augment(images, generator, 1, mean, std)

    def _augment(self, images: Tensor, generator: torch.Generator | None, repeats: int,
                 mean: Sequence[float] | Tensor | None = None,
                 std: Sequence[float] | Tensor | None = None) -> Tensor:
        """``forward(torch.cat([images] * repeats), generator, ...)`` without making that copy."""
        cfg = self.config
        _check_images(images, "ImageAugment", raw=mean is not None)
        n, c, height, width = images.shape
        normalization = _normalization(mean, std, c, "ImageAugment")
        dtype = images.dtype if images.is_floating_point() else torch.float32  # of the draws
        like = images.new_empty((), dtype=dtype)
        b = n * repeats
        geometry = jitter = blur = noise = None
        with _one_thread():
            # every per-sample parameter for the batch, drawn as the functional ops draw them
            if not self._geometry_is_identity(height, width):
                params = _draw_geometry(b, height, width, cfg.scale, cfg.ratio, cfg.hflip,
                                        cfg.vflip, cfg.rot90, cfg.rotation_degrees, cfg.rotation_p,
                                        generator, like)
                geometry = (params["theta"], _resample_paths(params, cfg.padding_mode))
            if cfg.p_intensity > 0 and (cfg.brightness > 0 or cfg.contrast > 0 or cfg.gamma > 0):
                jitter = _draw_intensity(b, c, cfg.brightness, cfg.contrast, cfg.gamma,
                                         cfg.p_intensity, generator, like)
            if cfg.blur_p > 0:
                blur = (*_draw_blur(b, cfg.blur_sigma, cfg.blur_p, generator, like),
                        cfg.blur_sigma)
            out_size = _output_size(cfg.output_size, height, width)
            if cfg.noise_p > 0 and cfg.noise_std > 0:
                noise = _draw_noise(b, c * out_size[0] * out_size[1], cfg.noise_std, cfg.noise_p,
                                    generator, like)
        return _execute(images, repeats, out_size, cfg.padding_mode, geometry, jitter, blur, noise,
                        normalization)

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


def dihedral_views(images: Tensor) -> list[Tensor]:
    """The lossless orientations of ``images`` (B, C, H, W): 8 (turns by 0/90/180/270 degrees, each also
    mirrored) for square crops, else the 4 that keep the shape (identity, the two flips, the half turn).

    The identity comes first. Used for test-time augmentation (e.g. :func:`sslcell.classify.predict`).
    """
    _check_images(images, "dihedral_views")
    turns = (0, 1, 2, 3) if images.shape[-1] == images.shape[-2] else (0, 2)
    views = []
    for k in turns:
        turned = images.rot90(k, dims=(-2, -1)) if k else images
        views += [turned, turned.flip(-1)]
    return views


def two_views(
    augment: ImageAugment, images: Tensor, generator: torch.Generator | None = None, *,
    mean: Sequence[float] | Tensor | None = None, std: Sequence[float] | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Two independent augmentations of ``images`` (B, C, H, W), made in one batched call.

    Equal to ``augment(torch.cat([images, images]), generator, mean=mean, std=std)`` split in
    two halves, without materialising that concatenation.
    """
    if isinstance(augment, ImageAugment):
        views = augment._augment(images, generator, 2, mean, std)
    elif mean is not None or std is not None:
        views = augment(torch.cat([images, images]), generator, mean=mean, std=std)
    else:
        views = augment(torch.cat([images, images]), generator)
    return views[: images.shape[0]], views[images.shape[0] :]
