"""ExpressionDataset: backed, in-memory and sharded reads, layers, gene alignment, input validation."""

from __future__ import annotations

import pickle

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sslcell.data.expression import ExpressionDataset
from sslcell.data.shards import Workspace
from sslcell.errors import FileFormatError, GeneMismatchError, InputError


def counts(n_obs: int, n_genes: int, seed: int = 0, density: float = 0.2) -> sp.csr_matrix:
    """``(n_obs, n_genes)`` int32 CSR of random counts 1..9."""
    rng = np.random.default_rng(seed)
    dense = (rng.random((n_obs, n_genes)) < density) * rng.integers(1, 10, (n_obs, n_genes))
    return sp.csr_matrix(dense.astype(np.int32))


def adata(matrix, genes=None, prefix: str = "c") -> ad.AnnData:
    n_obs, n_genes = matrix.shape
    genes = [f"g{j}" for j in range(n_genes)] if genes is None else list(genes)
    obs = pd.DataFrame({"label": np.arange(n_obs) % 3}, index=[f"{prefix}{i}" for i in range(n_obs)])
    return ad.AnnData(matrix, obs=obs, var=pd.DataFrame(index=genes))


def dense(dataset: ExpressionDataset, start: int = 0, stop: int | None = None) -> np.ndarray:
    block = dataset.read_rows(start, dataset.n_obs if stop is None else stop)
    assert block.dtype == np.float32 and block.shape == (block.shape[0], dataset.n_genes)
    return block.toarray()


def test_backed_file_equals_in_memory_and_reference(tmp_path):
    x = counts(300, 40)
    a = adata(x)
    a.write_h5ad(tmp_path / "a.h5ad")
    in_memory = ExpressionDataset.open(a)
    backed = ExpressionDataset.open(tmp_path / "a.h5ad")
    backed_object = ExpressionDataset.open(ad.read_h5ad(tmp_path / "a.h5ad", backed="r"))
    assert backed.sources == [str(tmp_path / "a.h5ad")] and in_memory.sources == ["<AnnData>"]
    for ds in (in_memory, backed, backed_object):
        assert ds.shape == (300, 40) and ds.alignment is None
        assert list(ds.genes) == list(a.var_names) and list(ds.obs.index) == list(a.obs_names)
        np.testing.assert_array_equal(ds.obs["label"], a.obs["label"])
        np.testing.assert_array_equal(dense(ds), x.toarray())
        np.testing.assert_array_equal(dense(ds, 17, 133), x[17:133].toarray())
        chunks = list(ds.iter_chunks(64))
        assert [(s, e) for s, e, _ in chunks] == [(s, min(s + 64, 300)) for s in range(0, 300, 64)]
        np.testing.assert_array_equal(sp.vstack([c for _, _, c in chunks]).toarray(), x.toarray())
    assert dense(backed, 5, 5).shape == (0, 40)
    with pytest.raises(IndexError, match="out of range"):
        backed.read_rows(0, 301)


def test_dense_and_csc_storage_and_layers(tmp_path):
    x = counts(50, 12, seed=1)
    a = adata(x.toarray().astype(np.float32))
    a.layers["counts"] = x.tocsc()
    a.layers["dense"] = x.toarray()
    a.write_h5ad(tmp_path / "d.h5ad")
    np.testing.assert_array_equal(dense(ExpressionDataset.open(tmp_path / "d.h5ad")), x.toarray())
    dense_layer = ExpressionDataset.open(tmp_path / "d.h5ad", layer="dense")
    np.testing.assert_array_equal(dense(dense_layer, 3, 30), x[3:30].toarray())
    with pytest.warns(UserWarning, match="CSC"):
        csc = ExpressionDataset.open(tmp_path / "d.h5ad", layer="counts")
    np.testing.assert_array_equal(dense(csc, 3, 30), x[3:30].toarray())
    np.testing.assert_array_equal(dense(ExpressionDataset.open(a, layer="counts")), x.toarray())
    np.testing.assert_array_equal(dense(ExpressionDataset.open(a), 5, 45), x[5:45].toarray())  # dense in memory


