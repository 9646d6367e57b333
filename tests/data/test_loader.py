"""BlockShuffleLoader: coverage, determinism, sharding over ranks and workers, exact resume, outputs."""

from __future__ import annotations

from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import sslcell.data.loader as loader_module
from sslcell.data.expression import ExpressionDataset
from sslcell.data.loader import BlockShuffleLoader, make_dataloader
from sslcell.errors import ConfigError

N_OBS, N_GENES = 1000, 16


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    rng = np.random.default_rng(0)
    return ((rng.random((N_OBS, N_GENES)) < 0.3) * rng.integers(1, 20, (N_OBS, N_GENES))).astype(np.float32)


@pytest.fixture(scope="module")
def dataset(reference, tmp_path_factory) -> ExpressionDataset:
    path = tmp_path_factory.mktemp("loader") / "counts.h5ad"
    ad.AnnData(sp.csr_matrix(reference.astype(np.int32))).write_h5ad(path)
    return ExpressionDataset.open(path)


def epoch(loader, epoch: int = 0) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    """Batches and their row numbers for one epoch (``loader`` yields ``(batch, rows)``)."""
    target = loader.dataset if isinstance(loader, torch.utils.data.DataLoader) else loader
    target.set_epoch(epoch)
    batches, rows = [], []
    for batch, index in loader:
        batches.append(batch)
        rows.append(index.numpy())
    return batches, rows


