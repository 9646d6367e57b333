"""Batched, channel-agnostic augmentation of image crops ``(B, C, H, W)``.

Every op works on a whole float batch on any device and for any number of channels; per-sample
random parameters are drawn as ``(B,)`` (or ``(B, C)``) tensors from an explicit
``torch.Generator`` and applied in batched code. There is no PIL and no per-sample Python loop.

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
draws (float64 images draw float64 parameters), not on the number of threads or on which
executor runs.

Modules:

* :mod:`.config`: :class:`ImageAugmentConfig`, input checks and the parameter draws.
* :mod:`.ops`: the functional ops (:func:`random_resized_crop_flip_rotate`,
  :func:`intensity_jitter`, :func:`gaussian_blur`, :func:`gaussian_noise`, :func:`dihedral_views`).
* :mod:`.compose`: :class:`ImageAugment` (all ops in one call) and :func:`two_views`.
* :mod:`.execute`: applies drawn parameters, by the CPU kernel or the torch pipeline.
* :mod:`.cpu_kernel`: the compiled (numba) CPU executor: float32 / uint8 / uint16 on CPU.
* :mod:`.torch_pipeline`: the torch executor: GPUs, float64 and autograd.
"""

from sslcell.augment.image.compose import ImageAugment, two_views
from sslcell.augment.image.config import ImageAugmentConfig
from sslcell.augment.image.ops import (
    dihedral_views,
    gaussian_blur,
    gaussian_noise,
    intensity_jitter,
    random_resized_crop_flip_rotate,
)

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
