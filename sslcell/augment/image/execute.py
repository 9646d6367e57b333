"""Applies drawn parameters to a batch: the compiled CPU kernel where it applies, else torch.

:func:`execute` is the one entry point of the ops and of ``ImageAugment``. On CPU, float32,
uint8 and uint16 batches without autograd go to the numba kernel (:mod:`.cpu_kernel`), which
makes each crop in one loop nest while it is in cache, with the per-channel normalisation
folded into the resampling (raw crops are read as they are: no float copy of the batch), on
ranges of the batch in ``torch.get_num_threads()`` Python threads (the kernel releases the
GIL). Everything else (GPU, float64, autograd) is normalised by torch, then goes through the
torch pipeline (:mod:`.torch_pipeline`). Both compute the same values from the same
parameters, up to float rounding, and neither depends on the number of threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sslcell.augment.image import torch_pipeline
from sslcell.augment.image.config import Blur, Geometry, Jitter, Noise, blur_kernels, blur_radius

# How the kernel resamples a crop (the numbering of cpu_kernel's GENERAL, UPRIGHT, TURNED, COPY,
# repeated here so that the kernel loads only when a CPU batch first needs it): per-pixel taps as
# ``grid_sample`` (rotated, or zeros padding), separable (unrotated), separable with rows and
# columns swapped (unrotated, turned by an odd number of quarter turns), or a copy (no geometry).
GRID, UPRIGHT, TURNED, COPY = 0, 1, 2, 3


def execute(images: Tensor, repeats: int, out_size: tuple[int, int] | torch.Size, padding_mode: str,
            geometry: Geometry | None = None, jitter: Jitter | None = None, blur: Blur | None = None,
            noise: Noise | None = None, normalization: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The ops with parameters drawn beforehand, on ``torch.cat([images] * repeats)``.

    ``images`` (N, C, H, W), float or (with ``normalization``) raw, are first normalised by
    ``normalization`` = ``(scale, bias)`` (C,) when given: ``scale[c] * x + bias[c]``. Returns a
    new (N * repeats, C, h, w) tensor, ``(h, w) = out_size``; an op whose parameters are
    ``None`` is skipped.
    """
    out_size = (int(out_size[0]), int(out_size[1]))
    if use_cpu_kernel(images):
        return _run_cpu_kernel(images, repeats, out_size, padding_mode, geometry, jitter, blur, noise,
                               normalization)
    if normalization is not None:
        scale, bias = (t.to(images.device).view(1, -1, 1, 1) for t in normalization)
        dtype = images.dtype if images.is_floating_point() else torch.float32
        images = images.to(dtype) * scale.to(dtype) + bias.to(dtype)
    return torch_pipeline.run(images, repeats, out_size, padding_mode, geometry, jitter, blur, noise)


def use_cpu_kernel(images: Tensor) -> bool:
    """Whether :func:`execute` runs the compiled CPU kernel on ``images``."""
    return (images.device.type == "cpu" and not images.requires_grad
            and images.dtype in (torch.float32, torch.uint8, torch.uint16))


def resample_paths(geometry: Geometry, padding_mode: str) -> Tensor:
    """``(B,)`` resampling path per crop for the kernel: ``GRID`` if rotated, else ``UPRIGHT`` /
    ``TURNED``.

    An unrotated crop lies inside the image, where ``"reflection"`` and ``"border"`` padding both
    reduce to clamping at the edge pixels, so the separable path gives ``grid_sample``'s values;
    with ``"zeros"`` the edge pixels blend with zero and every crop takes ``GRID``.
    """
    if padding_mode == "zeros":
        return torch.full_like(geometry.rot90_k, GRID)
    return torch.where(geometry.angle == 0, UPRIGHT + geometry.rot90_k % 2, GRID)


def _run_cpu_kernel(images: Tensor, repeats: int, out_size: tuple[int, int], padding_mode: str,
                    geometry: Geometry | None, jitter: Jitter | None, blur: Blur | None,
                    noise: Noise | None, normalization: tuple[Tensor, Tensor] | None) -> Tensor:
    """:func:`execute` by :func:`~.cpu_kernel.augment_range` on ranges of the batch, run on
    ``torch.get_num_threads()`` Python threads. The parameters go to the kernel as numpy arrays,
    the ops that are off as neutral values (gamma 0, factor 1, shift 0, no blur, std 0)."""
    from sslcell.augment.image import cpu_kernel as kernel  # compiled on first use (cached on disk)

    n, c = images.shape[:2]
    b, (h, w) = n * repeats, out_size
    zeros = np.zeros((b, c), np.float32)
    if geometry is None:
        theta, paths = np.zeros((b, 2, 3), np.float32), np.full(b, kernel.COPY, np.int64)
    else:
        theta, paths = geometry.theta.numpy(), resample_paths(geometry, padding_mode).numpy().astype(np.int64)
    log_g, factor, shift = jitter if jitter is not None else (None, None, None)
    log_g = zeros if log_g is None else log_g.numpy()
    factor = zeros + 1 if factor is None else factor.numpy()
    shift = zeros if shift is None else shift.numpy()
    radius = 0 if blur is None else blur_radius(blur.sigma_range, h, w)
    if radius > 0:  # zero taps up to a multiple of 4, as the kernel's blur wants
        kernels = F.pad(blur_kernels(blur.sigmas, radius), (0, (-(2 * radius + 1)) % 4)).numpy()
        blurred = blur.chosen.numpy()
    else:
        kernels, blurred = np.zeros((b, 4), np.float32), np.zeros(b, np.bool_)
    if noise is None:
        stds, offsets = np.zeros(b, np.float32), np.zeros(b, np.int64)
        bank = np.zeros(c * h * w, np.float32)
    else:
        stds = torch.where(noise.chosen, noise.stds, 0.0).numpy()
        bank, offsets = noise.bank.numpy(), noise.offsets.numpy()
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
    ranges = [(a, z) for a, z in zip(bounds[:-1], bounds[1:], strict=True) if z > a]
    _in_threads(lambda a, z: kernel.augment_range(*args, a, z), ranges, threads)
    return torch.from_numpy(out)


def _in_threads(run: Callable[[int, int], None], ranges: list[tuple[int, int]], threads: int) -> None:
    """``run(a, z)`` for every range, on up to ``threads`` Python threads that take the ranges in
    turn (the kernel releases the GIL); a worker's error is raised here. (Plain threads: a
    ``ThreadPoolExecutor`` per batch cost 0.3 ms more, a few percent of a batch.)"""
    threads = min(threads, len(ranges))
    if threads <= 1:
        for a, z in ranges:
            run(a, z)
        return
    pending, lock, errors = iter(ranges), threading.Lock(), []

    def work() -> None:
        while not errors:
            with lock:
                span = next(pending, None)
            if span is None:
                return
            try:
                run(*span)
            except BaseException as error:  # re-raised in the calling thread
                errors.append(error)

    workers = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