def test_boolean_values_are_read_as_zero_and_one_with_a_warning(tmp_path):
    """A binarised matrix is a valid input, but a boolean X made by mistake would be embedded without a word."""
    x = counts(30, 8, seed=2)
    a = adata(x.toarray() > 0)
    a.write_h5ad(tmp_path / "b.h5ad")
    for source, where in ((a, "<AnnData> \\(X\\)"), (tmp_path / "b.h5ad", "b.h5ad")):
        with pytest.warns(UserWarning, match=f"{where}.*: boolean values are read as counts of 0 and 1") as caught:
            dataset = ExpressionDataset.open(source)
        assert caught[0].filename == __file__  # the user's line, not sslcell's
        np.testing.assert_array_equal(dense(dataset), (x.toarray() > 0).astype(np.float32))


def test_missing_layer_is_reported(tmp_path):
    a = adata(counts(10, 5))
    a.layers["counts"] = a.X.copy()
    a.write_h5ad(tmp_path / "a.h5ad")
    for source in (a, tmp_path / "a.h5ad"):
        with pytest.raises(InputError, match=r"no layer 'raw'.*counts"):
            ExpressionDataset.open(source, layer="raw")


def test_shards_concatenate_and_align_per_shard(tmp_path):
    """Shards with different gene orders and sets read as the concatenated, aligned matrix."""
    model = [f"g{j}" for j in range(20)]
    rng = np.random.default_rng(3)
    parts, reference = [], []
    for k, n in enumerate([70, 5, 130]):
        genes = list(rng.permutation([f"g{j}" for j in range(24)])[: 15 + k])  # own order, subset, extras
        x = counts(n, len(genes), seed=k)
        a = adata(x, genes, prefix=f"s{k}_")
        a.write_h5ad(tmp_path / f"part{k}.h5ad")
        parts.append(a)
        frame = pd.DataFrame(x.toarray(), columns=genes)
        reference.append(frame.reindex(columns=model, fill_value=0).to_numpy())
    reference = np.concatenate(reference)
    with pytest.warns(UserWarning, match="zero-filled"):
        folder = ExpressionDataset.open(tmp_path, genes=model)
    listed = ExpressionDataset.open([tmp_path / f"part{k}.h5ad" for k in range(3)], genes=model)
    for ds in (folder, listed):
        assert ds.n_obs == 205 and list(ds.genes) == model
        np.testing.assert_array_equal(dense(ds), reference)
        np.testing.assert_array_equal(dense(ds, 60, 80), reference[60:80])  # spans three shards
        assert ds.read_rows(0, 205).has_sorted_indices
        ranges = [(150, 160), (3, 72), (72, 76)]
        stacked = ds.read_ranges(ranges, Workspace()).toarray()
        np.testing.assert_array_equal(stacked, np.concatenate([reference[a:b] for a, b in ranges]))
    obs = folder.obs
    assert len(obs) == 205 and obs.index[70] == "s1_0"
    assert list(obs["shard"].cat.categories) == folder.sources
    assert (obs["shard"].astype(str).to_numpy()[:70] == str(tmp_path / "part0.h5ad")).all()
    # a model gene counts as present only if every shard has it
    present_everywhere = set.intersection(*(set(p.var_names) for p in parts)) & set(model)
    assert folder.alignment.n_present == len(present_everywhere)
    assert folder.alignment.n_present + folder.alignment.n_missing == 20


def test_shards_without_gene_list_must_share_genes_in_any_order(tmp_path):
    a, b = counts(10, 5), counts(10, 5)
    adata(a, [f"g{j}" for j in range(5)]).write_h5ad(tmp_path / "a.h5ad")
    adata(b, [f"g{j}" for j in reversed(range(5))]).write_h5ad(tmp_path / "b.h5ad")
    ds = ExpressionDataset.open(tmp_path)  # the same genes, another order: aligned to the first shard by name
    assert list(ds.genes) == [f"g{j}" for j in range(5)] and ds.n_obs == 20
    np.testing.assert_array_equal(dense(ds)[10:], b.toarray()[:, ::-1])
    adata(counts(10, 6), [f"g{j}" for j in range(6)]).write_h5ad(tmp_path / "c.h5ad")  # one gene more
    with pytest.raises(GeneMismatchError, match=r"different genes \(1 in only one of them, e.g. \['g5'\]\)"):
        ExpressionDataset.open(tmp_path)
    ds = ExpressionDataset.open(tmp_path, genes=[f"g{j}" for j in range(5)])
    assert ds.alignment.n_missing == 0 and ds.n_obs == 30


