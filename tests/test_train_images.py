"""Image pretraining end to end: run directory, channel selection and statistics, exact resume, refusals, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml

from sslcell.checkpoint import load
from sslcell.cli import main
from sslcell.config import RecipeConfig, load_config
from sslcell.data.images import CellImages
from sslcell.errors import ChannelMismatchError, ConfigError, OverwriteError
from sslcell.methods import build_method
from sslcell.train import pretrain
from tests.conftest import REPO, tiny_image_recipe

N, C, S = 200, 3, 16
NAMES = ["bf", "dna", "df"]
STEPS_PER_EPOCH = N // 32


def image_recipe(name: str = "simclr", kind: str = "resnet", **overrides) -> RecipeConfig:
    """The tiny image recipe for 2 epochs, with a checkpoint every 2 steps and logs at every step."""
    train = {"max_epochs": 2, "checkpoint_every_n_steps": 2, "log_every_n_steps": 1, **overrides.pop("train", {})}
    return tiny_image_recipe(name, kind, train=train, **overrides)


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    """(N, 3, 16, 16) uint16 crops, each channel on its own intensity scale."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:S, :S]
    centre = rng.uniform(4, S - 4, size=(N, 2))
    blob = np.exp(-((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2) / 8.0)
    scale = np.array([40000.0, 3000.0, 600.0])[None, :, None, None]
    x = 500 + scale * blob[:, None] * rng.uniform(0.5, 1.0, (N, C, 1, 1)) + rng.normal(0, 50, (N, C, S, S))
    return np.clip(x, 0, 65535).astype(np.uint16)


@pytest.fixture(scope="module")
def npz(crops, tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "crops.npz"
    np.savez(path, images=crops, channel_names=np.array(NAMES), labels=np.arange(N) % 4)  # uncompressed: memmapped
    return path


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("source,channels,names", [
    ("cells", None, NAMES),
    ("uint8", [1], ["dna"]),
    ("npz", [0, 2], ["bf", "df"]),
    ("npz", ["df", "bf"], ["df", "bf"]),  # by name, in the order given
])
def test_pretrain_writes_a_run_with_the_selected_channels(crops, npz, tmp_path, source, channels, names):
    if source == "uint8":
        crops = (crops // 257).astype(np.uint8)
    data = npz if source == "npz" else CellImages.from_array(crops, channel_names=NAMES)
    out = tmp_path / "run"
    model = pretrain(image_recipe("simclr"), data, out, max_steps=3, channels=channels)
    assert (out / "run.json").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "config.json").is_file()
    restored = load(out)
    contract = restored.inputs.contract.to_dict()
    assert contract["channel_names"] == names and contract["image_size"] == [S, S]
    assert contract["dtype"] == ("uint8" if source == "uint8" else "uint16")
    assert restored.encoder.in_channels == len(names)
    assert restored.trained_info["global_step"] == 3 and restored.trained_info["n_cells"] == N
    # per-channel statistics of exactly the selected channels, over every cell (hand-computed reference)
    picked = crops[:, [NAMES.index(n) for n in names]].astype(np.float64)
    np.testing.assert_allclose(contract["channel_mean"], picked.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(contract["channel_std"], picked.std(axis=(0, 2, 3)), rtol=1e-6)
    run = json.loads((out / "run.json").read_text())["contract"]
    stats = CellImages.from_array(crops, channel_names=NAMES).select_channels(names).channel_stats()
    np.testing.assert_allclose(run["channel_mean"], stats["mean"], rtol=1e-12)
    np.testing.assert_allclose(run["channel_std"], stats["std"], rtol=1e-12)
    x = torch.from_numpy(crops[:8][:, [NAMES.index(n) for n in names]])
    assert torch.equal(restored.embed(x), model.embed(x))
    if len(names) < C:
        with pytest.raises(ChannelMismatchError, match=f"3 channels.*expects {len(names)}"):
            restored.embed(torch.from_numpy(crops[:8]))


class StopAt(pl.Callback):
    """Simulates a run killed after ``step`` optimiser steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


@pytest.mark.parametrize("name,kind", [("byol", "resnet"), ("dino", "vit")])
def test_resume_mid_epoch_is_exact(npz, tmp_path, name, kind):
    """Stopped at step 8 (batch 2 of epoch 1) and resumed: the same weights as an uninterrupted run."""
    full = pretrain(image_recipe(name, kind), npz, tmp_path / "full", channels=[2, 0])
    cut = tmp_path / "cut"
    pretrain(image_recipe(name, kind), npz, cut, channels=[2, 0], callbacks=[StopAt(8)])
    assert load(cut).trained_info["global_step"] == 8
    resumed = pretrain(image_recipe(name, kind), npz, cut, resume=True)
    assert resumed.inputs.channel_names == ["df", "bf"]  # the run's channels, not the file's
    assert load(cut).trained_info["global_step"] == 2 * STEPS_PER_EPOCH
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert len(list(cut.glob("logs/version_*"))) == 2


class Snapshot(pl.Callback):
    """Keeps the model's state as training starts."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.initial = _state(pl_module)


@pytest.mark.parametrize("name,kind,target", [
    ("byol", "resnet", "encoder_momentum"),
    ("dino", "vit", "teacher_encoder"),
])
def test_momentum_target_trails_the_online_encoder(npz, tmp_path, name, kind, target):
    snapshot = Snapshot()
    model = pretrain(image_recipe(name, kind), npz, tmp_path / "run", max_steps=4, callbacks=[snapshot])
    start, now = snapshot.initial, _state(model)
    weights = [k for k, _ in model.encoder.named_parameters()]
    online = torch.cat([(now[f"encoder.{k}"] - start[f"encoder.{k}"]).flatten() for k in weights]).norm()
    trail = torch.cat([(now[f"{target}.{k}"] - start[f"{target}.{k}"]).flatten() for k in weights]).norm()
    assert 0 < trail < 0.2 * online  # moved by the EMA (momentum 0.99 .. 1), far less than the online network
    if name == "dino":  # the student's last layer stays frozen through the first epoch (lightly's freeze_last_layer=1)
        last = [k for k in now if k.startswith("projection.last_layer.")]
        assert last and all(torch.equal(now[k], start[k]) for k in last)
        assert not torch.equal(now["projection.layers.0.weight"], start["projection.layers.0.weight"])


class RecordBatches(pl.Callback):
    """Keeps a fingerprint (pixel sum) of every training batch, in order."""

    def __init__(self) -> None:
        self.sums: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.sums.append(int(batch.to(torch.int64).sum()))


def test_resume_with_loader_workers_is_exact(npz, tmp_path):
    recipe = lambda: image_recipe("simclr", "resnet", data={"num_workers": 2})  # noqa: E731
    full, cut, resumed = RecordBatches(), RecordBatches(), RecordBatches()
    pretrain(recipe(), npz, tmp_path / "full", callbacks=[full])
    pretrain(recipe(), npz, tmp_path / "cut", callbacks=[StopAt(8), cut])  # 6 batches per epoch: mid epoch 1
    pretrain(recipe(), npz, tmp_path / "cut", resume=True, callbacks=[resumed])
    assert len(full.sums) == 2 * 2 * ((N // 2) // 32)
    assert cut.sums + resumed.sums == full.sums


def test_resume_refuses_new_channels_and_overwrite_needs_a_flag(npz, tmp_path):
    out = tmp_path / "run"
    pretrain(image_recipe("mae", "vit"), npz, out, max_steps=2, channels=[1])
    before = (out / "run.json").read_text()
    with pytest.raises(ConfigError, match="channels"):
        pretrain(image_recipe("mae", "vit"), npz, out, resume=True, channels=[0, 1])
    with pytest.raises(OverwriteError, match="--resume.*--overwrite"):
        pretrain(image_recipe("mae", "vit"), npz, out, max_steps=2)
    assert (out / "run.json").read_text() == before
    assert load(out).inputs.channel_names == ["dna"]
    pretrain(image_recipe("mae", "vit"), npz, out, max_steps=1, overwrite=True)
    assert load(out).inputs.channel_names == NAMES


def test_existing_files_are_not_overwritten(npz, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OverwriteError, match=r"holds files that are not a run; .*overwrite=True \(--overwrite\)"):
        pretrain(image_recipe("simclr"), npz, out, max_steps=1)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_too_few_cells_for_a_batch_writes_nothing(crops, tmp_path):
    out = tmp_path / "run"
    cells = CellImages.from_array(crops[:50], channel_names=NAMES)
    with pytest.raises(ConfigError, match=r"50 cells.*fewer than batch_size=64"):
        pretrain(image_recipe("simclr", data={"batch_size": 64}), cells, out, max_steps=1)
    assert not (out / "run.json").exists()
    assert not out.exists() or not any(out.iterdir())  # the same command can run again once fixed


def test_cli_pretrain_on_two_channels(npz, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(image_recipe("mae", "vit").to_dict()))
    out = tmp_path / "run"
    argv = ["pretrain", "--config", str(config), "--data", str(npz), "--out", str(out), "--max-steps", "2"]
    assert main([*argv[:-2], "--channels", "0,5", "--max-steps", "2"]) == 2  # a bad channel is a clean error
    assert "channel index 5 out of range" in capsys.readouterr().err
    assert main([*argv, "--channels", "0,2"]) == 0
    model = load(out)
    assert model.inputs.channel_names == ["bf", "df"] and model.encoder.in_channels == 2
    assert model.trained_info["global_step"] == 2
    assert json.loads((out / "run.json").read_text())["recipe"]["data"]["channels"] == [0, 2]
    assert main(argv) == 2  # the run exists now: refused without --resume / --overwrite
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("image_*.yaml")), ids=lambda p: p.stem)
def test_shipped_image_recipes_build(path):
    config = load_config(path)
    assert config.modality == "image"
    contract = {"modality": "image", "channel_names": ["a", "b", "c"], "channel_mean": [100.0, 10.0, 1.0],
                "channel_std": [20.0, 2.0, 1.0], "image_size": [32, 32], "dtype": "uint16"}
    model = build_method(config, contract)
    x = torch.randint(0, 200, (2, 3, 32, 32), dtype=torch.int32).to(torch.uint16)
    assert model.embed(x).shape == (2, model.encoder.embed_dim)
    loss, _ = model.loss(x, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


def test_ddp_two_processes_on_cpu(npz, tmp_path):
    """2-process DDP (gloo) through the CLI: each rank reads half of the cells, and the loss goes down."""
    import os
    import subprocess
    import sys

    import pandas as pd

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(image_recipe("simclr", "resnet", train={"max_epochs": 4}).to_dict()))
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "sslcell", "pretrain", "--config", str(config), "--data", str(npz),
           "--out", str(out), "--devices", "2", "--accelerator", "cpu", "--channels", "0,2"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    trained = json.loads((out / "model" / "config.json").read_text())["trained"]
    assert trained["world_size"] == 2
    assert trained["global_step"] == 4 * ((N // 2) // 32)  # 100 cells per rank, 32 per batch: 3 steps per epoch
    metrics = pd.concat(pd.read_csv(p) for p in out.glob("logs/*/metrics.csv"))
    loss = metrics["train/loss"].dropna().to_numpy()
    assert np.isfinite(loss).all() and len(loss) == trained["global_step"]


@pytest.mark.parametrize("name,kind", [("mae", "vit"), ("dino", "vit"), ("simclr", "resnet")])
def test_bf16_autocast_trains(npz, tmp_path, name, kind):
    """The bf16-mixed path of ``precision: auto`` on a GPU, exercised with CPU autocast: losses stay finite."""
    import pandas as pd

    out = tmp_path / "bf16"
    pretrain(image_recipe(name, kind, train={"precision": "bf16-mixed", "max_epochs": 1}), npz, out)
    metrics = pd.concat(pd.read_csv(p) for p in out.glob("logs/*/metrics.csv"))
    loss = metrics["train/loss"].dropna().to_numpy()
    assert len(loss) > 0 and np.isfinite(loss).all()
