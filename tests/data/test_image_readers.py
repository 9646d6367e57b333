"""CellImages.read and its readers: npz (memory-mapped), zarr, TIFF and PNG folders, a real data set."""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sslcell.data.images import CellImages, LazyImages
from sslcell.errors import FileFormatError, InputError
from tests.data.conftest import NAMES, make_images

JURKAT = Path(__file__).parents[2] / ".." / "shared" / "data" / "jurkat_cellcycle_ifc_mlcp.npz"


# ------------------------------------------------------------------------------------------ npz
def save_npz(path, x, compressed=False, **extra):
    (np.savez_compressed if compressed else np.savez)(path, images=x, **extra)
    return path


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_round_trip(tmp_path, x16, compressed):
    labels = np.array([0, 1, 2, 1] * 3)
    path = save_npz(
        tmp_path / "cells.npz", x16, compressed, labels=labels, label_names=np.array(["G1", "S", "G2M"]),
        channel_names=np.array(NAMES), image_id=np.arange(12) // 4, center_xy=np.arange(24).reshape(12, 2),
        description=np.array("scalar metadata"),
    )
    cells = CellImages.read(path)
    assert isinstance(cells.images, LazyImages) != compressed  # uncompressed members are memory-mapped
    assert cells.dtype == np.uint16 and cells.channel_names == NAMES
    np.testing.assert_array_equal(cells.batch(np.arange(12)), x16)  # uint16 preserved exactly
    assert list(cells.obs["label"].cat.categories) == ["G1", "S", "G2M"]
    np.testing.assert_array_equal(cells.obs["label"].cat.codes, labels)
    np.testing.assert_array_equal(cells.obs["image_id"], np.arange(12) // 4)
    np.testing.assert_array_equal(cells.obs[["center_xy_0", "center_xy_1"]], np.arange(24).reshape(12, 2))
    assert cells.source == str(path)


def test_npz_memmap_identical_and_lazy_selection(tmp_path, x16):
    for order, x in [("C", x16), ("F", np.asfortranarray(x16))]:
        path = save_npz(tmp_path / f"{order}.npz", x, channel_names=np.array(NAMES))
        cells = CellImages.read(path, channels=["darkfield", "brightfield"])
        assert isinstance(cells.images, LazyImages) and isinstance(cells.images.source, np.memmap)
        assert cells.images.source.flags.f_contiguous == (order == "F")
        np.testing.assert_array_equal(np.asarray(cells.images), np.load(path)["images"][:, [2, 0]])
        sub = cells[np.array([9, 2, 2])]  # still lazy, composed indices
        assert isinstance(sub.images, LazyImages)
        np.testing.assert_array_equal(sub.batch(np.array([2, 0])), x16[[2, 9]][:, [2, 0]])
        # a pickled view carries the mapping (for loader workers), not the pixels
        blob = pickle.dumps(sub.images)
        assert len(blob) < x16.nbytes
        np.testing.assert_array_equal(np.asarray(pickle.loads(blob)), x16[[9, 2, 2]][:, [2, 0]])


def test_npz_label_key_and_bad_codes(tmp_path, x16):
    path = save_npz(tmp_path / "a.npz", x16, phase=np.array(["G1", "S"] * 6), labels=np.arange(12))
    cells = CellImages.read(path, label_key="phase")
    assert list(cells.obs["label"]) == ["G1", "S"] * 6 and "labels" in cells.obs
    with pytest.raises(InputError, match=r"label_key 'cycle' not found; per-cell arrays: \['labels', 'phase'\]"):
        CellImages.read(path, label_key="cycle")
    bad = save_npz(tmp_path / "b.npz", x16, labels=np.full(12, 3), label_names=np.array(["a", "b"]))
    with pytest.raises(InputError, match=r"label code 3 .* outside 0..1"):
        CellImages.read(bad)
    short = save_npz(tmp_path / "c.npz", x16, labels=np.zeros(11, int))
    with pytest.raises(InputError, match=r"labels 'labels' has shape \(11,\) for 12 cells"):
        CellImages.read(short)
    wrong_names = save_npz(tmp_path / "d.npz", x16, channel_names=np.array(["a", "b"]))
    with pytest.raises(InputError, match="2 channel_names"):
        CellImages.read(wrong_names)


def test_code_minus_one_is_unlabelled_with_or_without_label_names(tmp_path, x16):
    """Without label_names, -1 became a class '-1' that a classifier then learned as a cell type."""
    codes = np.array([0, 1, -1, 2] * 3)
    named = CellImages.read(save_npz(tmp_path / "n.npz", x16, labels=codes, label_names=np.array(["a", "b", "c"])))
    plain = CellImages.read(save_npz(tmp_path / "p.npz", x16, labels=codes))
    assert list(plain.obs["label"].cat.categories) == [0, 1, 2]
    np.testing.assert_array_equal(plain.obs["label"].isna(), codes == -1)
    np.testing.assert_array_equal(plain.obs["label"].isna(), named.obs["label"].isna())


def test_object_arrays_are_never_unpickled_and_named(tmp_path, x16):
    labels = np.array(["G1", "S", None] * 4, dtype=object)
    with pytest.raises(FileFormatError, match=r"o\.npz: the array 'labels' is an object \(pickled\) array, "
                                              r"which sslcell does not load: save it as a string array, e\.g\. "
                                              r"np\.savez\(\.\.\., labels=values\.astype\(str\)\)"):
        CellImages.read(save_npz(tmp_path / "o.npz", x16, labels=labels))
    names = save_npz(tmp_path / "n.npz", x16, labels=np.arange(12) % 2, label_names=np.array(["a", "b"], object))
    with pytest.raises(FileFormatError, match=r"the array 'label_names' is an object"):  # was skipped: codes as classes
        CellImages.read(names)
    path = save_npz(tmp_path / "m.npz", x16, note=labels, phase=np.array(["G1", "S"] * 6))
    with pytest.warns(UserWarning, match=r"array 'note' is an object \(pickled\) array, not loaded; skipped"):
        cells = CellImages.read(path, label_key="phase")
    assert "note" not in cells.obs and list(cells.obs["label"][:2]) == ["G1", "S"]


def test_npz_corrupt_files_name_the_path(tmp_path, x16):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file at all" * 10)
    with pytest.raises(FileFormatError, match="garbage.npz"):
        CellImages.read(garbage)
    good = save_npz(tmp_path / "good.npz", x16)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(FileFormatError, match="truncated.npz"):
        CellImages.read(truncated)
    no_images = tmp_path / "noimages.npz"
    np.savez(no_images, pixels=x16)
    with pytest.raises(FileFormatError, match=r"noimages.npz: no 'images' array.*\['pixels'\]"):
        CellImages.read(no_images)
    with zipfile.ZipFile(tmp_path / "badmember.npz", "w") as zf:
        zf.writestr("images.npy", b"\x93NUMPY garbage header")
    with pytest.raises(FileFormatError, match="badmember.npz"):
        CellImages.read(tmp_path / "badmember.npz")
    with pytest.raises(FileNotFoundError):
        CellImages.read(tmp_path / "missing.npz")


@pytest.mark.parametrize(("arrays", "message"), [
    ({"images": np.zeros((4, 8, 8), np.uint8)}, "images must be 4-D"),
    ({"images": np.zeros((4, 2, 8, 8), np.int64)}, "images dtype int64 is not supported"),
    ({"images": np.zeros((4, 2, 8, 8), ">u2")}, r"images are uint16 stored big-endian \(>u2\)"),
    ({"images": np.zeros((4, 2, 8, 8), np.uint8), "channel_names": np.array(["a", "b", "c"])}, "3 channel_names"),
])
def test_a_bad_array_in_a_file_names_the_file(tmp_path, arrays, message):
    np.savez(tmp_path / "crops.npz", **arrays)
    with pytest.raises(InputError, match=rf"crops\.npz: {message}"):
        CellImages.read(tmp_path / "crops.npz")


def test_damaged_bytes_inside_a_memmapped_npz_are_refused(tmp_path, x16):
    """Loading checks the zip's CRC-32; a memory map does not, so a changed byte would read as pixels."""
    good = save_npz(tmp_path / "good.npz", x16)
    assert CellImages.read(good).batch(np.arange(12)).tobytes() == x16.tobytes()
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the images member's pixels
    (tmp_path / "flipped.npz").write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match=r"flipped\.npz: member 'images\.npy' fails its CRC-32 check"):
        CellImages.read(tmp_path / "flipped.npz")


