"""ImageBatchLoader: coverage, determinism, ranks, dtype and pixels, exact resume, weights, memmap crops."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sslcell.data.image_loader import ImageBatchLoader, make_image_dataloader
from sslcell.data.images import CellImages, LazyImages
from sslcell.errors import ConfigError

N, C, H, W = 300, 4, 16, 16


def make_crops(n: int = N, dtype=np.uint16, seed: int = 0) -> np.ndarray:
    """Random crops ``(n, C, H, W)`` over the full range of ``dtype``; pixel (0, 0, 0) of cell ``i`` holds ``i``."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, np.iinfo(dtype).max + 1, size=(n, C, H, W)).astype(dtype)
    x[:, 0, 0, 0] = np.arange(n) % (np.iinfo(dtype).max + 1)
    return x


@pytest.fixture(scope="module")
def x16() -> np.ndarray:
    return make_crops()


@pytest.fixture(scope="module")
def cells16(x16) -> CellImages:
    return CellImages.from_array(x16)


def epoch(loader, e: int = 0) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    """Batches and their rows for epoch ``e`` of a loader built with ``return_index=True``."""
    target = loader.dataset if isinstance(loader, torch.utils.data.DataLoader) else loader
    target.set_epoch(e)
    batches, rows = [], []
    for batch, index in loader:
        batches.append(batch)
        rows.append(index.numpy())
    return batches, rows


