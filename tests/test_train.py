import json
import logging
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import scipy.sparse as sp
import torch
import yaml

from sslcell.checkpoint import load
from sslcell.errors import ConfigError, GeneMismatchError, InputError, OverwriteError
from sslcell.train import pretrain
from tests.conftest import REPO, tiny_recipe


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_pretrain_writes_a_complete_run(small_counts_file, tmp_path):
    out = tmp_path / "run"
    model = pretrain(tiny_recipe("mae"), small_counts_file, out)
    assert (out / "run.json").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    restored = load(out)
    assert len(restored.inputs.genes) == 100  # n_top_genes
    assert restored.trained_info["global_step"] == 2 * (400 // 64)
    x = torch.poisson(torch.full((4, 100), 2.0))
    assert torch.equal(restored.embed(x), model.embed(x))
    metrics = pd.concat(pd.read_csv(p) for p in out.glob("logs/*/metrics.csv"))
    assert metrics["train/loss"].notna().sum() >= 10


def test_existing_run_is_not_overwritten(small_counts_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OverwriteError, match=r"holds files that are not a run; .* overwrite=True \(--overwrite\)"):
        pretrain(tiny_recipe(), small_counts_file, out)
    assert (out / "precious.txt").read_text() == "keep me"
    out.joinpath("precious.txt").rename(tmp_path / "precious.txt")
    pretrain(tiny_recipe(), small_counts_file, out, max_steps=1)
    with pytest.raises(OverwriteError, match=r"holds a previous run; pass resume=True \(--resume\) to continue it"):
        pretrain(tiny_recipe(), small_counts_file, out)


def test_overwrite_never_replaces_a_users_files_named_as_sslcells(small_counts_file, tmp_path):
    """A user's run.json or model/README.md was called a previous run, then replaced by overwrite=True."""
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "run.json").write_text('{"pipeline": "my nextflow run"}')
    (out / "model" / "README.md").write_text("my notes")
    with pytest.raises(OverwriteError, match="holds files that are not a run"):
        pretrain(tiny_recipe(), small_counts_file, out, max_steps=1)
    with pytest.raises(OverwriteError, match=r"run\.json, .*README\.md: not sslcell's"):
        pretrain(tiny_recipe(), small_counts_file, out, max_steps=1, overwrite=True)
    assert (out / "run.json").read_text() == '{"pipeline": "my nextflow run"}'
    assert (out / "model" / "README.md").read_text() == "my notes"


class FailAt(pl.Callback):
    """Simulates a run that dies after ``step`` optimiser steps, before its first checkpoint."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            raise RuntimeError("killed")


def test_overwrite_removes_the_previous_runs_checkpoint_and_keeps_user_files(small_counts_file, tmp_path):
    out = tmp_path / "run"
    pretrain(tiny_recipe("mae", train={"checkpoint_every_n_steps": 3}), small_counts_file, out)
    (out / "precious.txt").write_text("keep me")
    (out / "model" / "notes.md").write_text("mine")
    new = tiny_recipe("mae", data={"n_top_genes": 50}, train={"checkpoint_every_n_steps": 100})
    with pytest.raises(RuntimeError, match="killed"):
        pretrain(new, small_counts_file, out, overwrite=True, callbacks=[FailAt(1)])
    assert not (out / "checkpoints" / "last.ckpt").exists()  # the old run's weights can never be resumed
    assert not (out / "model" / "model.safetensors").exists()
    assert (out / "precious.txt").read_text() == "keep me" and (out / "model" / "notes.md").read_text() == "mine"
    with pytest.raises(FileNotFoundError, match="nothing to resume from"):
        pretrain(new, small_counts_file, out, resume=True)


def test_overwrite_with_bad_data_keeps_the_previous_run(small_counts, small_counts_file, tmp_path):
    """A typo in the data path, or too few cells, must not cost the model already there."""
    out = tmp_path / "run"
    pretrain(tiny_recipe(), small_counts_file, out)
    before = {p: p.read_bytes() for p in [out / "run.json", out / "model" / "model.safetensors"]}
    with pytest.raises(FileNotFoundError):
        pretrain(tiny_recipe(), tmp_path / "atlsa.h5ad", out, overwrite=True)
    with pytest.raises(InputError, match="batch"):
        pretrain(tiny_recipe(), small_counts[:20].copy(), out, overwrite=True)  # fewer cells than one batch
    assert {p: p.read_bytes() for p in before} == before


class StopAt(pl.Callback):
    """Simulates a run killed after ``step`` optimiser steps (mid-epoch)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