# ------------------------------------------------------------------------------------------ zarr
def test_zarr_damaged_and_absent_chunks(tmp_path, x16):
    zarr = pytest.importorskip("zarr")
    arr = zarr.open_array(tmp_path / "a.zarr", mode="w", shape=x16.shape, dtype=x16.dtype, chunks=(4, 3, 8, 10))
    arr[:] = x16 | 1  # no chunk holds only the fill value: every chunk is stored
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert CellImages.read(tmp_path / "a.zarr").batch(np.arange(12)).tobytes() == (x16 | 1).tobytes()
    (tmp_path / "a.zarr" / "c" / "1" / "0" / "0" / "0").write_bytes(b"garbage")  # cells 4-7
    cells = CellImages.read(tmp_path / "a.zarr")  # lazy: read, not opened
    with pytest.raises(FileFormatError, match=r"a\.zarr: cannot read the crops at positions 0-11 .*damaged"):
        cells.batch(np.arange(12))
    np.testing.assert_array_equal(cells.batch(np.arange(4)), x16[:4] | 1)  # the sound chunks still read
    (tmp_path / "a.zarr" / "c" / "1" / "0" / "0" / "0").unlink()
    with pytest.warns(UserWarning, match=r"a\.zarr: 1 of the 3 chunks of its images are absent") as caught:
        CellImages.read(tmp_path / "a.zarr")
    assert caught[0].filename == __file__  # attributed to the caller


