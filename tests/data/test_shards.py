"""The reading layer under ExpressionDataset: HDF5 range reads, CSR stacking, scratch arrays."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from sslcell.data.shards import Workspace, _ArrayReader, vstack_csr


@pytest.mark.parametrize("chunks", [None, 7, 1000])
def test_raw_chunk_reader_matches_h5py(tmp_path, chunks):
    """The pread fast path returns what h5py returns, for contiguous and chunked layouts."""
    values = np.random.default_rng(0).integers(0, 1000, 5003).astype(np.int32)
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f.create_dataset("v", data=values, chunks=chunks)
        f.create_dataset("z", data=values, chunks=(64,), compression="gzip")
    with h5py.File(tmp_path / "v.h5", "r") as f:
        fast, filtered = _ArrayReader(f["v"], str(tmp_path / "v.h5")), _ArrayReader(f["z"], str(tmp_path / "v.h5"))
        assert fast.offsets is not None and filtered.offsets is None
        for a, b in [(0, 5003), (6, 7), (13, 2900), (4990, 5003), (5, 5)]:
            for reader in (fast, filtered):
                out = np.empty(b - a, np.int32)
                reader.read(a, b, out)
                np.testing.assert_array_equal(out, values[a:b])
        fast.close()


def test_vstack_csr_matches_scipy():
    blocks = [sp.random(n, 9, density=0.3, format="csr", random_state=n, dtype=np.float32) for n in (4, 0, 7)]
    stacked = vstack_csr(blocks, 9)
    assert stacked.shape == (11, 9) and stacked.indptr.dtype == np.int32
    np.testing.assert_array_equal(stacked.toarray(), sp.vstack(blocks).toarray())
    assert vstack_csr(blocks[:1], 9) is blocks[0]


def test_workspace_reuses_scratch_arrays():
    ws = Workspace()
    first = ws.get("data", 100, np.dtype(np.float32))
    again = ws.get("data", 80, np.dtype(np.float32))
    assert first.shape == (100,) and again.shape == (80,) and np.shares_memory(first, again)
    assert ws.get("data", 80, np.dtype(np.int64)).dtype == np.int64  # another dtype: a new array


@pytest.mark.parametrize("damage", ["indptr", "indices", "past_end", "chunk"])
def test_a_damaged_csr_file_is_refused_naming_file_and_rows(tmp_path, damage):
    """Decreasing row pointers, pointers past the stored values (an IndexError, or padding read as counts),
    out-of-range column indices, a damaged compressed chunk (HDF5's message without the file): a clear error
    naming the file, never another cell's counts."""
    import anndata as ad

    from sslcell.data.expression import ExpressionDataset
    from sslcell.errors import FileFormatError

    counts = sp.random(40, 12, density=0.5, format="csr", random_state=0, dtype=np.float32)
    counts.data = np.ceil(counts.data * 10)
    ad.AnnData(counts).write_h5ad(tmp_path / "d.h5ad")
    with h5py.File(tmp_path / "d.h5ad", "r+") as f:
        if damage == "indptr":
            pointers = f["X/indptr"][:]
            pointers[5] = pointers[6] + 3
            f["X/indptr"][...] = pointers
        elif damage == "past_end":
            pointers = f["X/indptr"][:]
            pointers[-1] += 5
            f["X/indptr"][...] = pointers
        elif damage == "indices":
            indices = f["X/indices"][:]
            indices[7] = 12  # one past the last gene
            f["X/indices"][...] = indices
        else:
            data = f["X/data"][:]
            del f["X/data"]
            f["X"].create_dataset("data", data=data, chunks=(16,), compression="gzip")
    if damage == "chunk":  # flip bytes inside the first compressed chunk
        with h5py.File(tmp_path / "d.h5ad", "r") as f:
            at = f["X/data"].id.get_chunk_info(0).byte_offset
        raw = bytearray((tmp_path / "d.h5ad").read_bytes())
        raw[at + 2 : at + 10] = b"\xff" * 8
        (tmp_path / "d.h5ad").write_bytes(bytes(raw))
    dataset = ExpressionDataset.open(tmp_path / "d.h5ad")
    expected = {"indptr": r"its row pointers decrease at row 5", "indices": r"column indices outside 0\.\.11",
                "past_end": r"row pointers for rows 0:40 run outside its \d+ stored values",
                "chunk": r"cannot read stored values"}[damage]
    with pytest.raises(FileFormatError, match=rf"d\.h5ad.*(damaged sparse matrix, )?{expected}"):
        dataset.read_rows(0, 40)
    dataset.close()
