"""The bad-input matrix: each case runs through the CLI and must exit with status 2, print one line that names
what is wrong (and where), and change no file. One parametrised test per modality."""

from __future__ import annotations

import json
import pickle

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import yaml

from sslcell.cli import main
from tests.conftest import tiny_image_recipe, tiny_recipe


def _snapshot(root):
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _check(root, argv, expected, capsys):
    capsys.readouterr()
    before = _snapshot(root)
    assert main([str(a) for a in argv]) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line
    assert err.startswith(f"sslcell {argv[0]}: error: ") and expected in err, err
    assert _snapshot(root) == before, "a refused command changed files"


@pytest.fixture(scope="module")
def expression(small_counts, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_expression")
    (root / "tiny.yaml").write_text(yaml.safe_dump(tiny_recipe("mae", train={"max_epochs": 1}).to_dict()))
    small_counts.write_h5ad(root / "good.h5ad")
    assert main(["pretrain", "--config", str(root / "tiny.yaml"), "--data", str(root / "good.h5ad"), "--out",
                 str(root / "run")]) == 0
    x = small_counts.X.toarray().astype(np.float64)

    def write(name, values, **kwargs):
        adata = ad.AnnData(sp.csr_matrix(values), obs=small_counts.obs, var=small_counts.var, **kwargs)
        adata.write_h5ad(root / name)

    for name, value in (("nan", np.nan), ("negative", -3.0), ("fraction", 0.5), ("huge", 1e39)):
        bad = x.copy()
        bad[7, 3] = value
        write(f"{name}.h5ad", bad)
    write("zero.h5ad", np.zeros_like(x))
    small_counts[:1].write_h5ad(root / "one.h5ad")
    f16 = small_counts.copy()
    f16.X = x.astype(np.float16)
    f16.write_h5ad(root / "f16.h5ad")
    other = small_counts.copy()
    other.var_names = [f"other_{i}" for i in range(other.n_vars)]
    other.write_h5ad(root / "other_genes.h5ad")
    few = small_counts.copy()
    few.var_names = [f"renamed_{i}" if i >= 10 else g for i, g in enumerate(few.var_names)]  # >= 90 of 100 missing
    few.write_h5ad(root / "few_genes.h5ad")
    (root / "notes.h5ad").write_text("not an AnnData")
    (root / "bad.yaml").write_text("method: [unclosed")
    (root / "unknown.yaml").write_text(yaml.safe_dump({**tiny_recipe("mae").to_dict(), "extra": 1}))
    (root / "a_file").write_text("mine")
    (root / "folder").mkdir()
    damaged = {"truncated": lambda p: p.write_bytes(p.read_bytes()[:100]),
               "pickle": lambda p: p.write_bytes(pickle.dumps({"x": print}))}
    for name, damage in damaged.items():
        assert main(["pretrain", "--config", str(root / "tiny.yaml"), "--data", str(root / "good.h5ad"), "--out",
                     str(root / f"run_{name}")]) == 0
        damage(root / f"run_{name}" / "checkpoints" / "last.ckpt")
    assert main(["pretrain", "--config", str(root / "tiny.yaml"), "--data", str(root / "good.h5ad"), "--out",
                 str(root / "run_json")]) == 0
    (root / "run_json" / "run.json").write_text("[1, 2")
    return root


PRETRAIN = ["pretrain", "--config", "{root}/tiny.yaml", "--data"]
EXPRESSION_CASES = {
    "nan": (PRETRAIN + ["{root}/nan.h5ad", "--out", "{root}/new"], "NaN or inf values in"),
    "negative": (PRETRAIN + ["{root}/negative.h5ad", "--out", "{root}/new"], "negative values in"),
    "fraction": (PRETRAIN + ["{root}/fraction.h5ad", "--out", "{root}/new"], "non-integer values in"),
    "beyond float32": (PRETRAIN + ["{root}/huge.h5ad", "--out", "{root}/new"], "beyond float32's range"),
    "float16": (PRETRAIN + ["{root}/f16.h5ad", "--out", "{root}/new"], "dtype float16 are not supported"),
    "all zero": (PRETRAIN + ["{root}/zero.h5ad", "--out", "{root}/new"], "every value over the"),
    "one cell": (PRETRAIN + ["{root}/one.h5ad", "--out", "{root}/new"], "one.h5ad: 1 cell(s)"),
    "not an h5ad": (PRETRAIN + ["{root}/notes.h5ad", "--out", "{root}/new"], "notes.h5ad: not an AnnData"),
    "missing file": (PRETRAIN + ["{root}/absent.h5ad", "--out", "{root}/new"], "absent.h5ad"),
    "bad yaml": (["pretrain", "--config", "{root}/bad.yaml", "--data", "{root}/good.h5ad", "--out", "{root}/new"],
                 "bad.yaml"),
    "unknown field": (["pretrain", "--config", "{root}/unknown.yaml", "--data", "{root}/good.h5ad", "--out",
                       "{root}/new"], "extra"),
    "out is a file": (PRETRAIN + ["{root}/good.h5ad", "--out", "{root}/a_file"], "a_file: is a file"),
    "existing run": (PRETRAIN + ["{root}/good.h5ad", "--out", "{root}/run"], "--overwrite"),
    "truncated checkpoint": (PRETRAIN + ["{root}/good.h5ad", "--out", "{root}/run_truncated", "--resume"],
                             "cannot read the checkpoint"),
    "planted pickle": (PRETRAIN + ["{root}/good.h5ad", "--out", "{root}/run_pickle", "--resume"],
                       "refused: not a checkpoint sslcell wrote"),
    "corrupt run.json": (PRETRAIN + ["{root}/good.h5ad", "--out", "{root}/run_json", "--resume"],
                         "run.json: not a readable run record"),
    "disjoint genes": (["embed", "--model", "{root}/run", "--data", "{root}/other_genes.h5ad", "--out",
                        "{root}/e.h5ad"], "genes"),
    "too many missing genes": (["embed", "--model", "{root}/run", "--data", "{root}/few_genes.h5ad", "--out",
                                "{root}/e.h5ad"], "--max-missing-genes"),
    "embed into a folder": (["embed", "--model", "{root}/run", "--data", "{root}/good.h5ad", "--out", "{root}/folder",
                             "--overwrite"], "folder: is a folder"),
    "embed a folder of shards": (["embed", "--model", "{root}/run", "--data", "{root}/folder", "--out",
                                  "{root}/e.h5ad"], "folder: a folder; embed writes the input .h5ad"),
    "embed over the input": (["embed", "--model", "{root}/run", "--data", "{root}/good.h5ad", "--out",
                              "{root}/good.h5ad", "--overwrite"], "is an input file"),
    "no model": (["embed", "--model", "{root}/folder", "--data", "{root}/good.h5ad", "--out", "{root}/e.h5ad"],
                 "not an sslcell model directory"),
    "channels for expression": (PRETRAIN + ["{root}/good.h5ad", "--out", "{root}/new", "--channels", "0,1"],
                                "channels: crops only"),
    "channels for expression embed": (["embed", "--model", "{root}/run", "--data", "{root}/good.h5ad", "--out",
                                       "{root}/e.h5ad", "--channels", "0"], "--channels: crops only"),
    "negative epochs": (PRETRAIN + ["{root}/good.h5ad", "--out", "{root}/new", "--max-epochs", "-1"],
                        "at least one must be positive"),
    "patience without validation": (["finetune", "--model", "{root}/run", "--data", "{root}/good.h5ad", "--label-key",
                                     "cell_type", "--out", "{root}/c", "--head", "mlp", "--patience", "2"],
                                    "--patience: stops training on a validation split"),
    "hidden dim of a linear head": (["finetune", "--model", "{root}/run", "--data", "{root}/good.h5ad",
                                     "--label-key", "cell_type", "--out", "{root}/c", "--head", "linear",
                                     "--hidden-dim", "8"], "--hidden-dim: the width of the mlp head's"),
}


@pytest.mark.parametrize("case", sorted(EXPRESSION_CASES))
def test_expression_bad_input(expression, case, capsys):
    argv, expected = EXPRESSION_CASES[case]
    _check(expression, [a.format(root=expression) for a in argv], expected, capsys)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_images")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (64, 2, 16, 16), dtype=np.uint8)
    names = np.array(["dna", "actin"])
    labels = np.array(["a", "b"] * 32)
    np.savez(root / "good.npz", images=x, channel_names=names, label=labels)
    np.savez(root / "float.npz", images=(x / 255.0).astype(np.float32), channel_names=names, label=labels)
    np.savez(root / "float64.npz", images=x / 255.0, channel_names=names, label=labels)
    np.savez(root / "uint16.npz", images=x.astype(np.uint16) * 200, channel_names=names, label=labels)
    np.savez(root / "renamed.npz", images=x, channel_names=np.array(["dapi", "phalloidin"]), label=labels)
    np.savez(root / "small.npz", images=x[:, :, :12, :12], channel_names=names, label=labels)
    nan = (x / 1.0).astype(np.float32)
    nan[3, 0, 2, 2] = np.nan
    np.savez(root / "nan.npz", images=nan, channel_names=names, label=labels)
    np.savez(root / "no_images.npz", crops=x)
    (root / "corrupt.npz").write_text("not a zip")
    (root / "tiny.yaml").write_text(yaml.safe_dump(tiny_image_recipe("simclr", data={"batch_size": 16}).to_dict()))
    assert main(["pretrain", "--config", str(root / "tiny.yaml"), "--data", str(root / "good.npz"), "--out",
                 str(root / "run"), "--max-steps", "2"]) == 0
    assert main(["finetune", "--model", str(root / "run"), "--data", str(root / "good.npz"), "--out",
                 str(root / "clf"), "--head", "linear"]) == 0
    (root / "clf_json").mkdir()
    for f in (root / "clf").iterdir():
        (root / "clf_json" / f.name).write_bytes(f.read_bytes())
    (root / "clf_json" / "classifier.json").write_text(json.dumps([1]))
    return root


def _embed(data, *extra):
    return ["embed", "--model", "{root}/run", "--data", f"{{root}}/{data}", "--out", "{root}/e.h5ad", *extra]


IMAGE_CASES = {
    "float crops for a uint8 model": (_embed("float.npz"),
                                      "float.npz: images are float32; the model was trained on uint8"),
    "float64 crops": (_embed("float64.npz"), "images dtype float64 is not supported"),
    "uint16 crops for a uint8 model": (_embed("uint16.npz"), "uint16.npz: images are uint16"),
    "other channel names": (_embed("renamed.npz"), "do not match the model's ['dna', 'actin']"),
    "negative channel index": (_embed("good.npz", "--channels=-1,0"), "negative indices are not accepted"),
    "out-of-range channel": (_embed("good.npz", "--channels", "0,5"), "channel index 5 out of range"),
    "wrong crop size": (_embed("small.npz"), "(12, 12) pixels; the model expects (16, 16)"),
    "NaN in crops": (["pretrain", "--config", "{root}/tiny.yaml", "--data", "{root}/nan.npz", "--out", "{root}/r3"],
                     "NaN"),  # (embedding them with the uint8 model is refused for their dtype first)
    "npz without images": (_embed("no_images.npz"), "no 'images' array"),
    "corrupt npz": (_embed("corrupt.npz"), "corrupt.npz"),
    "missing crops": (_embed("absent.npz"), "absent.npz"),
    "label key absent": (["predict", "--model", "{root}/clf", "--data", "{root}/good.npz", "--out", "{root}/p",
                          "--label-key", "fate"], "fate"),
    "corrupt classifier": (["predict", "--model", "{root}/clf_json", "--data", "{root}/good.npz", "--out",
                            "{root}/p"], "classifier.json"),
    "finetune on float crops": (["finetune", "--model", "{root}/run", "--data", "{root}/float.npz", "--out",
                                 "{root}/c2", "--head", "linear"], "float.npz: images are float32"),
    "encoder flags for a frozen encoder": (["finetune", "--model", "{root}/run", "--data", "{root}/good.npz", "--out",
                                            "{root}/c3", "--head", "mlp", "--encoder-lr-factor", "0.25"],
                                           "--encoder-lr-factor: the mlp head trains on the frozen encoder's"),
    "layer decay for a frozen encoder": (["finetune", "--model", "{root}/run", "--data", "{root}/good.npz", "--out",
                                          "{root}/c4", "--head", "linear", "--layer-decay", "0.75"],
                                         "--layer-decay: the linear head trains on the frozen encoder's"),
    "several crop files": (["pretrain", "--config", "{root}/tiny.yaml", "--data", "{root}/good.npz",
                            "{root}/float.npz", "--out", "{root}/r2"], "one .npz, zarr store or folder of crops"),
    "transfer with an image model": (["transfer", "--model", "{root}/run", "--reference", "{root}/a.h5ad", "--query",
                                      "{root}/b.h5ad", "--label-key", "label", "--out", "{root}/t.h5ad"],
                                     "an image model reads crops, not these .h5ad files"),
    "finetune into a file": (["finetune", "--model", "{root}/run", "--data", "{root}/good.npz", "--out",
                              "{root}/good.npz", "--head", "linear", "--overwrite"], "good.npz: is a file"),
    "predict into a file": (["predict", "--model", "{root}/clf", "--data", "{root}/good.npz", "--out",
                             "{root}/good.npz"], "good.npz: is a file"),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_image_bad_input(images, case, capsys):
    argv, expected = IMAGE_CASES[case]
    _check(images, [a.format(root=images) for a in argv], expected, capsys)
