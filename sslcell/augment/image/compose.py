""":class:`ImageAugment`, all the ops of :class:`ImageAugmentConfig` in one call, and :func:`two_views`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from sslcell.augment.image.config import (
    Geometry,
    ImageAugmentConfig,
    check_images,
    draw_blur,
    draw_geometry,
    draw_intensity,
    draw_noise,
    normalization,
    one_thread,
    resolved_size,
)
from sslcell.augment.image.execute import execute


class ImageAugment(torch.nn.Module):
    """Crop/flip/rotate, then intensity jitter, blur and noise, on a whole batch.

    ``forward(images (B, C, H, W) float, generator) -> (B, C, h, w)``; see
    :class:`ImageAugmentConfig` for the ops and :mod:`sslcell.augment.image` for the input
    contract. The parameters are those of the functional ops (:mod:`.ops`), drawn in the same
    order for the whole batch (geometry, intensity, blur, noise); then one executor applies them
    all (:func:`~.execute.execute`: on CPU each crop goes through every op while it is in cache).
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
        """``forward(torch.cat([images] * repeats), generator, ...)`` without making that copy.

        ``images`` (N, C, H, W) -> (N * repeats, C, h, w). (Used by :func:`two_views` and
        ``sslcell.methods.inputs.ImageInputs.views``.)
        """
        cfg = self.config
        check_images(images, "ImageAugment", raw=mean is not None)
        n, c, height, width = images.shape
        scale_bias = normalization(mean, std, c, "ImageAugment")
        dtype = images.dtype if images.is_floating_point() else torch.float32  # of the draws
        like = images.new_empty((), dtype=dtype)
        b = n * repeats
        out_size = resolved_size(cfg.output_size, height, width)
        geometry = jitter = blur = noise = None
        with one_thread():
            # every per-sample parameter for the batch, drawn as the functional ops draw them
            if not self._geometry_is_identity(height, width):
                geometry = Geometry.from_params(draw_geometry(
                    b, height, width, cfg.scale, cfg.ratio, cfg.hflip, cfg.vflip, cfg.rot90,
                    cfg.rotation_degrees, cfg.rotation_p, generator, like))
            if cfg.p_intensity > 0 and (cfg.brightness > 0 or cfg.contrast > 0 or cfg.gamma > 0):
                jitter = draw_intensity(b, c, cfg.brightness, cfg.contrast, cfg.gamma,
                                        cfg.p_intensity, generator, like)
            if cfg.blur_p > 0:
                blur = draw_blur(b, cfg.blur_sigma, cfg.blur_p, generator, like)
            if cfg.noise_p > 0 and cfg.noise_std > 0:
                noise = draw_noise(b, c * out_size[0] * out_size[1], cfg.noise_std, cfg.noise_p,
                                   generator, like)
        return execute(images, repeats, out_size, cfg.padding_mode, geometry, jitter, blur, noise,
                       scale_bias)

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
