"""The input check every image encoder runs (shapes and dtypes only, so no host sync on a GPU)."""

from __future__ import annotations

from torch import Tensor

from sslcell.errors import ChannelMismatchError, InputError


def check_image_batch(images: Tensor, in_channels: int, owner: str) -> None:
    """Raise unless ``images`` is a floating ``(N, in_channels, H, W)`` batch; ``owner`` names the encoder."""
    if images.ndim != 4 or not images.is_floating_point():
        raise InputError(f"{owner}: expected floating images (N, C, H, W), got dtype {images.dtype} "
                         f"and shape {tuple(images.shape)}")
    if images.shape[1] != in_channels:
        raise ChannelMismatchError(f"{owner}: images have {images.shape[1]} channels (dim 1), the model "
                                   f"expects {in_channels}")