def test_zarr_array_and_group_are_lazy(tmp_path, x16):
    zarr = pytest.importorskip("zarr")
    arr = zarr.open_array(tmp_path / "a.zarr", mode="w", shape=x16.shape, dtype=x16.dtype, chunks=(4, 1, 8, 10))
    arr[:] = x16
    arr.attrs["channel_names"] = NAMES
    cells = CellImages.read(tmp_path / "a.zarr", channels=["darkfield", "fluorescence"])
    assert isinstance(cells.images, LazyImages) and cells.channel_names == ["darkfield", "fluorescence"]
    np.testing.assert_array_equal(cells[np.array([11, 0, 5])].batch(np.array([0, 2])), x16[[11, 5]][:, [2, 1]])

    group = zarr.open_group(tmp_path / "g.zarr", mode="w")
    group.create_array("images", data=x16, chunks=(5, 3, 8, 10))
    group.create_array("labels", data=np.array([1, 0, 1] * 4))
    group.create_array("plate", data=np.arange(12) * 2)
    group.attrs.update(channel_names=NAMES, label_names=["alive", "dead"])
    cells = CellImages.read(tmp_path / "g.zarr")
    np.testing.assert_array_equal(np.asarray(cells.images), x16)
    assert list(cells.obs["label"][:3]) == ["dead", "alive", "dead"]
    np.testing.assert_array_equal(cells.obs["plate"], np.arange(12) * 2)


def test_zarr_object_array_is_refused_naming_the_store_and_runs_nothing(tmp_path):
    """An object array whose codec would unpickle (run code): zarr refuses its dtype, the error names the store."""
    import json

    zarr = pytest.importorskip("zarr")
    group = zarr.open_group(tmp_path / "evil.zarr", mode="w", zarr_format=2)
    group.create_array("images", data=np.zeros((4, 1, 8, 8), np.uint8))
    (tmp_path / "evil.zarr" / "labels").mkdir()
    (tmp_path / "evil.zarr" / "labels" / ".zarray").write_text(json.dumps({
        "zarr_format": 2, "shape": [4], "chunks": [4], "dtype": "|O", "compressor": None, "fill_value": None,
        "order": "C", "filters": [{"id": "pickle", "protocol": 5}], "dimension_separator": "."}))
    (tmp_path / "evil.zarr" / "labels" / "0").write_bytes(pickle.dumps(np.array([print, 1, 2, 3], dtype=object)))
    with pytest.raises(FileFormatError, match=r"evil\.zarr: cannot read the zarr group's arrays"):
        CellImages.read(tmp_path / "evil.zarr")


def test_lazy_float_nan_found_at_batch(tmp_path):
    zarr = pytest.importorskip("zarr")
    x = make_images(dtype=np.float32)
    x[7, 0, 0, 0] = np.nan
    arr = zarr.open_array(tmp_path / "f.zarr", mode="w", shape=x.shape, dtype=x.dtype)
    arr[:] = x
    cells = CellImages.read(tmp_path / "f.zarr")
    cells.batch(np.arange(7))
    with pytest.raises(InputError, match=r"f\.zarr: NaN or inf in cell\(s\) \['7'\]"):  # its id, not its batch row
        cells.batch(np.array([6, 7]))