@pytest.mark.parametrize("method,workers", [("mae", 0), ("byol", 0), ("mae", 2)])
def test_resume_mid_epoch_is_exact(small_counts_file, tmp_path, method, workers):
    def recipe(**train):
        return tiny_recipe(method, data={"num_workers": workers}, train=train)

    full = pretrain(recipe(checkpoint_every_n_steps=2), small_counts_file, tmp_path / "full")
    pretrain(recipe(checkpoint_every_n_steps=2), small_counts_file, tmp_path / "cut", callbacks=[StopAt(4)])
    assert load(tmp_path / "cut").trained_info["global_step"] == 4
    resumed = pretrain(recipe(), small_counts_file, tmp_path / "cut", resume=True)
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, small_counts_file):
    with pytest.raises(FileNotFoundError, match="no run to resume"):
        pretrain(tiny_recipe(), small_counts_file, tmp_path / "none", resume=True)


def test_ddp_two_processes_on_cpu(small_counts_file, tmp_path):
    config = tmp_path / "tiny.yaml"
    recipe = tiny_recipe("mae", train={"max_epochs": 4}, data={"block_size": 50})  # 8 blocks, 4 per rank
    config.write_text(yaml.safe_dump(recipe.to_dict()))
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "sslcell", "pretrain", "--config", str(config), "--data", str(small_counts_file),
           "--out", str(out), "--devices", "2", "--accelerator", "cpu"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    trained = json.loads((out / "model" / "config.json").read_text())["trained"]
    assert trained["world_size"] == 2
    # each rank reads 4 of the 8 blocks: 200 cells / 64 per batch = 3 steps per epoch
    assert trained["global_step"] == 4 * 3
    metrics = pd.concat(pd.read_csv(p) for p in out.glob("logs/*/metrics.csv"))
    loss = metrics["train/loss"].dropna().to_numpy()
    assert loss[-3:].mean() < loss[:3].mean()


def test_killed_run_resumes_from_its_last_checkpoint(small_counts_file, tmp_path):
    import signal
    import time

    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(tiny_recipe("mae", train={"max_epochs": 1000, "checkpoint_every_n_steps": 1}).to_dict())
    )
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "sslcell", "pretrain", "--config", str(config), "--data", str(small_counts_file),
            "--out", str(out)]
    proc = subprocess.Popen(base, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(1200):  # wait (at most ~2 min) for the first checkpoint, then kill without warning
            if (out / "model" / "config.json").is_file() or proc.poll() is not None:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    stopped_at = json.loads((out / "model" / "config.json").read_text())["trained"]["global_step"]
    steps_per_epoch = 400 // 64
    target_epochs = stopped_at // steps_per_epoch + 2
    result = subprocess.run([*base, "--resume", "--max-epochs", str(target_epochs)], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    trained = json.loads((out / "model" / "config.json").read_text())["trained"]
    assert trained["global_step"] == target_epochs * steps_per_epoch
    assert len(list(out.glob("logs/version_*"))) == 2  # the resumed run logs beside the first, nothing overwritten


@pytest.mark.parametrize("method", ["mae", "byol"])
def test_bf16_autocast_trains(small_counts_file, tmp_path, method):
    """The bf16-mixed path the GPU default takes ("precision: auto"), exercised with CPU autocast."""
    out = tmp_path / "bf16"
    pretrain(tiny_recipe(method, train={"precision": "bf16-mixed", "max_epochs": 1}), small_counts_file, out)
    metrics = pd.concat(pd.read_csv(p) for p in out.glob("logs/*/metrics.csv"))
    loss = metrics["train/loss"].dropna().to_numpy()
    assert len(loss) > 0 and np.isfinite(loss).all()
    assert load(out).embed_dim == 8


def test_all_zero_data_is_refused_and_empty_cells_warned(small_counts, tmp_path):
    from sslcell.errors import InputError

    zero = small_counts.copy()
    zero.X = zero.X * 0
    with pytest.raises(InputError, match=r"every value over the 200 genes read is zero \(400 cells\)"):
        pretrain(tiny_recipe("mae"), zero, tmp_path / "zero")
    assert not (tmp_path / "zero").exists()  # refused before the run directory is written
    some = small_counts.copy()
    x = some.X.tolil()
    x[:5, :] = 0
    some.X = x.tocsr()
    with pytest.warns(UserWarning, match=r"5 of 400 cells have no counts over the model's 100 genes"):
        pretrain(tiny_recipe("mae", train={"max_epochs": 1}), some, tmp_path / "some")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "pickle", "run_json", "plain_dict", "other_model"])
