"""What the image augmentation tests share: a seeded generator, random float crops, and the config fields that
turn every op off (a test then turns on the op it checks)."""

from __future__ import annotations

import torch

OFF = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, vflip=0.0, rot90=False,
           rotation_degrees=0.0, brightness=0.0, contrast=0.0, gamma=0.0, blur_p=0.0, noise_p=0.0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int = 8, c: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    """``(b, c, h, w)`` standard-normal float crops."""
    return torch.randn((b, c, h, w), generator=gen(seed))