def test_every_cell_once_per_epoch_with_its_pixels_and_dtype(cells16, x16):
    loader = ImageBatchLoader(cells16, batch_size=32, drop_last=False, return_index=True)
    batches, rows = epoch(loader)
    assert len(batches) == len(loader) == -(-N // 32)
    assert [len(r) for r in rows] == [32] * (N // 32) + [N % 32]
    np.testing.assert_array_equal(np.sort(np.concatenate(rows)), np.arange(N))
    assert not np.array_equal(np.concatenate(rows), np.arange(N))  # shuffled
    for batch, index in zip(batches, rows, strict=True):
        assert batch.dtype == torch.uint16 and batch.shape == (len(index), C, H, W)
        np.testing.assert_array_equal(batch.numpy(), x16[index])
    assert int(torch.cat(batches).to(torch.int32).max()) > 255  # uint16 values were not squeezed into 8 bits


def test_drop_last_and_uint8_stay_uint8():
    x8 = make_crops(dtype=np.uint8)
    loader = ImageBatchLoader(CellImages.from_array(x8), batch_size=32, return_index=True)
    batches, rows = epoch(loader)
    assert len(batches) == len(loader) == N // 32 and all(len(r) == 32 for r in rows)
    assert len(np.unique(np.concatenate(rows))) == 32 * len(rows)
    for batch, index in zip(batches, rows, strict=True):
        assert batch.dtype == torch.uint8
        np.testing.assert_array_equal(batch.numpy(), x8[index])


def test_order_depends_only_on_seed_and_epoch(cells16):
    def order(seed, e):
        return np.concatenate(epoch(ImageBatchLoader(cells16, batch_size=32, seed=seed, return_index=True), e)[1])

    np.testing.assert_array_equal(order(3, 2), order(3, 2))  # fresh loaders, same (seed, epoch)
    assert not np.array_equal(order(3, 2), order(3, 5))  # epochs differ
    assert not np.array_equal(order(3, 2), order(4, 2))  # seeds differ
    loader = ImageBatchLoader(cells16, batch_size=32, seed=3, return_index=True)
    first = np.concatenate(epoch(loader, 2)[1])
    epoch(loader, 7)
    np.testing.assert_array_equal(np.concatenate(epoch(loader, 2)[1]), first)  # no state carried between epochs


def test_no_shuffle_gives_stored_order(cells16, x16):
    loader = ImageBatchLoader(cells16, batch_size=32, shuffle=False, drop_last=False, return_index=True)
    batches, rows = epoch(loader)
    np.testing.assert_array_equal(np.concatenate(rows), np.arange(N))
    np.testing.assert_array_equal(torch.cat(batches).numpy(), x16)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_equal_batch_counts_and_disjoint_cells(cells16, x16, world_size):
    for e in (0, 1):
        seen, counts = [], []
        for rank in range(world_size):
            loader = ImageBatchLoader(cells16, batch_size=32, rank=rank, world_size=world_size, return_index=True)
            batches, rows = epoch(loader, e)
            assert len(rows) == len(loader) and all(len(r) == 32 for r in rows)
            for batch, index in zip(batches, rows, strict=True):
                np.testing.assert_array_equal(batch.numpy(), x16[index])
            counts.append(len(rows))
            seen.append(np.concatenate(rows))
        assert len(set(counts)) == 1 and counts[0] == (N // world_size) // 32
        everything = np.concatenate(seen)
        assert len(np.unique(everything)) == len(everything)  # no cell on two ranks


def test_ranks_and_workers_together_are_disjoint(cells16):
    """2 simulated ranks x 2 DataLoader workers: same batch count on each rank, no cell twice."""
    seen, counts = [], []
    for rank in (0, 1):
        loader = make_image_dataloader(cells16, batch_size=32, num_workers=2, rank=rank, world_size=2,
                                       return_index=True)
        _, rows = epoch(loader, 1)
        assert len(rows) == len(loader) == 2 * ((N // 4) // 32)
        counts.append(len(rows))
        seen.append(np.concatenate(rows))
    everything = np.concatenate(seen)
    assert counts[0] == counts[1] and len(np.unique(everything)) == len(everything)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_batches_yields_exactly_the_tail(cells16, num_workers):
    loader = make_image_dataloader(cells16, batch_size=32, num_workers=num_workers, return_index=True)
    full_batches, full_rows = epoch(loader, 3)
    assert len(full_rows) == len(loader) == (N // 32 if num_workers == 0 else 2 * ((N // 2) // 32))
    for skip in (0, 1, 4, len(full_rows) - 1, len(full_rows) + 2):
        loader.dataset.set_epoch(3)
        loader.dataset.skip_batches(skip)
        got = list(loader)
        assert len(got) == max(len(full_rows) - skip, 0), skip
        for (batch, index), ref_batch, ref_rows in zip(got, full_batches[skip:], full_rows[skip:], strict=True):
            np.testing.assert_array_equal(index.numpy(), ref_rows)
            assert torch.equal(batch, ref_batch)
    if num_workers == 0:
        loader.dataset.skip_batches(2)
        assert len(list(loader)) == len(full_rows) - 2
        assert len(list(loader)) == len(full_rows)  # a skip applies to one iteration only
    with pytest.raises(ConfigError, match="n must be >= 0"):
        loader.dataset.skip_batches(-1)


def _labels_90_10(n: int = N) -> np.ndarray:
    return (np.arange(n) % 10 == 0).astype(int)  # 10% class 1, 90% class 0


def test_zero_weight_class_never_drawn(cells16):
    labels = _labels_90_10()
    weights = (labels == 0).astype(float)  # class 1 weighted 0
    loader = ImageBatchLoader(cells16, batch_size=32, weights=weights, return_index=True)
    for e in range(3):
        rows = np.concatenate(epoch(loader, e)[1])
        assert len(rows) == (N // 32) * 32
        assert (labels[rows] == 0).all()


def test_balancing_weights_balance_an_imbalanced_set(cells16, x16):
    labels = _labels_90_10()
    weights = 1.0 / np.bincount(labels)[labels]
    loader = ImageBatchLoader(cells16, batch_size=32, drop_last=False, weights=weights, return_index=True)
    batches, rows = epoch(loader, 0)
    rows = np.concatenate(rows)
    assert len(rows) == N  # an epoch keeps N draws
    # expected minority share 0.5 (std ~0.029 for 300 draws); unweighted sampling would give ~0.1
    assert 0.38 < labels[rows].mean() < 0.62
    assert len(np.unique(rows[labels[rows] == 1])) < (labels[rows] == 1).sum()  # with replacement: repeats
    np.testing.assert_array_equal(torch.cat(batches).numpy(), x16[rows])  # repeated rows carry their pixels
    other = np.concatenate(epoch(loader, 1)[1])
    assert not np.array_equal(rows, other)
    # averaged over several epochs the share is tight around 0.5
    shares = [labels[np.concatenate(epoch(loader, e)[1])].mean() for e in range(2, 10)]
    assert abs(np.mean(shares) - 0.5) < 0.05


def test_bad_weights_are_refused(cells16):
    with pytest.raises(ConfigError, match=rf"\({N},\)"):
        ImageBatchLoader(cells16, weights=np.ones(N - 1))
    with pytest.raises(ConfigError, match="weights"):
        ImageBatchLoader(cells16, weights=-np.ones(N))
    with pytest.raises(ConfigError, match="sum to 0"):
        ImageBatchLoader(cells16, weights=np.zeros(N))


def test_too_few_cells_for_a_batch_names_the_numbers(cells16):
    with pytest.raises(ConfigError, match=rf"{N} cells.*fewer than batch_size=301"):
        len(ImageBatchLoader(cells16, batch_size=301))
    with pytest.raises(ConfigError, match=r"150 per stream.*batch_size=160"):
        next(iter(ImageBatchLoader(cells16, batch_size=160, rank=1, world_size=2)))
    with pytest.raises(ConfigError, match="batch_size"):
        ImageBatchLoader(cells16, batch_size=0)
    with pytest.raises(ConfigError, match="rank and world_size"):
        ImageBatchLoader(cells16, rank=2, world_size=2)


def test_worker_count_mismatch_is_refused(cells16, monkeypatch):
    import sslcell.data.loader as loader

    # as if iterated inside DataLoader worker 0 of 2 while built for none (the shared ShardedBatches check)
    monkeypatch.setattr(loader, "get_worker_info", lambda: SimpleNamespace(id=0, num_workers=2))
    with pytest.raises(ConfigError, match="num_workers=0 but runs with 2"):
        next(iter(ImageBatchLoader(cells16, batch_size=32)))


def test_memmapped_npz_crops(tmp_path, x16):
    path = tmp_path / "crops.npz"
    np.savez(path, images=x16, channel_names=np.array(["bf", "dna", "df", "actin"]))
    cells = CellImages.read(path)
    assert isinstance(cells.images, LazyImages) and isinstance(cells.images.source, np.memmap)  # not read into memory
    loader = make_image_dataloader(cells.select_channels([3, 1]), batch_size=32, num_workers=0, return_index=True)
    batches, rows = epoch(loader, 0)
    assert len(batches) == N // 32
    for batch, index in zip(batches, rows, strict=True):
        assert batch.dtype == torch.uint16 and batch.shape == (32, 2, H, W)
        np.testing.assert_array_equal(batch.numpy(), x16[index][:, [3, 1]])
