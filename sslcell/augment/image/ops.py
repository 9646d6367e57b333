"""The functional image ops: each draws its parameters for the batch, then executes them.

Every op takes float images ``(B, C, H, W)``, already normalised per channel, and a
``generator``; it draws as :class:`~sslcell.augment.image.ImageAugment` draws the same op (so the
two give the same crops from the same seed) and returns a new tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sslcell.augment.image.config import (
    Geometry,
    check_images,
    draw_blur,
    draw_geometry,
    draw_intensity,
    draw_noise,
    one_thread,
    resolved_size,
)
from sslcell.augment.image.execute import execute


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
    exactly, square or not (flips and turns too; a non-square image turns by half turns only, as a quarter turn
    into its own shape would stretch it). The rotation is applied with
    probability ``rotation_p`` (keyword only; ``ImageAugmentConfig`` defaults it to 0.5).

    The values are ``grid_sample``'s (bilinear, ``padding_mode``, align_corners=False) for
    ``theta``; on CPU the kernel resamples the unrotated crops (which lie inside the image)
    separably, 2 to 3 times faster, with the same values up to float rounding.

    Args:
        images: ``(B, C, H, W)`` float.
        output_size: output side or ``(h, w)``; ``None`` keeps ``(H, W)``.

    Returns:
        ``(B, C, h, w)`` float; with ``return_params`` also a dict of the ``(B,)`` parameters
        drawn: ``rot90_k`` (int), ``hflip``/``vflip`` (bool), ``angle`` (degrees, 0 where not
        rotated), ``crop_w``/``crop_h`` (fraction of the image side), ``centre_x``/``centre_y``
        (normalised) and ``theta`` (B, 2, 3).
    """
    check_images(images, "random_resized_crop_flip_rotate")
    b, _, height, width = images.shape
    with one_thread():
        params = draw_geometry(b, height, width, scale, ratio, hflip, vflip, rot90,
                               rotation_degrees, rotation_p, generator, images.new_empty(()))
    out = execute(images, 1, resolved_size(output_size, height, width), padding_mode,
                  geometry=Geometry.from_params(params))
    return (out, params) if return_params else out


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
    Channels whose gamma is not chosen are left as they are by it.

    Returns a new ``(B, C, H, W)`` tensor (``images`` is not modified); with ``return_params``
    also a dict of the ``(B, C)`` parameters ``gamma``, ``factor`` and ``shift`` (1, 1, 0 where an
    op was not applied).
    """
    check_images(images, "intensity_jitter")
    b, c = images.shape[:2]
    with one_thread():
        jitter = draw_intensity(b, c, brightness, contrast, gamma, p, generator, images.new_empty(()))
    out = execute(images, 1, images.shape[2:], "reflection", jitter=jitter)
    if not return_params:
        return out
    log_g, factor, shift = jitter
    ones = torch.ones((b, c), device=images.device, dtype=images.dtype)
    return out, {"gamma": ones if log_g is None else log_g.exp(),
                 "factor": ones if factor is None else factor,
                 "shift": ones - 1 if shift is None else shift}


def gaussian_blur(
    images: Tensor,
    sigma: tuple[float, float] = (0.1, 1.5),
    p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Gaussian blur with a random sigma per sample (shared by its channels), with probability p.

    Separable, with per-sample kernels of radius ``ceil(3 * sigma[1])`` (truncated to the image
    if it is smaller) and reflect padding, as torchvision's ``gaussian_blur``. Only the chosen
    samples are blurred. Returns a new ``(B, C, H, W)`` tensor.
    """
    check_images(images, "gaussian_blur")
    with one_thread():
        blur = draw_blur(images.shape[0], sigma, p, generator, images.new_empty(()))
    return execute(images, 1, images.shape[2:], "reflection", blur=blur)


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
    check_images(images, "gaussian_noise")
    with one_thread():
        noise = draw_noise(images.shape[0], images[0].numel(), std, p, generator, images.new_empty(()))
    return execute(images, 1, images.shape[2:], "reflection", noise=noise)


def dihedral_views(images: Tensor) -> list[Tensor]:
    """The lossless orientations of ``images`` (B, C, H, W): 8 (turns by 0/90/180/270 degrees, each also
    mirrored) for square crops, else the 4 that keep the shape (identity, the two flips, the half turn).

    The identity comes first. Used for test-time augmentation (e.g. :func:`sslcell.classify.predict`).
    """
    check_images(images, "dihedral_views")
    turns = (0, 1, 2, 3) if images.shape[-1] == images.shape[-2] else (0, 2)
    views = []
    for k in turns:
        turned = images.rot90(k, dims=(-2, -1)) if k else images
        views += [turned, turned.flip(-1)]
    return views