def test_every_row_once_per_epoch_with_its_values(dataset, reference):
    loader = BlockShuffleLoader(
        dataset, batch_size=48, block_size=64, buffer_blocks=3, drop_last=False, return_index=True
    )
    batches, rows = epoch(loader)
    assert len(batches) == len(loader) == -(-N_OBS // 48)
    assert [len(r) for r in rows[:-1]] == [48] * (len(rows) - 1) and len(rows[-1]) == N_OBS % 48
    np.testing.assert_array_equal(np.sort(np.concatenate(rows)), np.arange(N_OBS))
    for batch, index in zip(batches, rows, strict=True):
        assert batch.dtype == torch.float32 and batch.shape == (len(index), N_GENES)
        np.testing.assert_array_equal(batch.numpy(), reference[index])
    assert not np.array_equal(np.concatenate(rows), np.arange(N_OBS))  # shuffled


def test_drop_last_yields_only_full_batches(dataset):
    loader = BlockShuffleLoader(dataset, batch_size=48, block_size=64, buffer_blocks=3, return_index=True)
    _, rows = epoch(loader)
    assert len(rows) == len(loader) == N_OBS // 48 and all(len(r) == 48 for r in rows)
    assert len(np.unique(np.concatenate(rows))) == 48 * len(rows)


def test_order_depends_only_on_seed_and_epoch(dataset):
    def order(seed, e):
        loader = BlockShuffleLoader(dataset, batch_size=32, block_size=50, buffer_blocks=4, seed=seed,
                                    return_index=True)
        return np.concatenate(epoch(loader, e)[1])

    np.testing.assert_array_equal(order(0, 3), order(0, 3))
    assert not np.array_equal(order(0, 3), order(0, 4))
    assert not np.array_equal(order(0, 3), order(1, 3))


def test_no_shuffle_gives_file_order(dataset, reference):
    loader = BlockShuffleLoader(dataset, batch_size=30, block_size=64, shuffle=False, drop_last=False,
                                return_index=True)
    batches, rows = epoch(loader)
    np.testing.assert_array_equal(np.concatenate(rows), np.arange(N_OBS))
    np.testing.assert_array_equal(torch.cat(batches).numpy(), reference)


def test_csr_and_dense_outputs_agree(dataset):
    kwargs = dict(batch_size=40, block_size=64, buffer_blocks=2, seed=7, return_index=True)
    dense, dense_rows = epoch(BlockShuffleLoader(dataset, output="dense", **kwargs))
    csr, csr_rows = epoch(BlockShuffleLoader(dataset, output="csr", **kwargs))
    assert len(csr) == len(dense)
    for a, b, ra, rb in zip(dense, csr, dense_rows, csr_rows, strict=True):
        assert b.layout == torch.sparse_csr and b.dtype == torch.float32
        np.testing.assert_array_equal(ra, rb)
        torch.testing.assert_close(b.to_dense(), a)


def test_ranks_and_workers_get_equal_batch_counts_and_disjoint_rows(dataset):
    """2 simulated ranks x 2 DataLoader workers: same number of batches everywhere, no row twice."""
    kwargs = dict(batch_size=25, block_size=60, buffer_blocks=2, num_workers=2, return_index=True)
    per_rank = []
    for e in (0, 1):
        seen = []
        for rank in (0, 1):
            loader = make_dataloader(dataset, rank=rank, world_size=2, **kwargs)
            _, rows = epoch(loader, e)
            assert len(rows) == len(loader) and all(len(r) == 25 for r in rows)
            per_rank.append(len(rows))
            seen.append(np.concatenate(rows))
        everything = np.concatenate(seen)
        assert len(np.unique(everything)) == len(everything)  # disjoint across ranks and workers
        assert len(everything) > N_OBS - 4 * 60  # at most about a block per stream is left out
    assert len(set(per_rank)) == 1


def test_stream_lengths_are_equal_for_every_permutation(dataset):
    loader = BlockShuffleLoader(dataset, batch_size=10, block_size=90, buffer_blocks=2, return_index=True)
    for e in range(6):
        loader.set_epoch(e)
        counts = [sum(1 for _ in loader._iter_stream(s, 3, 0)) for s in range(3)]
        assert counts == [loader._batches_per_stream(3)] * 3


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_batches_resumes_exactly(dataset, num_workers):
    loader = make_dataloader(dataset, batch_size=20, block_size=50, buffer_blocks=3, num_workers=num_workers,
                             return_index=True)
    full_batches, full_rows = epoch(loader, 2)
    for skip in (0, 7, 31, len(full_rows) - 1, len(full_rows) + 3):
        loader.dataset.set_epoch(2)
        loader.dataset.skip_batches(skip)
        batches, rows = [], []
        for batch, index in loader:
            batches.append(batch)
            rows.append(index.numpy())
        assert len(rows) == max(len(full_rows) - skip, 0)
        for a, b, ra, rb in zip(batches, full_batches[skip:], rows, full_rows[skip:], strict=True):
            np.testing.assert_array_equal(ra, rb)
            torch.testing.assert_close(a, b)


def test_skipped_buffers_are_not_read(dataset, monkeypatch):
    loader = BlockShuffleLoader(dataset, batch_size=20, block_size=50, buffer_blocks=2)
    reads = []
    original = dataset.read_ranges
    monkeypatch.setattr(dataset, "read_ranges", lambda ranges, ws=None: reads.append(ranges) or original(ranges, ws))
    list(loader)
    n_buffers = len(reads)
    reads.clear()
    loader.skip_batches(len(loader) - 1)  # the last batch lies in the last buffer
    assert len(list(loader)) == 1
    assert len(reads) == 1 and n_buffers == 10
    assert len(list(loader)) == len(loader)  # the skip applied to one iteration only


def test_sharded_and_aligned_dataset(tmp_path):
    """Blocks that span shard boundaries, with per-shard gene orders, arrive aligned and complete."""
    rng = np.random.default_rng(1)
    model = [f"g{j}" for j in range(12)]
    reference = []
    for k, n in enumerate([130, 45, 201]):
        genes = list(rng.permutation(model)[: 10 + k]) + [f"extra{k}"]
        x = (rng.random((n, len(genes))) < 0.4) * rng.integers(1, 9, (n, len(genes)))
        part = ad.AnnData(sp.csr_matrix(x.astype(np.float32)), var=pd.DataFrame(index=genes))
        part.write_h5ad(tmp_path / f"part{k}.h5ad")
        full = np.zeros((n, len(model)), np.float32)
        for j, g in enumerate(genes):
            if g in model:
                full[:, model.index(g)] = x[:, j]
        reference.append(full)
    reference = np.concatenate(reference)
    with pytest.warns(UserWarning, match="zero-filled"):
        ds = ExpressionDataset.open(tmp_path, genes=model)
    loader = BlockShuffleLoader(ds, batch_size=16, block_size=40, buffer_blocks=3, drop_last=False, return_index=True)
    batches, rows = epoch(loader, 1)
    np.testing.assert_array_equal(np.sort(np.concatenate(rows)), np.arange(len(reference)))
    np.testing.assert_array_equal(torch.cat(batches).numpy(), reference[np.concatenate(rows)])


def test_configuration_errors(dataset, monkeypatch):
    with pytest.raises(ConfigError, match="batch_size"):
        BlockShuffleLoader(dataset, batch_size=0)
    with pytest.raises(ConfigError, match="output"):
        BlockShuffleLoader(dataset, output="coo")
    with pytest.raises(ConfigError, match="cannot feed"):
        len(BlockShuffleLoader(dataset, block_size=600, rank=0, world_size=3))
    with pytest.raises(ConfigError, match="fewer than batch_size"):
        len(BlockShuffleLoader(dataset, batch_size=401, block_size=300, rank=0, world_size=2))
    # as if iterated inside DataLoader worker 0 of 2 while built for none
    monkeypatch.setattr(loader_module, "get_worker_info", lambda: SimpleNamespace(id=0, num_workers=2))
    with pytest.raises(ConfigError, match="num_workers=0 but runs with 2"):
        next(iter(BlockShuffleLoader(dataset)))


def test_an_epoch_that_leaves_many_cells_unread_warns_and_too_few_names_the_fields(dataset):
    """Streams yield equal batch counts: big blocks over several streams can leave a large share of cells out."""
    loader = BlockShuffleLoader(dataset, batch_size=20, block_size=300, buffer_blocks=1)  # 4 blocks, the last 100
    with pytest.warns(UserWarning, match=r"each epoch reads only 80% of the 1000 cells .*lower data.block_size"):
        loader._batches_per_stream(2)
    with pytest.raises(ConfigError, match="lower data.block_size, data.batch_size or data.num_workers"):
        BlockShuffleLoader(dataset, batch_size=N_OBS, block_size=50, buffer_blocks=1)._batches_per_stream(2)
