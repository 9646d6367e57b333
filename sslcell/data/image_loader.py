"""Shuffled batches of raw crops ``(B, C, H, W)`` (uint8 / uint16 / float32) from :class:`CellImages`.

Pixels stay in their stored dtype until they reach the model's device, where :class:`ImageInputs`
converts and normalises them: a uint8 batch crosses the host-device link at a quarter of float32's size.
Each epoch's order depends only on ``(seed, epoch)``; the cells are dealt to the streams ``(rank, worker)``
and every stream yields the same number of batches (DDP would hang otherwise). Rows of a batch are read
in sorted order (memmap / chunk locality) and handed out in the shuffled order.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from sslcell.data.images import CellImages
from sslcell.data.loader import ShardedBatches
from sslcell.errors import ConfigError


class ImageBatchLoader(ShardedBatches):
    """Iterable of ``(B, C, H, W)`` tensors in the crops' dtype; with ``return_index`` ``(batch, rows (B,) int64)``.

    ``weights`` (N,) non-negative: draw each epoch's cells with replacement, with probability proportional to
    the weight (class balancing by oversampling); the epoch keeps ``N`` draws. Without ``weights`` an epoch is a
    permutation of the cells (without replacement). Same protocol as the expression loader: :meth:`set_epoch`
    before each epoch, :meth:`skip_batches` for an exact mid-epoch resume; use it through :func:`make_image_dataloader`.
    """

    def __init__(
        self,
        images: CellImages,
        batch_size: int = 256,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        *,
        weights: np.ndarray | None = None,
        return_index: bool = False,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if int(batch_size) != batch_size or batch_size < 1:
            raise ConfigError(f"ImageBatchLoader: batch_size must be a positive integer, got {batch_size!r}")
        if (rank is None) != (world_size is None) or (rank is not None and not 0 <= rank < world_size):
            raise ConfigError(f"ImageBatchLoader: give rank and world_size together; got {rank}, {world_size}")
        if weights is not None:
            weights = np.asarray(weights, dtype=np.float64)
            if weights.shape != (len(images),) or not np.isfinite(weights).all() or (weights < 0).any():
                raise ConfigError(f"ImageBatchLoader: weights must be ({len(images)},) finite and >= 0")
            if weights.sum() <= 0:
                raise ConfigError("ImageBatchLoader: weights sum to 0")
            weights = weights / weights.sum()
        self.images = images
        self.batch_size, self.seed, self.shuffle, self.drop_last = int(batch_size), int(seed), shuffle, drop_last
        self.weights, self.return_index, self.num_workers = weights, return_index, int(num_workers)
        self.rank, self.world_size = rank, world_size
        self._init_epochs()

    def _batches_per_stream(self, n_streams: int) -> int:
        rows = len(self.images) // n_streams
        n = rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)
        if n == 0:
            raise ConfigError(
                f"ImageBatchLoader: {len(self.images)} cells over {n_streams} stream(s) (ranks x workers) give "
                f"{rows} per stream, fewer than batch_size={self.batch_size}; lower data.batch_size"
            )
        return n

    def epoch_order(self) -> np.ndarray:
        """The epoch's cell order ``(N,)``: a permutation, weighted draws, or ``arange`` without shuffling."""
        n = len(self.images)
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.weights is not None:
            return rng.choice(n, size=n, replace=True, p=self.weights)
        return rng.permutation(n) if self.shuffle else np.arange(n)

    def __iter__(self) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        stream, n_streams, part_skip = self._stream()
        n_batches = self._batches_per_stream(n_streams)
        rows = self.epoch_order()[stream::n_streams][: n_batches * self.batch_size]
        for k in range(part_skip, n_batches):
            batch_rows = rows[k * self.batch_size : (k + 1) * self.batch_size]
            order = np.argsort(batch_rows, kind="stable")
            pixels = np.empty((len(batch_rows), *self.images.shape[1:]), dtype=self.images.dtype)
            pixels[order] = self.images.batch(batch_rows[order])
            batch = torch.from_numpy(pixels)
            yield (batch, torch.from_numpy(batch_rows.astype(np.int64))) if self.return_index else batch


def make_image_dataloader(
    images: CellImages,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    pin_memory: bool = False,
    **loader_kwargs,
) -> DataLoader:
    """A ``DataLoader(batch_size=None)`` over an :class:`ImageBatchLoader` (``loader_kwargs`` go to it)."""
    loader = ImageBatchLoader(images, batch_size=batch_size, num_workers=num_workers, **loader_kwargs)
    return DataLoader(loader, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)
