"""The image commands end to end, in process: pretrain -> embed / finetune -> predict, and their refusals."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import torch
import yaml

from sslcell.checkpoint import load
from sslcell.classify import load_classifier
from sslcell.cli import main
from sslcell.config import RecipeConfig
from tests.conftest import REPO

N, S = 96, 16
NAMES = ["bf", "dna", "actin"]
LABEL_NAMES = ["neg", "pos"]
PNG = b"\x89PNG\r\n\x1a\n"


def crops(y: np.ndarray, seed: int) -> np.ndarray:
    """(n, 3, 16, 16) uint8: noise in "bf", a cell in "dna", and in "actin" bright for class 1, dim for class 0."""
    rng = np.random.default_rng(seed)
    n = len(y)
    yy, xx = np.mgrid[:S, :S]
    centre = rng.uniform(5, S - 5, size=(n, 2))
    blob = np.exp(-((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2) / (2 * 2.5**2))
    x = np.empty((n, 3, S, S))
    x[:, 0] = rng.uniform(50, 200, (n, S, S))
    x[:, 1] = 20 + 150 * blob
    x[:, 2] = 20 + np.where(y == 1, 180, 30)[:, None, None] * blob
    x += rng.normal(0, 8, x.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Crops (npz: int labels + label_names; and with int labels plus a string array "fate"), the same crops with
    renamed channels, a corrupt npz, a tiny recipe and a model pretrained on channels dna, actin through the CLI."""
    root = tmp_path_factory.mktemp("cli_images")
    y = np.random.default_rng(0).permutation(np.arange(N) % 2)
    fate = np.array(["stem", "differentiated"])[y]
    npz = root / "crops.npz"
    np.savez(npz, images=crops(y, 0), channel_names=np.array(NAMES), labels=y, label_names=np.array(LABEL_NAMES))
    fates = root / "fates.npz"
    np.savez(fates, images=crops(y, 0), channel_names=np.array(NAMES), labels=y, fate=fate)
    both = root / "both.npz"
    np.savez(both, images=crops(y, 0), channel_names=np.array(NAMES), labels=y, label_names=np.array(LABEL_NAMES),
             fate=fate)
    renamed = root / "renamed.npz"
    np.savez(renamed, images=crops(y, 1), channel_names=np.array(["bf", "dapi", "phalloidin"]), labels=y,
             label_names=np.array(LABEL_NAMES))
    corrupt = root / "x.npz"
    corrupt.write_text("these are not crops\n")
    recipe = RecipeConfig.from_dict({
        "modality": "image",
        "method": {"name": "simclr", "projection_dim": 16, "projection_hidden": 32},
        "encoder": {"name": "resnet_tiny", "options": {"base_width": 4}},
        "data": {"batch_size": 32},
        "train": {"max_epochs": 1, "seed": 0, "progress_bar": False, "accelerator": "cpu"},
    })
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(recipe.to_dict()))
    run = root / "run"
    argv = ["pretrain", "--config", str(config), "--data", str(npz), "--out", str(run), "--max-steps", "2",
            "--channels", "dna,actin"]
    assert main(argv) == 0
    return {"npz": npz, "fates": fates, "both": both, "renamed": renamed, "corrupt": corrupt, "run": run, "y": y,
            "fate": fate, "root": root}


@pytest.fixture(scope="module")
def linear_classifier(files):
    out = files["root"] / "linear"
    assert main(["finetune", "--model", str(files["run"]), "--data", str(files["npz"]), "--out", str(out),
                 "--head", "linear"]) == 0
    return out


