"""Block-shuffled expression batches: contiguous reads from disk, shuffling in a bounded memory buffer.

Each epoch the row blocks (``block_size`` contiguous rows) are permuted with ``(seed, epoch)`` and
dealt round-robin to the streams ``(rank, worker)``. A stream reads ``buffer_blocks`` of its blocks
at a time, shuffles those rows, and emits batches. Memory is bounded by the buffer, whatever the
file size. Every stream yields the same number of batches (DDP would hang otherwise), computed from
the block sizes alone; at most about one block of rows per stream is left out of an epoch for that.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sslcell.data.expression import ExpressionDataset
from sslcell.data.shards import Workspace, vstack_csr
from sslcell.errors import ConfigError, SSLCellWarning

OUTPUTS = ("dense", "csr")


def _to_tensor(block: sp.csr_matrix, output: str) -> torch.Tensor:
    """``(B, G)`` float32: a dense tensor, or ``torch.sparse_csr_tensor``."""
    if output == "dense":
        return torch.from_numpy(block.toarray())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.from_numpy(block.indptr.astype(np.int64)),
            torch.from_numpy(block.indices.astype(np.int64)),
            torch.from_numpy(block.data),
            size=block.shape,
            check_invariants=False,
        )


class ShardedBatches(IterableDataset):
    """What both batch loaders share: the epoch, the skip for exact resume, and the split of an epoch into
    streams ``(rank, worker)`` that each yield the same number of batches.

    Subclasses set ``num_workers``, ``rank``, ``world_size`` and call :meth:`_init_epochs`; they supply
    ``_batches_per_stream(n_streams)`` and iterate :meth:`_stream`'s ``(stream, n_streams, skip)``.
    """

    num_workers: int
    rank: int | None
    world_size: int | None

    def _init_epochs(self) -> None:
        self.epoch, self._skip, self._dist = 0, 0, (0, 1)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation; clears a pending :meth:`skip_batches`."""
        self.epoch = int(epoch)
        self._skip = 0

    def skip_batches(self, n: int) -> None:
        """Make the next iteration start at batch ``n`` of the epoch (exact mid-epoch resume).

        Counts batches as this process's DataLoader yields them (``len()`` stays the full epoch's).
        Cleared by :meth:`set_epoch` and, when iterated in the main process, by starting the iteration.
        """
        if n < 0:
            raise ConfigError(f"skip_batches: n must be >= 0, got {n}")
        self._skip = int(n)

    def _world(self) -> tuple[int, int]:
        """``(rank, world_size)``: the override, else torch.distributed, else the last seen value."""
        if self.rank is not None:
            return self.rank, self.world_size
        if dist.is_available() and dist.is_initialized():
            self._dist = (dist.get_rank(), dist.get_world_size())
        return self._dist

    def _batches_per_stream(self, n_streams: int) -> int:
        raise NotImplementedError

    def __len__(self) -> int:
        """Batches this process yields per epoch (over all its DataLoader workers)."""
        n_workers = max(self.num_workers, 1)
        return self._batches_per_stream(self._world()[1] * n_workers) * n_workers

    def _stream(self) -> tuple[int, int, int]:
        """``(stream, n_streams, batches of that stream to skip)`` for the calling process and worker."""
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if n_workers != max(self.num_workers, 1):
            raise ConfigError(
                f"{type(self).__name__} was built for num_workers={self.num_workers} but runs with {n_workers} "
                "worker(s); build both with make_dataloader / make_image_dataloader(..., num_workers=...)"
            )
        skip = self._skip
        if info is None:
            self._skip = 0
        # The DataLoader takes batches from workers 0, 1, ..., W-1, 0, ... and epoch batch k belongs to
        # worker k % W: after skipping `skip` batches, worker w plays the part of worker (w + skip) % W.
        part = (worker + skip) % n_workers
        part_skip = max(0, -(-(skip - part) // n_workers))  # how many of the first `skip` batches are its
        rank, world = self._world()
        return rank * n_workers + part, world * n_workers, part_skip


class BlockShuffleLoader(ShardedBatches):
    """Iterable of ``(B, G)`` float32 batches (dense tensors or sparse CSR) from an :class:`ExpressionDataset`.

    Use with ``DataLoader(loader, batch_size=None)`` (see :func:`make_dataloader`). Call
    :meth:`set_epoch` before each epoch: the order depends only on ``(seed, epoch)`` and on the
    number of streams (ranks x workers). With ``shuffle=False`` rows come in file order.
    With ``return_index=True`` each item is ``(batch, rows)``, ``rows`` the ``(B,)`` int64 dataset rows.

    ``num_workers`` must match the DataLoader's (``make_dataloader`` sets both); ``rank`` and
    ``world_size`` override ``torch.distributed`` (custom launchers, tests).
    """

    def __init__(
        self,
        dataset: ExpressionDataset,
        batch_size: int = 256,
        block_size: int = 1024,
        buffer_blocks: int = 8,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        output: str = "dense",
        *,
        return_index: bool = False,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        for name, value in (("batch_size", batch_size), ("block_size", block_size), ("buffer_blocks", buffer_blocks)):
            if int(value) != value or value < 1:
                raise ConfigError(f"BlockShuffleLoader: {name} must be a positive integer, got {value!r}")
        if output not in OUTPUTS:
            raise ConfigError(f"BlockShuffleLoader: output must be one of {OUTPUTS}, got {output!r}")
        if seed < 0 or num_workers < 0:
            raise ConfigError(f"BlockShuffleLoader: seed and num_workers must be >= 0, got {seed}, {num_workers}")
        if (rank is None) != (world_size is None) or (rank is not None and not 0 <= rank < world_size):
            raise ConfigError(
                "BlockShuffleLoader: give rank and world_size together, 0 <= rank < world_size; "
                f"got {rank}, {world_size}"
            )
        self.dataset = dataset
        self.batch_size, self.block_size, self.buffer_blocks = int(batch_size), int(block_size), int(buffer_blocks)
        self.seed, self.shuffle, self.drop_last, self.output = int(seed), shuffle, drop_last, output
        self.return_index, self.num_workers = return_index, int(num_workers)
        self.rank, self.world_size = rank, world_size
        self._init_epochs()
        self._block_starts = np.arange(0, dataset.n_obs, self.block_size)
        self._block_sizes = np.minimum(self.block_size, dataset.n_obs - self._block_starts)
        self._world()

    def _batches_per_stream(self, n_streams: int) -> int:
        """Batches every stream yields: what the stream with the fewest rows can fill, for any permutation."""
        n_blocks = len(self._block_sizes)
        if n_blocks < n_streams:
            raise ConfigError(
                f"BlockShuffleLoader: {n_blocks} blocks of {self.block_size} rows cannot feed {n_streams} streams "
                "(ranks x workers); lower block_size or the number of workers"
            )
        shortfall = self.block_size - int(self._block_sizes[-1])
        min_rows = (n_blocks // n_streams) * self.block_size - shortfall
        n = min_rows // self.batch_size if self.drop_last else math.ceil(min_rows / self.batch_size)
        if n == 0:
            raise ConfigError(
                f"BlockShuffleLoader: a stream may get only {min_rows} rows, fewer than batch_size={self.batch_size} "
                f"({n_blocks} blocks of {self.block_size} rows dealt to {n_streams} streams, ranks x workers): lower "
                "data.block_size, data.batch_size or data.num_workers"
            )
        used = n * self.batch_size * n_streams / max(int(self._block_sizes.sum()), 1)
        if used < 0.9 and not getattr(self, "_warned_unused", False):
            self._warned_unused = True
            warnings.warn(
                f"BlockShuffleLoader: each epoch reads only {used:.0%} of the {int(self._block_sizes.sum())} cells "
                f"(every one of {n_streams} streams yields the same number of batches; blocks of {self.block_size} "
                "rows): lower data.block_size or data.num_workers to read more of them", SSLCellWarning, stacklevel=2)
        return n

    def __iter__(self) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        # a generator: epoch, skip and rank are read at the first batch, not when the iterator is made
        yield from self._iter_stream(*self._stream())

    def _stream_blocks(self, stream: int, n_streams: int) -> np.ndarray:
        n_blocks = len(self._block_sizes)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n_blocks)
        else:
            order = np.arange(n_blocks)
        return order[stream::n_streams]

    def _iter_stream(self, stream: int, n_streams: int, skip: int) -> Iterator:
        """Batches of one stream ``(rank, worker)``, starting at its batch ``skip``.

        The stream's rows are its blocks in order, shuffled within consecutive groups of
        ``buffer_blocks``; batch ``k`` is rows ``k*B:(k+1)*B`` of that sequence, so skipping is exact
        and needs no reads. A buffer is read into a reused workspace; batches are gathered from it.
        """
        blocks = self._stream_blocks(stream, n_streams)
        n_rows = min(self._batches_per_stream(n_streams) * self.batch_size, int(self._block_sizes[blocks].sum()))
        position = skip * self.batch_size  # first stream row still to emit
        workspace, carry, buffer_end = Workspace(), None, 0
        for b, first in enumerate(range(0, len(blocks), self.buffer_blocks)):
            members = blocks[first : first + self.buffer_blocks]
            buffer_start, buffer_end = buffer_end, buffer_end + int(self._block_sizes[members].sum())
            if buffer_end <= position:
                continue  # skipped without reading
            if buffer_start >= n_rows:
                break
            starts = self._block_starts[members]
            ranges = list(zip(starts.tolist(), (starts + self._block_sizes[members]).tolist(), strict=True))
            matrix = self.dataset.read_ranges(ranges, workspace)
            n = matrix.shape[0]
            if self.shuffle:  # matrix row of each position in this buffer's part of the stream
                local = np.random.default_rng([self.seed, self.epoch, stream, b]).permutation(n)
            else:
                local = np.arange(n)
            rows = np.concatenate([np.arange(a, z) for a, z in ranges])[local]  # dataset row of each matrix row
            lo = max(position, buffer_start) - buffer_start
            hi = max(min(n_rows, buffer_end) - buffer_start, lo)
            i = lo
            if carry is not None:  # a batch that straddles two buffers
                take = min(self.batch_size - len(carry[1]), hi - i)
                head = matrix[local[i : i + take]]
                carry = (vstack_csr([carry[0], head], matrix.shape[1]), np.r_[carry[1], rows[i : i + take]])
                i += take
                if len(carry[1]) == self.batch_size:
                    yield self._emit(*carry)
                    carry = None
            while i + self.batch_size <= hi:
                yield self._emit(matrix[local[i : i + self.batch_size]], rows[i : i + self.batch_size])
                i += self.batch_size
            if i < hi:
                carry = (matrix[local[i:hi]], rows[i:hi])  # a copy: the workspace is reused by the next buffer
            position = buffer_start + hi
            matrix = None  # let the workspace reuse (or regrow) its arrays without a second live copy
        if carry is not None:
            yield self._emit(*carry)  # a short last batch: only with drop_last=False

    def _emit(self, block: sp.csr_matrix, rows: np.ndarray):
        batch = _to_tensor(block, self.output)
        return (batch, torch.from_numpy(rows.astype(np.int64))) if self.return_index else batch


def make_dataloader(
    dataset: ExpressionDataset,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    pin_memory: bool = False,
    **loader_kwargs,
) -> DataLoader:
    """A ``DataLoader(batch_size=None)`` over a :class:`BlockShuffleLoader` (``loader_kwargs`` go to it).

    The loader is ``dataloader.dataset``: call its ``set_epoch`` / ``skip_batches``. Workers are not
    persistent, so each epoch's workers see the current epoch.
    """
    loader = BlockShuffleLoader(dataset, batch_size=batch_size, num_workers=num_workers, **loader_kwargs)
    return DataLoader(loader, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)