def test_with_genes_realigns_same_sources(tmp_path):
    x = counts(40, 10)
    adata(x).write_h5ad(tmp_path / "a.h5ad")
    ds = ExpressionDataset.open(tmp_path / "a.h5ad")
    sub = ds.with_genes(["g7", "g2", "g9"])
    assert sub.sources == ds.sources and sub.alignment.n_missing == 0 and sub.alignment.n_unused == 7
    np.testing.assert_array_equal(dense(sub), x[:, [7, 2, 9]].toarray())


def test_gene_overlap_errors_and_report(tmp_path):
    a = adata(counts(20, 6))
    with pytest.raises(GeneMismatchError, match="none of its 6 genes"):
        ExpressionDataset.open(a, genes=["x", "y"])
    with pytest.warns(UserWarning, match="2/4 model genes present"):
        ds = ExpressionDataset.open(a, genes=["g1", "zz", "g0", "yy"])
    report = ds.alignment
    assert (report.n_model_genes, report.n_present, report.n_missing, report.examples) == (4, 2, 2, ["zz", "yy"])
    with pytest.raises(InputError, match="duplicate gene names.*'g1'"):
        ExpressionDataset.open(a, genes=["g1", "g2", "g1"])


def test_value_errors_name_file_and_rows(tmp_path):
    x = counts(100, 8, seed=2).astype(np.float32).toarray()
    cases = {
        "nan": (np.nan, r"NaN or inf values in .*nan\.h5ad \(X\), rows 64:100 \(first at row 70"),
        "inf": (np.inf, r"NaN or inf values in .*inf\.h5ad \(X\), rows 64:100"),
        "negative": (-2.0, r"negative values in .*negative\.h5ad \(X\), rows 64:100"),
        "fraction": (0.5, r"non-integer values in .*fraction\.h5ad .*counts_are_log_normalized=True"),
    }
    for name, (value, message) in cases.items():
        bad = x.copy()
        bad[70, 3] = value
        adata(sp.csr_matrix(bad)).write_h5ad(tmp_path / f"{name}.h5ad")
        ds = ExpressionDataset.open(tmp_path / f"{name}.h5ad")
        ds.read_rows(0, 64)  # rows before the bad one read fine
        with pytest.raises(InputError, match=message):
            ds.read_rows(64, 100)
        with pytest.raises(InputError):
            list(ds.iter_chunks(64))
    in_memory = adata(sp.csr_matrix(np.where(x > 0, -x, 0)).astype(np.int32))
    with pytest.raises(InputError, match=r"negative values in <AnnData> \(X\)"):
        ExpressionDataset.open(in_memory).read_rows(0, 100)
    huge = x.astype(np.float64)
    huge[70, 3] = 1e39  # finite in float64, inf once cast to the model's float32
    with pytest.raises(InputError, match=r"beyond float32's range .*rows 64:100 \(first at row 70, value .*1e\+39"):
        ExpressionDataset.open(adata(sp.csr_matrix(huge))).read_rows(64, 100)


def test_log_normalized_data_allows_fractions_only_when_declared(tmp_path):
    logged = np.log1p(counts(30, 6, seed=4).toarray().astype(np.float32))
    a = adata(sp.csr_matrix(logged))
    with pytest.raises(InputError, match="non-integer"):
        ExpressionDataset.open(a).read_rows(0, 30)
    ds = ExpressionDataset.open(a, counts_are_log_normalized=True)
    np.testing.assert_allclose(dense(ds), logged)
    raw = counts(30, 6, seed=4)  # raw counts declared log-normalised would pass as log1p values 0..log1p(max)
    for x in (raw, raw.astype(np.float32)):
        with pytest.raises(InputError, match=r"whole numbers only in <AnnData> \(X\), rows 0:30 .*look like raw "
                                             r"counts.*counts_are_log_normalized=False"):
            ExpressionDataset.open(adata(x), counts_are_log_normalized=True).read_rows(0, 30)
    ones = ExpressionDataset.open(adata(sp.csr_matrix((raw > 0).astype(np.float32))), counts_are_log_normalized=True)
    assert dense(ones).max() == 1.0  # 0/1 values stay readable (binarised data)
    a.X.data[5] = -0.1
    with pytest.raises(InputError, match="negative values"):
        ExpressionDataset.open(a, counts_are_log_normalized=True).read_rows(0, 30)
    a.X.data[5] = np.nan
    with pytest.raises(InputError, match="NaN"):
        ExpressionDataset.open(a, counts_are_log_normalized=True).read_rows(0, 30)