# ------------------------------------------------------------------------------------------ folders
def test_tiff_folder_with_class_subfolders(tmp_path, x16):
    tifffile = pytest.importorskip("tifffile")
    classes = ["G1", "S", "G2"]
    for i, crop in enumerate(x16):
        folder = tmp_path / "crops" / classes[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        if i % 2:  # channel-first as tifffile writes it, and channel-last (H, W, C): both read as (C, H, W)
            tifffile.imwrite(folder / f"cell{i:02d}.tif", crop, photometric="minisblack")
        else:
            tifffile.imwrite(folder / f"cell{i:02d}.tiff", np.moveaxis(crop, 0, -1), photometric="minisblack")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cells = CellImages.read(tmp_path / "crops", channels=[2, 0])
    assert not [w for w in seen if "skipped" in str(w.message)]
    (tmp_path / "crops" / "S" / "cell99.jpg").write_bytes(b"\xff\xd8")  # a crop saved as JPEG is left out: said
    with pytest.warns(UserWarning, match=r"crops: 1 image file\(s\) .* skipped \(e\.g\. S/cell99\.jpg\)"), \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fallback rule")
        assert len(CellImages.read(tmp_path / "crops")) == 12
    ids = sorted(f"{classes[i % 3]}/cell{i:02d}" for i in range(12))
    assert list(cells.obs.index) == ids
    order = [int(i.split("cell")[1]) for i in ids]
    np.testing.assert_array_equal(cells.batch(np.arange(12)), x16[order][:, [2, 0]])
    assert cells.dtype == np.uint16
    assert list(cells.obs["label"]) == [i.split("/")[0] for i in ids]
    assert sorted(cells.obs["label"].cat.categories) == sorted(classes)


def test_a_tiff_written_a_channel_at_a_time_keeps_every_channel(tmp_path, x16):
    """One TiffWriter.write per channel makes one series each; imread's first series dropped the others."""
    tifffile = pytest.importorskip("tifffile")
    (tmp_path / "crops").mkdir()
    for i, crop in enumerate(x16[:4]):
        with tifffile.TiffWriter(tmp_path / "crops" / f"c{i}.tif") as tif:
            for channel in crop:
                tif.write(channel, contiguous=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fallback rule")
        np.testing.assert_array_equal(CellImages.read(tmp_path / "crops").batch(np.arange(4)), x16[:4])
    with tifffile.TiffWriter(tmp_path / "crops" / "c0.tif") as tif:  # channels of two dtypes: not one crop array
        tif.write(x16[0, 0], contiguous=False)
        tif.write(x16[0, 1].astype(np.uint8), contiguous=False)
    with pytest.raises(FileFormatError, match=r"c0\.tif: 2 image series of shapes/dtypes"):
        CellImages.read(tmp_path / "crops")


def test_png_folder_gray16_rgb8_and_obs_csv(tmp_path):
    from PIL import Image

    gray = make_images(n=4, c=1, dtype=np.uint16, seed=1)
    (tmp_path / "gray").mkdir()
    for i, crop in enumerate(gray):
        Image.fromarray(crop[0]).save(tmp_path / "gray" / f"c{i}.png")
    pd.DataFrame({"file": [f"c{i}.png" for i in range(4)], "well": list("ABCD"), "kind": list("xyxy")}).to_csv(
        tmp_path / "gray" / "obs.csv", index=False
    )
    cells = CellImages.read(tmp_path / "gray", label_key="kind")
    np.testing.assert_array_equal(cells.batch(np.arange(4)), gray)  # 16-bit PNG kept exactly
    assert list(cells.obs["well"]) == list("ABCD") and list(cells.obs["label"]) == list("xyxy")

    rgb = make_images(n=3, c=3, dtype=np.uint8, seed=2)
    (tmp_path / "rgb").mkdir()
    for i, crop in enumerate(rgb):
        Image.fromarray(np.moveaxis(crop, 0, -1)).save(tmp_path / "rgb" / f"c{i}.png")
    cells = CellImages.read(tmp_path / "rgb")
    assert cells.shape == (3, 3, 8, 10) and "label" not in cells.obs
    np.testing.assert_array_equal(cells.batch(np.arange(3)), rgb)


def _png_rgb16(path, rgb: np.ndarray) -> None:
    """Write ``rgb`` (H, W, 3) uint16 as a 16-bit RGB PNG (as OpenCV or MATLAB do; Pillow cannot write one)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = rgb.shape
    rows = b"".join(b"\x00" + rgb[r].astype(">u2").tobytes() for r in range(h))  # filter 0 per row
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_png_colours_are_read_as_colours_never_as_palette_indices_or_high_bytes(tmp_path):
    """A palette PNG was read as its palette indices (1 channel); a 16-bit RGB PNG as its high bytes."""
    from PIL import Image

    rgb = make_images(n=2, c=3, dtype=np.uint8, seed=3)
    (tmp_path / "palette").mkdir()
    for i, crop in enumerate(rgb):
        Image.fromarray(np.moveaxis(crop, 0, -1)).quantize(256).save(tmp_path / "palette" / f"c{i}.png")
    cells = CellImages.read(tmp_path / "palette")
    expected = [np.moveaxis(np.asarray(Image.open(tmp_path / "palette" / f"c{i}.png").convert("RGB")), -1, 0)
                for i in range(2)]
    assert cells.shape[1] == 3
    np.testing.assert_array_equal(cells.batch(np.arange(2)), np.stack(expected))
    (tmp_path / "grey").mkdir()  # a grey palette (ImageJ's LUT PNGs): one channel, the grey levels
    grey = make_images(n=2, c=1, dtype=np.uint8, seed=5)
    for i, crop in enumerate(grey):
        Image.fromarray(crop[0]).convert("P").save(tmp_path / "grey" / f"c{i}.png")
    assert Image.open(tmp_path / "grey" / "c0.png").mode == "P"
    np.testing.assert_array_equal(CellImages.read(tmp_path / "grey").batch(np.arange(2)), grey)
    (tmp_path / "rgb16").mkdir()
    _png_rgb16(tmp_path / "rgb16" / "c0.png", np.full((8, 8, 3), 24200, dtype=np.uint16))
    assert Image.open(tmp_path / "rgb16" / "c0.png").size == (8, 8)  # a valid PNG
    with pytest.raises(FileFormatError, match=r"c0.png: a 16-bit colour PNG.*save such crops as TIFF or .npz"):
        CellImages.read(tmp_path / "rgb16")


def test_folder_errors(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    (tmp_path / "mixed").mkdir()
    tifffile.imwrite(tmp_path / "mixed" / "a.tif", np.zeros((2, 8, 8), np.uint16), photometric="minisblack")
    tifffile.imwrite(tmp_path / "mixed" / "b.tif", np.zeros((2, 8, 8), np.uint16), photometric="minisblack")
    tifffile.imwrite(tmp_path / "mixed" / "c.tif", np.zeros((2, 9, 8), np.uint16), photometric="minisblack")
    with pytest.raises(InputError, match=r"a.tif is \(2, 8, 8\) uint16 .* but c.tif is \(2, 9, 8\)"):
        CellImages.read(tmp_path / "mixed")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileFormatError, match="empty: no .tif"):
        CellImages.read(tmp_path / "empty")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "x.png").write_bytes(b"not a png")
    with pytest.raises(FileFormatError, match="x.png: cannot read crop"):
        CellImages.read(tmp_path / "corrupt")


# ------------------------------------------------------------------------------------------ real data
def test_jurkat_label_free_channels():
    if not JURKAT.exists():
        pytest.skip(f"{JURKAT} not available")
    cells = CellImages.read(JURKAT, channels=[0, 2])
    assert cells.shape == (3419, 2, 40, 40) and cells.dtype == np.uint16
    assert cells.channel_names == ["Ch3_brightfield", "Ch6_darkfield_sidescatter"]
    assert len(cells.obs["label"].cat.categories) == 7
    assert cells.obs["label"].value_counts()["G1"] == 900


def test_tiff_channel_axis_follows_the_square_rule_and_warns_when_it_guesses(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    many = np.arange(40 * 32 * 32, dtype=np.uint16).reshape(40, 32, 32)  # 40 channels of 32 x 32
    (tmp_path / "first").mkdir()
    (tmp_path / "last").mkdir()
    for i in range(2):
        tifffile.imwrite(tmp_path / "first" / f"c{i}.tif", many + i, photometric="minisblack")
        tifffile.imwrite(tmp_path / "last" / f"c{i}.tif", np.moveaxis(many + i, 0, -1), photometric="minisblack")
    for layout in ("first", "last"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an unambiguous layout reads without a warning
            cells = CellImages.read(tmp_path / layout)
        assert cells.shape == (2, 40, 32, 32), layout
        np.testing.assert_array_equal(cells.batch(np.array([1])), (many + 1)[None])
    (tmp_path / "odd").mkdir()
    tifffile.imwrite(tmp_path / "odd" / "c0.tif", np.zeros((3, 20, 12), np.uint16), photometric="minisblack")
    with pytest.warns(UserWarning, match=r"1 of 1 TIFF crops have no square H x W.*\(C, H, W\) = \(3, 20, 12\)"):
        assert CellImages.read(tmp_path / "odd").shape == (1, 3, 20, 12)
