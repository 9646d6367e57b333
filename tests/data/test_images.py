"""CellImages and LazyImages: validation, selections, lazy on-disk views, channel stats, AnnData export."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sslcell.data.images import CellImages, LazyImages
from sslcell.errors import ChannelMismatchError, InputError
from tests.data.conftest import NAMES, make_images


# ------------------------------------------------------------------------------------------ from_array
def test_from_array_defaults_and_labels(x16):
    cells = CellImages.from_array(x16, labels=np.array(["a", "b", "a"] * 4))
    assert len(cells) == 12 and cells.shape == (12, 3, 8, 10) and cells.dtype == np.uint16
    assert cells.channel_names == ["channel_0", "channel_1", "channel_2"]
    assert list(cells.obs.index) == [str(i) for i in range(12)]
    assert isinstance(cells.obs["label"].dtype, pd.CategoricalDtype)
    assert list(cells.obs["label"].cat.categories) == ["a", "b"]
    np.testing.assert_array_equal(cells.batch(np.arange(12)), x16)


def test_float32_accepted():
    x = make_images(dtype=np.float32)
    cells = CellImages.from_array(x)
    assert cells.batch(np.array([3])).dtype == np.float32


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros((4, 8, 8), np.uint8), r"4-D \(N, C, H, W\); got shape \(4, 8, 8\)"),
        (np.zeros((2, 1, 4, 8, 8), np.uint8), r"got shape \(2, 1, 4, 8, 8\)"),
        (np.zeros((0, 2, 8, 8), np.uint8), r"no cells \(N = 0\)"),
        (np.zeros((3, 2, 8, 8), np.int32), "dtype int32 is not supported"),
        (np.zeros((3, 2, 8, 8), np.float64), "dtype float64 is not supported"),
        (np.zeros((3, 40, 40, 3), np.uint8), r"look channels-last \(N, H, W, C\) = 3 channels of 40 x 40 px"),
    ],
)
def test_from_array_rejects_bad_images(images, match):
    with pytest.raises(InputError, match=match):
        CellImages.from_array(images)


def test_nan_rejected():
    x = make_images(dtype=np.float32)
    x[5, 1, 2, 3] = np.nan
    with pytest.raises(InputError, match=r"NaN or inf in row\(s\) \[5\]"):
        CellImages.from_array(x)


def test_labels_obs_channel_names_lengths(x16):
    with pytest.raises(InputError, match="labels has 11 entries for 12 cells"):
        CellImages.from_array(x16, labels=np.zeros(11))
    with pytest.raises(InputError, match="obs has 13 rows for 12 cells"):
        CellImages.from_array(x16, obs=pd.DataFrame({"a": np.arange(13)}))
    with pytest.raises(InputError, match="2 channel_names .* for 3 channels"):
        CellImages.from_array(x16, channel_names=["a", "b"])
    with pytest.raises(InputError, match="unique"):
        CellImages.from_array(x16, channel_names=["a", "b", "a"])


def test_tensors_ragged_lists_and_2d_labels(x16):
    import torch

    cells = CellImages.from_array(torch.from_numpy(x16.astype(np.uint8)))
    assert cells.dtype == np.uint8 and cells.shape == (12, 3, 8, 10)
    with pytest.raises(InputError, match=r"images: cannot stack them .* same channels and size"):
        CellImages.from_array([np.zeros((1, 8, 8), np.uint8), np.zeros((1, 9, 9), np.uint8)])
    with pytest.raises(InputError, match=r"labels must be 1-D, one per cell \(N,\); got shape \(12, 2\)"):
        CellImages.from_array(x16, labels=np.zeros((12, 2)))


def test_a_labels_series_aligns_by_cell_id_as_obs_assignment_does(x16):
    obs = pd.DataFrame(index=[f"c{i}" for i in range(12)])
    by_id = pd.Series(["b"] * 6 + ["a"] * 6, index=[f"c{i}" for i in range(6, 12)] + [f"c{i}" for i in range(6)])
    cells = CellImages.from_array(x16, obs=obs, labels=by_id)
    assert list(cells.obs["label"]) == ["a"] * 6 + ["b"] * 6  # c0..c5 are "a" in the Series, wherever they sit
    positional = pd.Series(["a"] * 6 + ["b"] * 6)  # the default 0..N-1 index: in order
    assert list(CellImages.from_array(x16, obs=obs, labels=positional).obs["label"]) == ["a"] * 6 + ["b"] * 6
    with pytest.raises(InputError, match="neither the cell ids"):
        CellImages.from_array(x16, obs=obs, labels=pd.Series(["a"] * 12, index=[f"x{i}" for i in range(12)]))


# ------------------------------------------------------------------------------------------ selections
def test_select_channels_by_index_and_name(x16):
    cells = CellImages.from_array(x16, channel_names=NAMES)
    by_index = cells.select_channels([2, 0])
    by_name = cells.select_channels(["darkfield", "brightfield"])
    for sel in (by_index, by_name):
        assert sel.channel_names == ["darkfield", "brightfield"]
        np.testing.assert_array_equal(sel.batch(np.arange(12)), x16[:, [2, 0]])
    np.testing.assert_array_equal(cells.select_channels("fluorescence").batch(np.array([4])), x16[[4]][:, [1]])


def test_channel_selection_errors_list_available(x16):
    cells = CellImages.from_array(x16, channel_names=NAMES)
    with pytest.raises(ChannelMismatchError, match=r"unknown channel name 'DIC'.*0: 'brightfield', 1: 'fluorescence'"):
        cells.select_channels(["DIC"])
    with pytest.raises(ChannelMismatchError, match="channel index 3 out of range for 3 channels.*'darkfield'"):
        cells.select_channels([0, 3])
    with pytest.raises(ChannelMismatchError, match="more than once"):
        cells.select_channels([0, "brightfield"])
    with pytest.raises(ChannelMismatchError, match=r"channel index -1: negative indices are not accepted; give 0..2"):
        cells.select_channels([-1])


def test_getitem_subsets_keep_ids_and_obs(x16):
    obs = pd.DataFrame({"plate": np.arange(12) * 10}, index=[f"cell{i}" for i in range(12)])
    cells = CellImages.from_array(x16, obs=obs)
    for idx, rows in [(slice(2, 9, 3), [2, 5, 8]), (np.array([7, 1, 7]), [7, 1, 7]), (x16[:, 0, 0, 0] % 2 == 0, None),
                      (4, [4]), (np.array(["cell3", "cell0"]), [3, 0])]:
        rows = np.flatnonzero(idx) if rows is None else rows
        sub = cells[idx]
        np.testing.assert_array_equal(sub.batch(np.arange(len(sub))), x16[rows])
        assert list(sub.obs.index) == [f"cell{r}" for r in rows]
        np.testing.assert_array_equal(sub.obs["plate"], np.asarray(rows) * 10)
    with pytest.raises(IndexError):
        cells[np.array([12])]


def test_lazy_view_of_h5py_dataset_composes_selections(tmp_path, x16):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["x"] = x16
    with h5py.File(tmp_path / "x.h5", "r") as f:
        cells = CellImages.from_array(f["x"], channel_names=NAMES)
        sub = cells[np.array([9, 2, 2])].select_channels([2, 0])  # composed indices, nothing read yet
        assert isinstance(sub.images, LazyImages) and sub.shape == (3, 2, 8, 10)
        np.testing.assert_array_equal(sub.batch(np.arange(3)), x16[[9, 2, 2]][:, [2, 0]])
        np.testing.assert_array_equal(sub.images[1, 0], x16[2, 2])
    assert cells.source.endswith("x.h5:/x")  # errors name the file, not "array"
    with pytest.raises(InputError, match=r"x\.h5:/x: its HDF5 file was closed; keep it open"):  # not "damaged"
        cells.batch(np.arange(3))


# ------------------------------------------------------------------------------------------ stats, AnnData
def test_channel_stats_match_numpy(x16):
    cells = CellImages.from_array(x16, channel_names=NAMES)
    stats = cells.channel_stats(batch_size=5)  # several batches merged
    ref = x16.astype(np.float64)
    np.testing.assert_allclose(stats["mean"], ref.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(stats["std"], ref.std(axis=(0, 2, 3)), rtol=1e-12)
    assert stats["channel_names"] == NAMES and stats["n_cells"] == 12 and stats["dtype"] == "uint16"
    sub = cells.channel_stats(max_cells=5, seed=3)
    assert sub == cells.channel_stats(max_cells=5, seed=3) and sub["n_cells"] == 5
    rows = np.sort(np.random.default_rng(3).choice(12, 5, replace=False))
    np.testing.assert_allclose(sub["mean"], ref[rows].mean(axis=(0, 2, 3)), rtol=1e-12)


def test_to_anndata(tmp_path, x16):
    cells = CellImages.from_array(x16, channel_names=NAMES, labels=np.array(list("ab") * 6))
    adata = cells.to_anndata()
    assert adata.shape == (12, 0) and adata.X.dtype == np.float32
    assert list(adata.obs_names) == list(cells.obs.index) and list(adata.obs["label"]) == list("ab") * 6
    sample = adata.uns["sslcell_images"].pop("pixel_sample")
    assert adata.uns["sslcell_images"] == {
        "channel_names": NAMES, "shape": [12, 3, 8, 10], "dtype": "uint16", "source": "array"
    }
    assert sample["cells"] == ["0", "1", "3", "4", "6", "7", "9", "11"]  # 8 cells spread over the rows
    assert len(sample["digests"]) == 8 and {len(d) for d in sample["digests"]} == {3}
    x16[3, 1, 0, 0] += 1
    changed = cells.pixel_digests(["3"])[0]
    assert changed[1] != sample["digests"][2][1] and changed[::2] == sample["digests"][2][::2]
    adata.uns["sslcell_images"]["pixel_sample"] = sample
    adata.write_h5ad(tmp_path / "cells.h5ad")  # serialisable
    assert cells[np.zeros(12, dtype=bool)].to_anndata().n_obs == 0  # no cells: no sample
    assert "pixel_sample" not in cells[np.array([0, 0, 1])].to_anndata().uns["sslcell_images"]  # repeated ids


def test_cell_selection_by_masks_and_refusals(x16):
    cells = CellImages.from_array(x16, channel_names=NAMES)
    n = len(cells)
    mask = np.arange(n) % 2 == 0
    for same in (mask, pd.Series(mask), pd.array(mask, dtype="boolean")):  # numpy, pandas, nullable boolean
        np.testing.assert_array_equal(np.asarray(cells[same].images), x16[mask])
    with_na = pd.array([True] + [None] * (n - 1), dtype="boolean")
    with pytest.raises(InputError, match=r"mask holds missing values"):  # read as cell ids before
        cells[with_na]
    with pytest.raises(InputError, match="select channels with select_channels"):  # cells[0, 1]: rows 0 and 1 before
        cells[0, 1]
    with pytest.raises(InputError, match="boolean cell mask has shape"):
        cells[mask[:-1]]


def test_a_boolean_series_selects_by_its_index_as_in_pandas(x16):
    """A mask computed on a reordered table of the same cells was applied by position: other cells selected."""
    cells = CellImages.from_array(x16, channel_names=NAMES, obs=pd.DataFrame(index=[f"c{i}" for i in range(12)]))
    keep = pd.Series(np.arange(12) < 3, index=cells.obs.index)[::-1]  # c0..c2, listed last
    assert list(cells[keep].obs.index) == ["c0", "c1", "c2"]
    np.testing.assert_array_equal(np.asarray(cells[keep].images), x16[:3])
    np.testing.assert_array_equal(np.asarray(cells[keep.to_numpy()].images), x16[-3:])  # by position, as asked
    with pytest.raises(InputError, match=r"its index is not these 12 cells' ids.*mask.to_numpy\(\)"):
        cells[pd.Series(np.ones(12, dtype=bool), index=[f"d{i}" for i in range(12)])]