def test_structural_errors(tmp_path):
    with pytest.raises(InputError, match="empty AnnData"):
        ExpressionDataset.open(adata(sp.csr_matrix((0, 5), dtype=np.float32)))
    with pytest.raises(InputError, match="empty AnnData"):
        ExpressionDataset.open(ad.AnnData(np.zeros((4, 0), dtype=np.float32)))
    adata(sp.csr_matrix((0, 5), dtype=np.float32)).write_h5ad(tmp_path / "empty.h5ad")
    with pytest.raises(InputError, match=r"empty\.h5ad.*empty AnnData \(0 cells x 5 genes\)"):
        ExpressionDataset.open(tmp_path / "empty.h5ad")
    duplicated = adata(counts(5, 4), ["a", "b", "a", "c"])
    with pytest.raises(InputError, match=r"duplicate gene names, e\.g\. \['a'\]"):
        ExpressionDataset.open(duplicated)
    (tmp_path / "notes.h5ad").write_text("not an hdf5 file")
    with pytest.raises(FileFormatError, match=r"notes\.h5ad: not an AnnData"):
        ExpressionDataset.open(tmp_path / "notes.h5ad")
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["values"] = np.arange(3)
    with pytest.raises(FileFormatError, match=r"plain\.h5: not an AnnData .*'obs'"):
        ExpressionDataset.open(tmp_path / "plain.h5")
    with pytest.raises(FileNotFoundError, match="missing.h5ad"):
        ExpressionDataset.open(tmp_path / "missing.h5ad")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(InputError, match="no .h5ad files"):
        ExpressionDataset.open(tmp_path / "empty_dir")


def test_dataset_pickles_without_open_handles(tmp_path):
    x = counts(30, 5)
    adata(x).write_h5ad(tmp_path / "a.h5ad")
    ds = ExpressionDataset.open(tmp_path / "a.h5ad")
    ds.read_rows(0, 5)  # opens the file in this process
    copy = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(dense(copy), x.toarray())


def test_a_folder_inside_a_list_of_shards_is_named(tmp_path):
    (tmp_path / "shards").mkdir()
    adata(counts(10, 5)).write_h5ad(tmp_path / "shards" / "a.h5ad")
    with pytest.raises(InputError, match=r"shards: a folder inside a list of \.h5ad files"):
        ExpressionDataset.open([tmp_path / "shards"])
    assert ExpressionDataset.open(tmp_path / "shards").n_obs == 10


def test_read_h5ad_names_the_file_it_cannot_read(tmp_path):
    from sslcell.data.expression import read_h5ad
    from sslcell.errors import FileFormatError

    np.savez(tmp_path / "crops.npz", images=np.zeros((2, 1, 4, 4), np.uint8))
    with pytest.raises(FileFormatError, match=r"crops.npz: cannot be read as an .h5ad file"):
        read_h5ad(tmp_path / "crops.npz")
    with pytest.raises(FileFormatError, match=r": a folder, not an .h5ad file"):
        read_h5ad(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"none.h5ad: no such .h5ad file"):
        read_h5ad(tmp_path / "none.h5ad")
    ad.AnnData(np.ones((3, 2), np.float32)).write_h5ad(tmp_path / "ok.h5ad")
    (tmp_path / "cut.h5ad").write_bytes((tmp_path / "ok.h5ad").read_bytes()[:600])  # a truncated copy
    with pytest.raises(FileFormatError, match=r"cut.h5ad: cannot be read"):
        read_h5ad(tmp_path / "cut.h5ad")
    assert read_h5ad(tmp_path / "ok.h5ad").shape == (3, 2)
