"""Crops from fields of view: centring, border padding, obs, and label-free segmentation of planted cells."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk

from sslcell.data.crops import crops_from_fields, extract_crops, segment_cells
from sslcell.errors import InputError

CELLS = [(20, 30), (60, 100), (95, 40), (30, 150), (4, 5), (115, 155)]  # last two sit at the borders
RADIUS = 5  # disc area 81 px
DEBRIS = (70, 20)  # 2x2 speck: area 4 < min_area
BLOB = (80, 150)  # radius 14 disc: area ~ 600 > max_area
SEGMENT = dict(min_area=30, max_area=300, smooth_sigma=1.0)


def make_field(seed=0, shape=(120, 160), cells=CELLS):
    """(2, H, W) uint16: channel 0 bright discs (+ debris, blob) on noise; channel 1 encodes the cell number."""
    rng = np.random.default_rng(seed)
    fov = rng.normal(300, 10, size=(2, *shape)).clip(0).astype(np.uint16)
    for k, centre in enumerate(cells):
        rr, cc = disk(centre, RADIUS, shape=shape)
        fov[0, rr, cc] = 4000 + rng.integers(0, 50, rr.size)
        fov[1, rr, cc] = 1000 * (k + 1)
    fov[0, DEBRIS[0] : DEBRIS[0] + 2, DEBRIS[1] : DEBRIS[1] + 2] = 4000
    rr, cc = disk(BLOB, 14, shape=shape)
    fov[0, rr, cc] = 4000
    return fov


def reference_crop(fov, centre, size):
    """Hand-written crop with zero padding: pixel (size // 2, size // 2) is ``centre``."""
    out = np.zeros((fov.shape[0], size, size), fov.dtype)
    for i in range(size):
        for j in range(size):
            r, c = centre[0] - size // 2 + i, centre[1] - size // 2 + j
            if 0 <= r < fov.shape[1] and 0 <= c < fov.shape[2]:
                out[:, i, j] = fov[:, r, c]
    return out


def planted_masks(shape=(120, 160), cells=CELLS):
    masks = np.zeros(shape, np.int32)
    for k, centre in enumerate(cells):
        masks[disk(centre, RADIUS, shape=shape)] = 10 * (k + 1)  # non-consecutive label ids
    return masks


# ------------------------------------------------------------------------------------------ segmentation
def test_segmentation_recovers_planted_cells_and_drops_debris_and_blob():
    fov = make_field()
    labels = segment_cells(fov, channel=0, **SEGMENT)
    assert labels.dtype == np.int32 and labels.shape == fov.shape[1:]
    assert labels.max() == len(CELLS)  # exactly the planted cells, numbered 1..K
    found = {labels[c] for c in CELLS}
    assert 0 not in found and len(found) == len(CELLS)  # each planted cell is its own object
    assert labels[DEBRIS] == 0 and labels[BLOB] == 0
    for centre in CELLS:
        rows, cols = np.nonzero(labels == labels[centre])
        assert abs(rows.mean() - centre[0]) < 0.5 and abs(cols.mean() - centre[1]) < 0.5
        truth = np.zeros(labels.shape, bool)
        truth[disk(centre, RADIUS, shape=labels.shape)] = True
        iou = (truth & (labels == labels[centre])).sum() / (truth | (labels == labels[centre])).sum()
        assert iou > 0.8


def test_segmentation_without_size_filter_keeps_blob_and_debris_needs_min_area():
    fov = make_field()
    assert segment_cells(fov, min_area=30).max() == len(CELLS) + 1  # the blob, no max_area
    assert segment_cells(fov, min_area=1, smooth_sigma=0).max() == len(CELLS) + 2  # the debris too


def test_segmentation_inverted_and_fixed_threshold():
    fov = make_field()
    dark = (5000 - fov[0].astype(np.int32)).astype(np.uint16)  # dark cells on a bright background
    bright = segment_cells(fov, threshold=2000.0, **SEGMENT)
    assert bright.max() == len(CELLS)
    np.testing.assert_array_equal(segment_cells(dark, invert=True, threshold=3000.0, **SEGMENT), bright)
    assert segment_cells(dark, invert=True, **SEGMENT).max() == len(CELLS)  # Otsu on the inverted image
    assert segment_cells(fov, threshold=10_000.0, **SEGMENT).max() == 0
    with pytest.raises(InputError, match="threshold 'median'"):
        segment_cells(fov, threshold="median")
    with pytest.raises(InputError, match="channel 2 out of range"):
        segment_cells(fov, channel=2)


# ------------------------------------------------------------------------------------------ crops
@pytest.mark.parametrize("size", [24, 25])
def test_crops_centred_padded_and_obs(size):
    fov = make_field()
    masks = planted_masks()
    cells = extract_crops(fov, masks=masks, size=size, channel_names=["bf", "id"], fov_id="plate1_f3")
    assert cells.shape == (len(CELLS), 2, size, size) and cells.dtype == np.uint16
    crops = cells.batch(np.arange(len(cells)))
    half = size // 2
    for k, centre in enumerate(CELLS):
        np.testing.assert_array_equal(crops[k], reference_crop(fov, centre, size))
        # the planted disc (channel 1 == its number) is centred in the crop
        rows, cols = np.nonzero(crops[k, 1] == 1000 * (k + 1))
        assert (rows.mean(), cols.mean()) == (half, half)
    corner = crops[CELLS.index((4, 5))]
    assert (corner[:, : half - 4] == 0).all() and (corner[:, :, : half - 5] == 0).all()  # zero padding
    obs = cells.obs
    assert list(obs.index) == [f"plate1_f3_{10 * (k + 1)}" for k in range(len(CELLS))]
    assert (obs["fov_id"] == "plate1_f3").all()
    np.testing.assert_array_equal(obs["label_id"], 10 * np.arange(1, len(CELLS) + 1))
    np.testing.assert_allclose(obs[["centroid_row", "centroid_col"]], np.array(CELLS, float), atol=1e-9)
    np.testing.assert_array_equal(obs["area"], [(masks == 10 * (k + 1)).sum() for k in range(len(CELLS))])


def test_reflect_padding_and_centroids():
    fov = make_field()
    centroids = np.array([[4.2, 5.4], [119.0, 0.0], [60.49, 99.5]])
    cells = extract_crops(fov, centroids=centroids, size=16, pad_mode="reflect")
    padded = np.pad(fov, ((0, 0), (8, 8), (8, 8)), mode="reflect")
    for k, (r, c) in enumerate([(4, 5), (119, 0), (60, 100)]):  # rounding half up
        np.testing.assert_array_equal(cells.batch(np.array([k]))[0], padded[:, r : r + 16, c : c + 16])
    assert list(cells.obs.index) == ["0_0", "0_1", "0_2"] and "label_id" not in cells.obs
    np.testing.assert_array_equal(cells.obs["centroid_row"], centroids[:, 0])


def test_single_channel_field_and_errors():
    fov = make_field()[0]
    cells = extract_crops(fov, centroids=[[60, 100]], size=8)
    assert cells.shape == (1, 1, 8, 8)
    np.testing.assert_array_equal(cells.batch(np.array([0]))[0, 0], fov[56:64, 96:104])
    with pytest.raises(InputError, match=r"centroid 1 \(120.0, 3.0\) lies outside the 120x160 field"):
        extract_crops(fov, centroids=[[3, 3], [120, 3]])
    with pytest.raises(InputError, match="exactly one of masks"):
        extract_crops(fov, masks=planted_masks(), centroids=[[3, 3]])
    with pytest.raises(InputError, match=r"masks has shape \(10, 10\)"):
        extract_crops(fov, masks=np.zeros((10, 10), np.int32))
    with pytest.raises(InputError, match="no cells"):
        extract_crops(fov, masks=np.zeros(fov.shape, np.int32))
    with pytest.raises(InputError, match="integer label image"):
        extract_crops(fov, masks=planted_masks() > 0)
    with pytest.raises(InputError, match="pad_mode 'wrap'"):
        extract_crops(fov, centroids=[[3, 3]], pad_mode="wrap")


def test_a_channels_last_field_is_refused_with_the_fix():
    """An RGB field (H, W, 3), as image readers return it: 'no cells found', or crops of 120 'channels'."""
    hwc = np.moveaxis(make_field(), 0, -1)
    for call in (lambda: crops_from_fields([hwc], size=16, **SEGMENT), lambda: extract_crops(hwc, centroids=[[60, 2]]),
                 lambda: extract_crops(hwc, masks=planted_masks())):
        with pytest.raises(InputError, match=r"channels-last \(H, W, C\) = 2 channels.*np.moveaxis\(fov, -1, 0\)"):
            call()
    assert len(crops_from_fields([np.moveaxis(hwc, -1, 0)], size=16, **SEGMENT)) == len(CELLS)


def test_crops_from_fields_segments_each_field():
    second = [(30, 40), (90, 120)]
    fovs = [make_field(seed=0), make_field(seed=1, cells=second)]
    cells = crops_from_fields(fovs, size=20, **SEGMENT)
    assert len(cells) == len(CELLS) + len(second) and cells.obs.index.is_unique
    np.testing.assert_array_equal(cells.obs["fov_id"], [0] * len(CELLS) + [1] * len(second))
    centres = np.floor(cells.obs[["centroid_row", "centroid_col"]].to_numpy() + 0.5).astype(int)
    assert sorted(map(tuple, centres[: len(CELLS)])) == sorted(CELLS)
    assert sorted(map(tuple, centres[len(CELLS) :])) == sorted(second)
    crops = cells.batch(np.arange(len(cells)))
    for crop, fov_id, centre in zip(crops, cells.obs["fov_id"], centres, strict=True):
        np.testing.assert_array_equal(crop, reference_crop(fovs[fov_id], tuple(centre), 20))

    given = crops_from_fields(fovs[:1], masks=[planted_masks()], size=20, fov_ids=["A"])
    assert list(given.obs.index) == [f"A_{10 * (k + 1)}" for k in range(len(CELLS))]
    with pytest.raises(InputError, match="field 1 has 1 channels"):
        crops_from_fields([fovs[0], fovs[1][0]], **SEGMENT)
    with pytest.raises(InputError, match="given together with masks"):
        crops_from_fields(fovs[:1], masks=[planted_masks()], min_area=3)