def test_a_damaged_run_is_a_one_line_error_on_resume(small_counts_file, tmp_path, damage):
    import pickle

    from sslcell.errors import FileFormatError

    out = tmp_path / "run"
    pretrain(tiny_recipe("mae", train={"max_epochs": 1}), small_counts_file, out)
    ckpt = out / "checkpoints" / "last.ckpt"
    if damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
        message = "cannot read the checkpoint"
    elif damage == "garbage":
        ckpt.write_text("not a checkpoint")
        message = "refused: not a checkpoint sslcell wrote"
    elif damage == "pickle":  # a planted pickle that would run code: refused, and no advice to unsafe-load it
        ckpt.write_bytes(pickle.dumps({"state": os.getcwd}))
        message = "refused: not a checkpoint sslcell wrote .*could run code"
    elif damage == "plain_dict":  # loads (tensors only), but is no Lightning checkpoint: was a KeyError traceback
        torch.save({"x": torch.zeros(3)}, ckpt)
        message = "not a checkpoint of an sslcell run"
    elif damage == "other_model":  # another run's checkpoint copied over: was Lightning's state-dict traceback
        other = tmp_path / "other"
        pretrain(tiny_recipe("byol", train={"max_epochs": 1}), small_counts_file, other)
        ckpt.write_bytes((other / "checkpoints" / "last.ckpt").read_bytes())
        message = "the checkpoint is of another model than this run's recipe builds"
    else:
        (out / "run.json").write_text("{ not json")
        message = "run.json: not a readable run record"
    before = (out / "run.json").read_bytes()
    with pytest.raises(FileFormatError, match=message) as caught:
        pretrain(tiny_recipe("mae", train={"max_epochs": 2}), small_counts_file, out, resume=True)
    assert "weights_only=False" not in str(caught.value)
    assert (out / "run.json").read_bytes() == before  # its settings were rewritten before the crash


def test_lightnings_advertisement_is_not_logged(caplog):
    import sslcell.train  # noqa: F401  (installs the filter)

    with caplog.at_level(logging.INFO, logger="pytorch_lightning.utilities.rank_zero"):
        pl.Trainer(logger=False, enable_progress_bar=False, accelerator="cpu")
    assert "GPU available" in caplog.text  # the logger is heard: the check has teeth
    assert "litlogger" not in caplog.text


def test_resume_with_another_recipe_is_refused(small_counts_file, tmp_path):
    """--resume --config other.yaml went on with the run's recipe without a word."""
    out = tmp_path / "run"
    pretrain(tiny_recipe("mae", train={"checkpoint_every_n_steps": 2}), small_counts_file, out, callbacks=[StopAt(2)])
    other = tiny_recipe("mae", encoder={"latent": 12})
    with pytest.raises(ConfigError, match=r"another recipe than the run.s: encoder\.latent \(the run.s 8, given 12\)"):
        pretrain(other, small_counts_file, out, resume=True)
    resumed = pretrain(tiny_recipe("mae", data={"num_workers": 0}), small_counts_file, out, resume=True)
    assert resumed.trainer.global_step > 2


@pytest.mark.parametrize("max_steps", [-1, 1000])
def test_a_resume_runs_the_train_settings_it_is_given_and_keeps_them(small_counts_file, tmp_path, max_steps):
    """The given recipe's max_epochs was dropped for the run's; a resume's --max-epochs was forgotten by the next.
    A finished run extended, stopped mid-epoch and resumed again trains each epoch once (with and without
    max_steps: the epoch's checkpoint is written where Lightning restores it as finished)."""
    out = tmp_path / "run"
    train = {"checkpoint_every_n_steps": 2, "max_steps": max_steps}
    pretrain(tiny_recipe("mae", train={"max_epochs": 2, **train}), small_counts_file, out)
    steps = json.loads((out / "model" / "config.json").read_text())["trained"]["global_step"]
    longer = tiny_recipe("mae", train={"max_epochs": 4, **train, "seed": 5})
    with pytest.raises(ConfigError, match="train.seed"):  # the seed decides the run's draws: never another
        pretrain(longer, small_counts_file, out, resume=True)
    longer.train.seed = 0
    model = pretrain(longer, small_counts_file, out, resume=True, callbacks=[StopAt(steps + 2)])
    assert model.trainer.global_step == steps + 2  # the recipe's 4 epochs, not the run's 2
    assert json.loads((out / "run.json").read_text())["recipe"]["train"]["max_epochs"] == 4
    pretrain(tiny_recipe("mae", train={"max_epochs": 2, **train}), small_counts_file, out, resume=True,
             max_epochs=4)  # as --resume --max-epochs 4 with the recipe's 2
    assert json.loads((out / "model" / "config.json").read_text())["trained"]["global_step"] == 2 * steps