def test_embed_writes_obs_and_the_embedding(files, tmp_path, capsys):
    out = tmp_path / "emb.h5ad"
    assert main(["embed", "--model", str(files["run"]), "--data", str(files["npz"]), "--out", str(out)]) == 0
    assert "obsm['X_sslcell']" in capsys.readouterr().out
    adata = ad.read_h5ad(out)
    model = load(files["run"])
    assert model.inputs.channel_names == ["dna", "actin"]
    assert adata.obsm["X_sslcell"].shape == (N, model.embed_dim)
    assert list(adata.obs["label"].astype(str)) == [LABEL_NAMES[k] for k in files["y"]]
    images = np.load(files["npz"])["images"][:, [1, 2]]  # the model's channels, picked by name
    with torch.no_grad():
        reference = model.embed(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(adata.obsm["X_sslcell"], reference, rtol=1e-5, atol=1e-6)
    # scoring crop embeddings from the CLI: the raw-pixel baseline reads the crops
    evaluate = ["evaluate", "--data", str(out), "--label-key", "label"]
    assert main(evaluate) == 2 and "pass --crops for the raw-pixel" in capsys.readouterr().err
    assert main([*evaluate, "--crops", str(files["npz"]), "--n-per-class", "2"]) == 0
    assert "pixel" in capsys.readouterr().out.lower()

    other = tmp_path / "fate.h5ad"
    assert main(["embed", "--model", str(files["run"]), "--data", str(files["fates"]), "--out", str(other),
                 "--label-key", "fate", "--key", "X_mine"]) == 0
    adata = ad.read_h5ad(other)
    assert list(adata.obs["label"].astype(str)) == list(files["fate"]) and "X_mine" in adata.obsm


def test_embed_does_not_overwrite_without_the_flag(files, tmp_path, capsys):
    out = tmp_path / "emb.h5ad"
    out.write_text("precious")
    argv = ["embed", "--model", str(files["run"]), "--data", str(files["npz"]), "--out", str(out)]
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_text() == "precious"
    assert main([*argv, "--overwrite"]) == 0
    assert ad.read_h5ad(out).n_obs == N


def test_finetune_linear_writes_a_classifier(files, linear_classifier):
    assert sorted(p.name for p in linear_classifier.iterdir()) == ["classifier.json", "classifier.safetensors"]
    meta = json.loads((linear_classifier / "classifier.json").read_text())
    assert meta["kind"] == "classifier" and meta["classes"] == LABEL_NAMES
    assert meta["info"]["finetune"]["head"] == "linear"
    assert load_classifier(linear_classifier).inputs.channel_names == ["dna", "actin"]


def test_finetune_full_with_another_label_key(files, tmp_path):
    out = tmp_path / "full"
    assert main(["finetune", "--model", str(files["run"]), "--data", str(files["fates"]), "--out", str(out),
                 "--head", "full", "--epochs", "1", "--label-key", "fate"]) == 0
    classifier = load_classifier(out)
    assert classifier.classes == ["differentiated", "stem"]  # string labels: sorted categories
    info = classifier.info["finetune"]
    assert info["head"] == "full" and info["epochs"] == 1
    assert classifier.info["train_class_counts"] == {"differentiated": N // 2, "stem": N // 2}


def test_finetune_holds_out_whole_groups_with_val_group_key(files, tmp_path):
    grouped = tmp_path / "grouped.npz"
    with np.load(files["npz"]) as f:
        np.savez(grouped, **f, plate=np.arange(N) % 4)  # four plates
    out = tmp_path / "grouped"
    assert main(["finetune", "--model", str(files["run"]), "--data", str(grouped), "--out", str(out), "--head",
                 "full", "--epochs", "1", "--val-fraction", "0.25", "--val-group-key", "plate"]) == 0
    validation = load_classifier(out).info["validation"]
    assert validation["n_groups"] == 1 and validation["n_cells"] == N // 4


def test_label_key_picks_a_string_column_beside_named_integer_labels(files, tmp_path):
    out = tmp_path / "emb.h5ad"
    assert main(["embed", "--model", str(files["run"]), "--data", str(files["both"]), "--out", str(out),
                 "--label-key", "fate"]) == 0
    assert list(ad.read_h5ad(out).obs["label"].astype(str)) == list(files["fate"])


def test_finetune_refuses_a_non_empty_out(files, tmp_path, capsys):
    out = tmp_path / "clf"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    argv = ["finetune", "--model", str(files["run"]), "--data", str(files["npz"]), "--out", str(out),
            "--head", "linear"]
    assert main(argv) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "classifier.json").is_file()


def test_finetune_config_errors_name_the_field(files, tmp_path, capsys):
    config = tmp_path / "ft.yaml"
    config.write_text(yaml.safe_dump({"head": "linear", "dropuot": 0.1}))
    argv = ["finetune", "--model", str(files["run"]), "--data", str(files["npz"]), "--out", str(tmp_path / "o"),
            "--config", str(config)]
    assert main(argv) == 2
    assert "dropuot" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_predict_writes_predictions_metrics_and_plots(files, linear_classifier, tmp_path, capsys):
    out = tmp_path / "pred"
    argv = ["predict", "--model", str(linear_classifier), "--data", str(files["npz"]), "--out", str(out),
            "--label-key", "label"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| accuracy |" in printed and "| class | precision |" in printed
    for name in ("predictions.h5ad", "metrics.json", "metrics.md", "confusion_matrix.png", "roc_curves.png"):
        assert (out / name).is_file(), name
    assert (out / "confusion_matrix.png").read_bytes()[:8] == PNG and (out / "roc_curves.png").read_bytes()[:8] == PNG
    adata = ad.read_h5ad(out / "predictions.h5ad")
    assert adata.n_obs == N and adata.obsm["sslcell_pred_proba"].shape == (N, 2)
    assert list(adata.obs["sslcell_pred"].cat.categories) == LABEL_NAMES
    metrics = json.loads((out / "metrics.json").read_text())
    hand = np.mean(adata.obs["sslcell_pred"].astype(str).to_numpy() == adata.obs["label"].astype(str).to_numpy())
    assert metrics["n"] == N and metrics["accuracy"] == pytest.approx(hand)
    assert metrics["accuracy"] > 0.9  # the linear probe separates the bright and dim "actin" cells
    assert f"| accuracy | {metrics['accuracy']:.3f} |" in printed

    assert main(argv) == 2  # predictions.h5ad exists now
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    (out / "predictions.h5ad").unlink()  # the metrics and plots it would write are checked too, before any work
    (out / "metrics.md").write_text("my notes")
    assert main(argv) == 2 and "metrics.json: exists" in capsys.readouterr().err
    assert (out / "metrics.md").read_text() == "my notes" and not (out / "predictions.h5ad").exists()
    (out / "metrics.md").unlink()
    assert main([*argv, "--overwrite"]) == 0
    # again without labels: the labelled run's metrics and plots are not left beside predictions they do not score
    assert main([*argv[:-2], "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["predictions.h5ad"]


def test_predict_tta_flag(files, linear_classifier, tmp_path):
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(linear_classifier), "--data", str(files["npz"]), "--out", str(out),
                 "--tta"]) == 0
    adata = ad.read_h5ad(out / "predictions.h5ad")
    assert bool(adata.uns["sslcell"]["sslcell_pred"]["tta"]) is True


def test_predict_without_labels_writes_only_predictions(files, linear_classifier, tmp_path):
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(linear_classifier), "--data", str(files["npz"]), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["predictions.h5ad"]


def test_predict_refuses_other_channel_names(files, linear_classifier, tmp_path, capsys):
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(linear_classifier), "--data", str(files["renamed"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "sslcell predict: error:" in err and "do not match the model's ['dna', 'actin']" in err
    assert not (out / "predictions.h5ad").exists()


@pytest.mark.parametrize("command", ["embed", "finetune", "predict"])
def test_corrupt_or_missing_crops_are_clean_errors(files, linear_classifier, tmp_path, capsys, command):
    model = linear_classifier if command == "predict" else files["run"]
    for data, message in ((files["corrupt"], "cannot read as .npz"), (tmp_path / "absent.npz", "no such file")):
        out = tmp_path / ("out.h5ad" if command == "embed" else "out")
        assert main([command, "--model", str(model), "--data", str(data), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"sslcell {command}: error:" in err and message in err and str(data) in err
        assert "Traceback" not in err
        assert not out.exists() or not any(out.iterdir())


def test_finetune_cli_reaches_every_setting_and_reports_each_epoch(files, tmp_path, caplog):
    """--config takes the committed benchmark YAML; the flags override it; one log line per epoch."""
    import logging

    from sslcell.classify.finetune import FinetuneConfig

    for name in ("jurkat", "chula"):  # the benchmarks' settings are valid `sslcell finetune --config` files
        path = REPO / "benchmarks" / "configs" / f"{name}_finetune.yaml"
        FinetuneConfig.from_dict(yaml.safe_load(path.read_text()))
    with caplog.at_level(logging.INFO, logger="sslcell"):
        assert main(["finetune", "--model", str(files["run"]), "--data", str(files["npz"]), "--out",
                     str(tmp_path / "clf"), "--config", str(path.with_name("jurkat_finetune.yaml")), "--epochs", "2",
                     "--encoder-lr-factor", "0.5", "--oversample", "false", "--seed", "3", "--batch-size", "16",
                     "--dropout", "0.1"]) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fine-tuning epoch")]
    assert [line.split(":")[0] for line in lines] == ["fine-tuning epoch 1/2", "fine-tuning epoch 2/2"]
    used = load_classifier(tmp_path / "clf").info["finetune"]
    assert (used["epochs"], used["encoder_lr_factor"], used["oversample"], used["seed"], used["batch_size"],
            used["dropout"], used["lr"]) == (2, 0.5, False, 3, 16, 0.1, 0.002)  # flags over the YAML's values


def test_channels_named_by_numbers_are_selected_by_name_or_refused_as_ambiguous(files, tmp_path, capsys):
    """ImageStream names channels by number ("1", "2", "6"): "--channels 1,2" took indices 1 and 2 (the channels
    named "2" and "6") without a word."""
    npz = tmp_path / "numbered.npz"
    with np.load(files["npz"]) as f:
        np.savez(npz, images=f["images"], channel_names=np.array(["1", "2", "6"]), labels=f["labels"])
    config = files["root"] / "tiny.yaml"

    def pretrain(channels: str, out: str) -> int:
        return main(["pretrain", "--config", str(config), "--data", str(npz), "--out", str(tmp_path / out),
                     "--max-steps", "1", "--channels", channels])

    assert pretrain("6,index:0", "by_name") == 0  # "6" names a channel and is no channel's index
    assert load(tmp_path / "by_name").inputs.channel_names == ["6", "1"]
    assert pretrain("1,2", "ambiguous") == 2
    err = capsys.readouterr().err
    assert "channel '1' is ambiguous: the name of channel 0 and the index of channel 1 ('2')" in err
    assert "write name:1 or index:1" in err and not (tmp_path / "ambiguous").exists()
    assert pretrain("name:1,name:2", "names") == 0
    assert load(tmp_path / "names").inputs.channel_names == ["1", "2"]
    assert pretrain("index:0,index:2", "indices") == 0
    assert load(tmp_path / "indices").inputs.channel_names == ["1", "6"]
    recorded = json.loads((tmp_path / "by_name" / "model" / "config.json").read_text())
    assert recorded["recipe"]["data"]["channels"] == ["6", 0]  # as resolved: the recipe reads the same again


def test_embed_never_writes_over_its_input_crops(files, tmp_path, capsys):
    npz = tmp_path / "crops.npz"
    npz.write_bytes(files["npz"].read_bytes())
    assert main(["embed", "--model", str(files["run"]), "--data", str(npz), "--out", str(npz), "--overwrite"]) == 2
    assert "is an input file" in capsys.readouterr().err and npz.read_bytes() == files["npz"].read_bytes()


def test_label_key_label_names_a_column_where_there_is_one_else_the_default_labels(tmp_path):
    """A folder in class subfolders with an obs.csv 'label' column: `--label-key label` was dropped, and the reader
    then asked for label_key; where no 'label' array or column exists, 'label' still reads the default labels."""
    import pandas as pd
    import tifffile

    from sslcell.cli import _read_labelled_crops
    from sslcell.errors import InputError

    x = crops(np.arange(8) % 2, 0)[:, :1]
    rows = []
    for i, crop in enumerate(x):
        (tmp_path / "crops" / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(tmp_path / "crops" / f"class{i % 2}" / f"c{i}.tif", crop[0])
        rows.append((f"class{i % 2}/c{i}", ["early", "late"][i // 4]))
    pd.DataFrame(rows, columns=["file", "label"]).to_csv(tmp_path / "crops" / "obs.csv", index=False)
    cells = _read_labelled_crops(str(tmp_path / "crops"), "label")
    assert dict(zip(cells.obs.index, cells.obs["label"], strict=True)) == dict(rows)
    assert set(cells.obs["folder"]) == {"class0", "class1"}
    with pytest.raises(InputError, match="pass label_key='label' to use the column"):
        _read_labelled_crops(str(tmp_path / "crops"), None)
    np.savez(tmp_path / "plain.npz", images=x, labels=np.arange(8) % 2)  # a 'labels' array, no 'label'
    assert list(_read_labelled_crops(str(tmp_path / "plain.npz"), "label").obs["label"]) == [0, 1] * 4
    with pytest.raises(InputError, match="label_key 'fate' not found"):
        _read_labelled_crops(str(tmp_path / "plain.npz"), "fate")