def test_a_plain_resume_keeps_the_runs_overrides(small_counts_file, tmp_path):
    """A run started with --max-epochs 3 over a recipe of 1, resumed with that recipe, went on to 1 epoch."""
    out = tmp_path / "run"
    recipe = tiny_recipe("mae", train={"max_epochs": 1, "checkpoint_every_n_steps": 2})
    pretrain(recipe, small_counts_file, out, max_epochs=3, callbacks=[StopAt(2)])
    model = pretrain(recipe, small_counts_file, out, resume=True)  # as `--resume` with the same recipe file
    assert model.trainer.current_epoch == 3 and json.loads((out / "run.json").read_text())["recipe"]["train"][
        "max_epochs"] == 3


def test_resume_on_other_data_is_refused(small_counts, small_counts_file, tmp_path):
    """Other cells (another epoch length and order), or data without most of the model's genes, went on silently."""
    out = tmp_path / "run"
    pretrain(tiny_recipe("mae", train={"checkpoint_every_n_steps": 2}), small_counts_file, out, callbacks=[StopAt(2)])
    before = (out / "run.json").read_text()
    fewer = small_counts[: small_counts.n_obs - 40].copy()
    with pytest.raises(InputError, match=r"the run trained on 400 cells .*holds 360: resume on the run's data"):
        pretrain(tiny_recipe("mae"), fewer, out, resume=True)
    genes = small_counts[:, 5:].copy()
    with pytest.warns(UserWarning, match="missing"), pytest.raises(GeneMismatchError, match="resume on the run's"):
        pretrain(tiny_recipe("mae"), genes, out, resume=True)
    other = small_counts.copy()  # as many cells, the same genes, other counts: went on silently
    other.X = other.X[np.random.default_rng(0).permutation(other.n_obs)]
    with pytest.raises(InputError, match=r"holds other cells than the data the run trained on .*a sample of 16 cells"):
        pretrain(tiny_recipe("mae"), other, out, resume=True)
    assert (out / "run.json").read_text() == before
    assert pretrain(tiny_recipe("mae"), small_counts, out, resume=True).trainer.global_step > 2  # in memory: the same


def test_a_bad_override_is_refused_before_the_run_folder_is_touched(small_counts_file, tmp_path):
    """--max-epochs -1 raised an OverflowError mid-run and left a run.json that blocked the next try."""
    with pytest.raises(ConfigError, match="at least one must be positive"):
        pretrain(tiny_recipe(), small_counts_file, tmp_path / "run", max_epochs=-1)
    with pytest.raises(ConfigError, match="train.devices"):
        pretrain(tiny_recipe(), small_counts_file, tmp_path / "run", devices=0)
    assert not (tmp_path / "run").exists()


def test_overrides_leave_the_callers_recipe_alone(small_counts_file, tmp_path):
    recipe = tiny_recipe()
    pretrain(recipe, small_counts_file, tmp_path / "run", max_steps=1, max_epochs=1)
    assert recipe == tiny_recipe()  # a later pretrain(recipe, ...) must not stop after one step


def test_genes_that_never_vary_are_warned_about(small_counts, tmp_path):
    data = small_counts.copy()
    x = data.X.toarray()
    x[:, :3] = 0
    data.X = sp.csr_matrix(x)
    with pytest.warns(UserWarning, match=r"3 of the model's \d+ genes never vary in the pretraining cells"):
        pretrain(tiny_recipe(data={"n_top_genes": None}), data, tmp_path / "run", max_steps=1)
    n_genes = data.n_vars
    with pytest.warns(UserWarning, match=rf"n_top_genes={n_genes - 1}, but only {n_genes - 3} genes vary"):
        pretrain(tiny_recipe(data={"n_top_genes": n_genes - 1}), data, tmp_path / "run2", max_steps=1)


def test_a_sigterm_during_any_training_raises_run_interrupted():
    """Lightning ends a fit on SIGTERM with a SystemExit without a code: a fine-tuning killed by a scheduler
    exited 0, as if it had finished. fit_quietly (every training's fit) raises RunInterrupted (CLI exit 143)."""
    import signal

    from sslcell.errors import RunInterrupted
    from sslcell.train import fit_quietly

    class Killed(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            if self.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(16, 2)), batch_size=2)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(RunInterrupted, match=r"stopped by SIGTERM at step 3 \(epoch 0\)"):
        fit_quietly(trainer, Killed(), loader)
