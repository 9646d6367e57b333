"""Task kind crop_classification: the splits, the validation protocol, the supervised CNN and the shipped suite."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from sslcell.benchmark import load_suite, run_suite
from sslcell.benchmark.fit_store import FitStore
from sslcell.benchmark.tasks import crop_classification as cc
from sslcell.benchmark.tasks._supervised_cnn import CNNSettings, train_cnn
from sslcell.classify import load_classifier, save_classifier
from sslcell.data.images import CellImages
from sslcell.errors import ConfigError, FileFormatError, InputError
from sslcell.evaluate.metrics import ClassificationReport

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "benchmarks" / "suites" / "crops.yaml"
DATA = ROOT.parent / "shared" / "data"


def _crops(n_per_class: int = 40, seed: int = 0) -> CellImages:
    """Two classes told apart by a bright square (class b), 2 channels, 16 px, uint8, 8 groups."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(2 * n_per_class, 2, 16, 16), dtype=np.uint8)
    images[n_per_class:, 0, 4:12, 4:12] += 150
    labels = np.array(["a"] * n_per_class + ["b"] * n_per_class)
    obs = pd.DataFrame({"label": labels, "smear": np.arange(2 * n_per_class) % 8})
    return CellImages.from_array(images, channel_names=["bf", "df"], obs=obs)


def test_splits_by_group_keep_groups_apart_and_validation_stays_inside_training():
    y = np.repeat(np.array(list("abc")), 50)
    groups = np.arange(150) % 15
    train, test = cc._test_split(y, groups, 0.2, seed=0)
    assert set(groups[train]).isdisjoint(groups[test]) and len(train) + len(test) == 150
    labelled = cc._labelled_split(y, groups, train, 0.5, 0.25, seed=0)
    assert set(labelled.rows) <= set(train) and set(labelled.fit) | set(labelled.val) == set(labelled.rows)
    assert set(groups[labelled.fit]).isdisjoint(groups[labelled.val]) and not set(labelled.val) & set(test)
    # stratified: every class in test; the validation split keeps at least one crop per class to train on
    train, test = cc._test_split(y, None, 0.2, seed=0)
    assert {c: (y[test] == c).sum() for c in "abc"} == {"a": 10, "b": 10, "c": 10}
    labelled = cc._labelled_split(y, None, train, 0.1, 0.2, seed=0)
    assert len(labelled.rows) == 12 and set(y[labelled.fit]) == set("abc") and len(labelled.val) == 3


def test_test_split_refuses_one_class_and_single_crop_classes():
    with pytest.raises(InputError, match=r"one class \(\['a'\]\)"):
        cc._test_split(np.array(["a"] * 10), None, 0.2, seed=0)
    y = np.array(["a"] * 10 + ["b"] * 10 + ["c"])
    with pytest.raises(InputError, match=r"classes \['c'\] have a single labelled crop"):
        cc._test_split(y, None, 0.2, seed=0)
    train, test = cc._test_split(y, np.arange(21) % 7, 0.2, seed=0)  # by group: no stratification needed
    assert len(train) + len(test) == 21


def test_subsample_is_stratified_with_two_per_class():
    y = np.array(["a"] * 1000 + ["b"] * 10)
    rows = cc._subsample(y, 101, seed=0)
    assert (y[rows] == "a").sum() == 100 and (y[rows] == "b").sum() == 2 and np.all(np.diff(rows) > 0)


def _fake_entry(fits: list) -> cc.Entry:
    """An entry whose validation score is its setting (+0.5 with TTA) and whose test score is a tenth of it."""

    def report(value: float) -> ClassificationReport:
        return ClassificationReport(classes=["x"], accuracy=value, macro_f1=value, balanced_accuracy=value,
                                    roc_auc={"x": math.nan}, macro_roc_auc=math.nan, confusion=np.ones((1, 1)),
                                    per_class=pd.DataFrame({"precision": [1.0], "recall": [1.0], "f1": [1.0],
                                                            "support": [1]}, index=["x"]), n=1)

    def fit(setting, rows):
        fits.append((setting, len(rows)))
        return setting

    def score(model, rows, tta):
        return report(model + (0.5 if tta else 0.0) if len(rows) == 3 else 0.1 * model)

    return cc.Entry("fake", sslcell=True, candidates=[("low", 0.2), ("high", 0.4), ("mid", 0.3)], fit=fit,
                    score=score)


LABELLED = cc.Labelled(1.0, rows=np.arange(10), fit=np.arange(7), val=np.arange(7, 10))


def test_evaluate_chooses_on_validation_and_refits_on_all_labels(tmp_path):
    """The best validation setting is chosen and refitted on all labelled rows."""
    fits = []
    store = FitStore(tmp_path, resume=False)
    rows, grid, reports = cc._evaluate(_fake_entry(fits), LABELLED, np.arange(20, 25), True, store, {})
    assert fits == [(0.2, 7), (0.4, 7), (0.3, 7), (0.4, 10)]
    assert [r["entry"] for r in rows] == ["fake", "fake + TTA"] and rows[0]["setting"] == "high"
    assert rows[0]["val_macro_f1"] == 0.4 and rows[1]["val_macro_f1"] == 0.9
    assert rows[0]["accuracy"] == pytest.approx(0.04) and ("fake + TTA", "100%") in reports
    assert [g["chosen"] for g in grid] == ["", "yes", ""]
    assert len(list(tmp_path.glob("*.json"))) == 4 and store.resumed == []  # written, never read without resume


def test_evaluate_resumes_only_the_trainings_an_earlier_run_finished(tmp_path):
    fits = []
    first = cc._evaluate(_fake_entry(fits), LABELLED, np.arange(20, 25), True, FitStore(tmp_path / "a", resume=False),
                         {})
    killed = _fake_entry(fits)
    fit = killed.fit

    def killed_fit(setting, rows):
        if len(fits) == 6:  # 4 fits of the first run, 2 of this one: killed while training the third candidate
            raise KeyboardInterrupt
        return fit(setting, rows)

    killed.fit = killed_fit
    with pytest.raises(KeyboardInterrupt):
        cc._evaluate(killed, LABELLED, np.arange(20, 25), True, FitStore(tmp_path, resume=False), {})
    assert len(list(tmp_path.glob("*.json"))) == 2
    fits.clear()
    store = FitStore(tmp_path, resume=True)
    again = cc._evaluate(_fake_entry(fits), LABELLED, np.arange(20, 25), True, store, {})
    assert fits == [(0.3, 7), (0.4, 10)] and len(store.resumed) == 2 and "Resumed" in store.note()
    assert again[0] == first[0] and again[1] == first[1]
    # other data (or another setting, rows, seed...) is another key: trained again, never a stale result
    fits.clear()
    cc._evaluate(_fake_entry(fits), LABELLED, np.arange(20, 25), True, FitStore(tmp_path, resume=True), {"seed": 1})
    assert len(fits) == 4


@dataclasses.dataclass
class _Seeded:
    value: float
    seed: int = 0


def _seeded_entry(fits: list) -> cc.Entry:
    """``_fake_entry`` with settings that have a training seed; a test score of value / 10 + seed / 100."""
    entry = _fake_entry(fits)
    fit, score = entry.fit, entry.score
    entry.candidates = [(label, _Seeded(value)) for label, value in entry.candidates]
    entry.fit = lambda setting, rows: (fit(setting, rows), setting)[1]
    entry.score = lambda s, rows, tta: (score(s.value, rows, tta) if len(rows) == 3 else
                                        score(s.value + s.seed / 10, rows, tta))
    return entry


def test_repeat_seeds_train_the_chosen_setting_again_with_the_next_seeds(tmp_path):
    fits = []
    store = FitStore(tmp_path, resume=False)
    rows, _, _ = cc._evaluate(_seeded_entry(fits), LABELLED, np.arange(20, 25), False, store, {}, repeat_seeds=2)
    assert [(s.value, s.seed, n) for s, n in fits] == [(0.2, 0, 7), (0.4, 0, 7), (0.3, 0, 7), (0.4, 0, 10),
                                                       (0.4, 1, 10), (0.4, 2, 10)]
    (row,) = rows
    assert row["seeds"] == [0, 1, 2] and row["accuracy"] == pytest.approx(0.04)  # the first seed's, as before
    assert row["accuracy_seeds"] == pytest.approx([0.04, 0.05, 0.06])
    assert len(list(tmp_path.glob("*.json"))) == 6  # each seed its own stored training, read back by --resume
    fits.clear()
    again, _, _ = cc._evaluate(_seeded_entry(fits), LABELLED, np.arange(20, 25), False, FitStore(tmp_path, resume=True),
                               {}, repeat_seeds=2)
    assert fits == [] and again == rows
    # a setting without a seed (a deterministic fit) is not repeated
    plain, _, _ = cc._evaluate(_fake_entry([]), LABELLED, np.arange(20, 25), False,
                               FitStore(tmp_path / "p", resume=False), {}, repeat_seeds=2)
    assert "seeds" not in plain[0]
    assert cc._spread([0.04, 0.05, 0.06]) == "0.050 ± 0.010"


def test_stored_fine_tuning_settings_keep_their_keys_when_fields_are_added():
    """Every fine-tuning setting in the committed store is what ``_asdict`` makes of it today: a FinetuneConfig field
    added since (at its default) does not change the key, so ``--resume`` still reads those trainings back."""
    from sslcell.classify import FinetuneConfig

    settings = [json.loads(path.read_text())["parts"]["setting"]
                for path in sorted((ROOT / "benchmarks" / "store").glob("*/*/fits/*.json"))]
    settings = [s for s in settings if isinstance(s, dict) and "encoder_lr_factor" in s]
    assert len(settings) >= 10
    for setting in settings:
        assert cc._asdict(FinetuneConfig.from_dict(setting)) == setting
    assert "mixup" in cc._asdict(FinetuneConfig(head="full", mixup=0.8))  # a setting away from the default counts


def test_fit_store_refuses_a_corrupt_file_and_names_it(tmp_path):
    store = FitStore(tmp_path, resume=True)
    key = store.key(a=1)
    assert key != store.key(a=2) and store.get(key, "x") is None
    store.put(key, {"v": 1.5})
    assert store.get(key, "x") == {"v": 1.5} and not list(tmp_path.glob(".*"))  # no temporary file left
    (tmp_path / f"{key}.json").write_text('{"value": ')
    with pytest.raises(FileFormatError, match=key):
        store.get(key, "x")


def test_fit_store_writes_what_its_key_hashes_beside_the_value(tmp_path):
    store = FitStore(tmp_path, resume=False)
    key = store.key(data=[["", 3, "abc"]], seed=0)
    store.put(key, {"v": 1})
    stored = json.loads((tmp_path / f"{key}.json").read_text())
    assert stored["parts"]["data"] == [["", 3, "abc"]] and stored["parts"]["seed"] == 0
    assert stored["parts"]["versions"]["sslcell"] and stored["value"] == {"v": 1}


def test_data_identity_is_the_content_not_the_path_or_mtime(tmp_path):
    """Shared data copied again at each session start (new mtime) or reached elsewhere still resumes; new bytes
    never do."""
    first = tmp_path / "a" / "crops.npz"
    first.parent.mkdir()
    first.write_bytes(b"crops" * 1000)
    identity = cc._data_identity(first)
    os.utime(first, (1, 1))
    again = tmp_path / "b" / "crops.npz"
    again.parent.mkdir()
    again.write_bytes(first.read_bytes())
    assert cc._data_identity(first) == identity == cc._data_identity(again)
    again.write_bytes(b"crops" * 999 + b"CROPS")
    assert cc._data_identity(again) != identity
    folder = tmp_path / "zarr"
    (folder / "x").mkdir(parents=True)
    (folder / "x" / "0").write_bytes(b"1")
    (folder / "y").write_bytes(b"2")
    assert [name for name, _, _ in cc._data_identity(folder)] == ["x/0", "y"]


def test_supervised_cnn_learns_a_visible_class_and_never_predicts_an_absent_one(tmp_path):
    cells = _crops()
    cells.obs["label"] = cells.obs["label"].astype("category").cat.add_categories(["never"])
    codes = cells.obs["label"].cat.codes.to_numpy()
    state = torch.random.get_rng_state()
    classifier = train_cnn(cells, codes, ["a", "b", "never"], CNNSettings(lr=3e-3, epochs=15, widths=[8, 16, 16],
                                                                          batch_size=16), torch.device("cpu"))
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's random state is kept
    batch = torch.from_numpy(cells.batch(np.arange(len(cells))))
    proba = classifier.predict_proba(batch, tta=True)
    assert proba.shape == (80, 3) and float(proba[:, 2].max()) < 1e-3
    assert (proba.argmax(1).numpy() == codes).mean() > 0.9
    # the fine-tuning loop with the baseline's recipe, on the registered plain_cnn encoder
    recipe = classifier.info["finetune"]
    assert (recipe["schedule"], recipe["balance"], recipe["init_head"], recipe["encoder_lr_factor"]) == (
        "one_cycle", "loss", "random", 1.0)
    assert (recipe["weight_decay"], recipe["dropout"], recipe["batch_size"]) == (0.01, 0.2, 16)
    assert classifier.info["epochs"] == 15 and classifier.info["steps"] == 15 * 5  # 80 crops, batches of 16
    assert classifier.base["encoder"] == {"name": "plain_cnn", "options": {"widths": [8, 16, 16]}}
    assert classifier.info["settings"]["widths"] == [8, 16, 16]
    # it saves and loads like any classifier, and predicts the same
    loaded = load_classifier(save_classifier(classifier, tmp_path / "cnn"))
    torch.testing.assert_close(loaded.predict_proba(batch), classifier.predict_proba(batch))


def test_supervised_cnn_min_steps_raises_the_epochs_when_labels_are_few():
    """20 crops at batch 16: one step an epoch (the partial batch is dropped), so 2 epochs give 2 steps; asking
    for at least 7 steps runs 7 epochs."""
    cells = _crops(10)
    codes = cells.obs["label"].astype("category").cat.codes.to_numpy()
    settings = CNNSettings(epochs=2, widths=[4, 8], batch_size=16, min_steps=7)
    classifier = train_cnn(cells, codes, ["a", "b"], settings, torch.device("cpu"))
    assert classifier.info["epochs"] == 7 and classifier.info["steps"] == 7
    assert settings.label() == "lr 0.003, 2 epochs, >= 7 steps"


def test_params_check_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match="label_fractions"):
        cc.CropClassificationParams(label_fractions=[0.0]).check()
    with pytest.raises(ConfigError, match="cnn_epochs"):
        cc.CropClassificationParams(cnn_epochs=[]).check()
    with pytest.raises(ConfigError, match="cnn_min_steps"):
        cc.CropClassificationParams(cnn_min_steps=-1).check()
    with pytest.raises(ConfigError, match="finetune_min_steps"):
        cc.CropClassificationParams(finetune_min_steps=-1).check()
    with pytest.raises(ConfigError, match="finetune_init_heads"):
        cc.CropClassificationParams(finetune_init_heads=["probe"]).check()
    with pytest.raises(ConfigError, match="finetune_epoch_grid"):
        cc.CropClassificationParams(finetune_epoch_grid=[30, 0]).check()
    with pytest.raises(ConfigError, match="layer_decays"):
        cc.CropClassificationParams(layer_decays=[0.75, 0.0]).check()
    suite = {"name": "s", "tasks": [{"kind": "crop_classification", "data": str(tmp_path),
                                     "params": {"pca_class_weights": [2.0]}}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(suite))
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.params\.pca_class_weights"):
        load_suite(tmp_path / "s.yaml")


def _synthetic_suite(tmp_path, **params) -> Path:
    """80 crops of 2 classes (a bright square marks class b) in 8 smears; a 1-epoch tiny SimCLR recipe."""
    cells = _crops()
    np.savez(tmp_path / "crops.npz", images=np.asarray(cells.images), labels=np.repeat([0, 1], 40),
             label_names=np.array(["a", "b"]), smear=np.arange(80) % 8)
    recipe = {"modality": "image", "method": {"name": "simclr", "projection_dim": 8, "projection_hidden": 16},
              "encoder": {"name": "resnet_tiny", "options": {"base_width": 4}}, "data": {"batch_size": 16},
              "train": {"max_epochs": 1}}
    suite = {"name": "s", "out": "out", "tasks": [{
        "name": "toy", "kind": "crop_classification", "data": str(tmp_path / "crops.npz"),
        "params": {"group_key": "smear", "label_fractions": [1.0, 0.5], "cnn_widths": [8, 16, 16], "cnn_batch_size": 16,
                   "cnn_lrs": [0.003, 0.0001], "cnn_epochs": [15], "pca_components": 10, **params},
        "recipes": [{"name": "tiny", "config": recipe, "finetune": {"epochs": 2, "batch_size": 16}}],
        "baselines": ["pixel_pca", "random_encoder", "supervised_cnn"]}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(suite))
    return tmp_path / "s.yaml"


def test_synthetic_task_end_to_end_with_tta(tmp_path):
    run = run_suite(load_suite(_synthetic_suite(tmp_path, repeat_seeds=1)), workdir=tmp_path / "work", device="cpu",
                    progress=False)
    assert run.errors == {}
    result = run.results["toy"]
    rows = {(r["entry"], r["labels"]): r for r in result.raw["rows"]}
    cnn = rows["supervised CNN from scratch (8-16-16) + TTA", "100%"]
    assert cnn["setting"] == "lr 0.003, 15 epochs" and cnn["accuracy"] > 0.9  # the square is easy to see
    assert rows["raw pixels PCA-10 + logistic", "100%"]["accuracy"] > 0.9
    for entry in ("sslcell tiny + linear probe", "sslcell tiny + fine-tune + TTA",
                  "random-weight resnet_tiny (tiny's encoder) + linear probe + TTA"):
        assert {(entry, "100%"), (entry, "50%")} <= set(rows)
    # targets: the validation-chosen sslcell row against the validation-chosen CNN row, on test scores
    for labels in ("100%", "50%"):
        ours = max((r for r in result.raw["rows"] if r["family"] == "sslcell" and r["labels"] == labels),
                   key=lambda r: r["val_macro_f1"])
        cnn = max((r for r in result.raw["rows"] if r["entry"].startswith("supervised") and r["labels"] == labels),
                  key=lambda r: r["val_macro_f1"])
        target = next(t for t in result.targets if t.name.startswith(labels) and t.name.endswith("accuracy"))
        assert target.value == pytest.approx(ours["accuracy"] / cnn["accuracy"])
    grid = [g for g in result.raw["grid"] if g["entry"].startswith("supervised") and g["labels"] == "100%"]
    assert [g["setting"] for g in grid] == ["lr 0.003, 15 epochs", "lr 0.0001, 15 epochs"]
    assert sum(g["chosen"] == "yes" for g in grid) == 1
    assert (tmp_path / "out" / result.plots[0]).is_file()
    text = run.markdown_path.read_text()
    assert "by smear (GroupShuffleSplit" in text
    # repeat_seeds: 1: the chosen CNN and sslcell settings trained again with the next seed; PCA is not repeated
    assert cnn["seeds"] == [0, 1] and len(cnn["accuracy_seeds"]) == 2 and cnn["accuracy_seeds"][0] == cnn["accuracy"]
    assert "seeds" not in rows["raw pixels PCA-10 + logistic", "100%"]
    assert "test scores over training seeds" in text and "Over 2 training seeds (100% labels" in text


def test_a_resumed_run_gives_the_same_table_as_the_run_it_resumes(tmp_path):
    """Half the stored trainings deleted (a killed run): --resume trains only those and every number is the same."""
    path = _synthetic_suite(tmp_path, label_fractions=[1.0], tta=False)
    first = run_suite(load_suite(path), workdir=tmp_path / "work", device="cpu", progress=False)
    stored = sorted((tmp_path / "work" / "toy" / "fits").glob("*.json"))
    assert first.errors == {} and len(stored) == 12  # candidates + the chosen: PCA 2+1, CNN 2+1, 3 x 1+1
    for f in stored[::2]:
        f.unlink()
    again = run_suite(load_suite(path), workdir=tmp_path / "work", device="cpu", progress=False, resume=True)
    assert again.errors == {} and len(again.results["toy"].raw["resumed"]) == 6
    def scores(run):  # every row but its seconds (those trained again took their own time)
        return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in run.results["toy"].raw["rows"]]

    assert scores(again) == scores(first)
    assert "Resumed from --workdir" in again.markdown_path.read_text()
    with pytest.raises(ConfigError, match="--resume"):
        run_suite(load_suite(path), device="cpu", progress=False, resume=True)


def test_a_killed_pretraining_goes_on_from_its_checkpoint_with_resume(tmp_path, monkeypatch):
    from pytorch_lightning import Callback

    from sslcell import train

    class Killed(Callback):
        def on_train_epoch_end(self, trainer, module):  # after the run's own end-of-epoch checkpoint
            raise RuntimeError("killed after epoch 1")

    resumed, real = [], train.pretrain

    def pretrain(*args, **kwargs):
        resumed.append(kwargs.get("resume", False))
        return real(*args, **kwargs, callbacks=[Killed()] if len(resumed) == 1 else None)

    monkeypatch.setattr(train, "pretrain", pretrain)
    path = _synthetic_suite(tmp_path, reuse_pretrained=True, label_fractions=[1.0], pretrain_epochs=2)

    def run(**kwargs):
        suite = load_suite(path)
        suite.tasks[0].baselines = []
        return run_suite(suite, workdir=tmp_path / "work", device="cpu", progress=False, **kwargs)

    assert "killed after epoch 1" in run().errors["toy"]
    out = tmp_path / "work" / "toy" / "tiny"
    steps = train.read_checkpoint(out / "checkpoints" / train.LAST)["global_step"]
    assert steps > 0 and (out / cc.PRETRAINING_AS).is_file() and not (out / cc.PRETRAINED_AS).exists()
    again = run(resume=True)
    assert again.errors == {} and resumed == [False, True]
    assert train.read_checkpoint(out / "checkpoints" / train.LAST)["global_step"] == 2 * steps  # the second epoch
    assert {r["pretrain_s"].endswith("s after resuming") for r in again.results["toy"].raw["rows"]} == {True}
    assert (out / cc.PRETRAINED_AS).is_file() and not (out / cc.PRETRAINING_AS).exists()
    assert {r["pretrain_s"] for r in run(resume=True).results["toy"].raw["rows"]} == {"reused"}


def test_resume_reuses_a_pretraining_the_killed_run_finished(tmp_path, monkeypatch):
    """Without reuse_pretrained, a run killed while fine-tuning pretrained again on --resume (hours with full
    settings): a finished model of the same recipe and crops is read back; a run without --resume trains anew."""
    from sslcell import train

    calls, real = [], train.pretrain
    monkeypatch.setattr(train, "pretrain", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(**kwargs):
        suite = load_suite(_synthetic_suite(tmp_path, label_fractions=[1.0], tta=False))
        suite.tasks[0].baselines = []
        return run_suite(suite, workdir=tmp_path / "work", device="cpu", progress=False, **kwargs)

    assert run().errors == {} and len(calls) == 1
    again = run(resume=True)
    assert again.errors == {} and len(calls) == 1
    assert {r["pretrain_s"] for r in again.results["toy"].raw["rows"]} == {"reused"}
    assert run().errors == {} and len(calls) == 2


def test_a_pretraining_killed_before_its_first_checkpoint_never_resumes_another_recipes(tmp_path, monkeypatch):
    """Recipe A finished in the folder; B is killed before it writes anything: --resume trains B from the start,
    never from A's checkpoint under B's marker."""
    from sslcell import train

    resumed, real = [], train.pretrain

    def pretrain(*args, **kwargs):
        resumed.append(kwargs.get("resume", False))
        if len(resumed) == 2:
            raise RuntimeError("killed at once")
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "pretrain", pretrain)

    def run(epochs, **kwargs):
        suite = load_suite(_synthetic_suite(tmp_path, reuse_pretrained=True, label_fractions=[1.0],
                                            pretrain_epochs=epochs))
        suite.tasks[0].baselines = []
        return run_suite(suite, workdir=tmp_path / "work", device="cpu", progress=False, **kwargs)

    assert run(1).errors == {}
    assert "killed at once" in run(2).errors["toy"]
    out = tmp_path / "work" / "toy" / "tiny"
    assert (out / cc.PRETRAINING_AS).is_file() and not (out / "checkpoints" / train.LAST).exists()
    assert run(2, resume=True).errors == {} and resumed == [False, False, False]


def test_reuse_pretrained_only_for_the_same_recipe_data_and_crops(tmp_path):
    def pretrain_seconds(invert=False, **params):
        suite = load_suite(_synthetic_suite(tmp_path, reuse_pretrained=True, label_fractions=[1.0], **params))
        if invert:  # the same file name, shape and labels, other pixels
            with np.load(tmp_path / "crops.npz") as f:
                arrays = dict(f)
            arrays["images"] = arrays["images"].max() - arrays["images"]
            np.savez(tmp_path / "crops.npz", **arrays)
        suite.tasks[0].baselines = []
        run = run_suite(suite, workdir=tmp_path / "work", device="cpu", progress=False)
        assert run.errors == {}
        return {r["pretrain_s"] for r in run.results["toy"].raw["rows"]}

    assert pretrain_seconds() != {"reused"}
    assert pretrain_seconds() == {"reused"}
    assert pretrain_seconds(pretrain_epochs=2) != {"reused"}  # another recipe
    assert pretrain_seconds(pretrain_epochs=2, test_size=0.3) != {"reused"}  # other crops
    assert pretrain_seconds(pretrain_epochs=2, test_size=0.3) == {"reused"}
    assert pretrain_seconds(invert=True, pretrain_epochs=2, test_size=0.3) != {"reused"}  # other bytes, same path


def test_cnn_must_get_at_least_the_finetuning_budget(tmp_path):
    run = run_suite(load_suite(_synthetic_suite(tmp_path, cnn_epochs=[1])), progress=False)
    assert "at least the recipes' fine-tuning budget (2 epochs)" in run.errors["toy"]
    run = run_suite(load_suite(_synthetic_suite(tmp_path, cnn_epochs=[15], finetune_epoch_grid=[2, 20])),
                    progress=False)
    assert "at least the recipes' fine-tuning budget (20 epochs)" in run.errors["toy"]  # the grid's largest
    run = run_suite(load_suite(_synthetic_suite(tmp_path, finetune_min_steps=40, cnn_min_steps=30)), progress=False)
    assert "params.cnn_min_steps 30" in run.errors["toy"]
    assert "at least the recipes' fine-tuning budget (40 steps)" in run.errors["toy"]


def test_a_recipe_that_fine_tunes_with_mixup_is_probed_without_it():
    class Recipe:
        name, finetune = "tiny", {"mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1}

    cpu, params = torch.device("cpu"), cc.CropClassificationParams()
    probe = cc._finetune_config(Recipe, params, "linear", cpu)
    assert (probe.head, probe.mixup, probe.cutmix) == ("linear", 0.0, 0.0)
    [(_, full)] = cc._finetune_grid(Recipe, params, cpu)
    assert (full.mixup, full.cutmix, full.label_smoothing) == (0.8, 1.0, 0.1)


def test_cnn_min_steps_default_to_the_recipes_and_reach_both_sides():
    """Without cnn_min_steps the CNN gets the recipes' largest fine-tuning min_steps; finetune_min_steps overrides
    every recipe's (the entries are built, not trained)."""

    class Task:
        name, baselines, recipes = "toy", ["supervised_cnn"], []
        params = cc.CropClassificationParams(cnn_epochs=[3], finetune_min_steps=25)

    class Recipe:
        name, finetune = "tiny", {"epochs": 2, "min_steps": 5}

    Task.recipes = [Recipe]
    cells = _crops()
    cells.obs["label"] = cells.obs["label"].astype("category")
    ctx, cpu = SimpleNamespace(seed=0), torch.device("cpu")
    [entry] = cc._baselines(Task, ctx, cells, cells.obs["label"].to_numpy(), np.arange(80), cpu, 64)
    assert [s.min_steps for _, s in entry.candidates] == [25, 25] and entry.extra == {"min_steps": 25}
    assert cc._finetune_config(Recipe, Task.params, "full", cpu).min_steps == 25
    Task.params = cc.CropClassificationParams(cnn_epochs=[3])
    [entry] = cc._baselines(Task, ctx, cells, cells.obs["label"].to_numpy(), np.arange(80), cpu, 64)
    assert [s.min_steps for _, s in entry.candidates] == [5, 5]
    Task.params = cc.CropClassificationParams(cnn_epochs=[3], cnn_min_steps=9)
    [entry] = cc._baselines(Task, ctx, cells, cells.obs["label"].to_numpy(), np.arange(80), cpu, 64)
    assert [s.min_steps for _, s in entry.candidates] == [9, 9]


@pytest.mark.skipif(not (DATA / "jurkat_cellcycle_ifc_mlcp.npz").is_file(), reason="shared data not present")
def test_shipped_suite_runs_quick(tmp_path):
    suite = load_suite(SUITE, quick=True, out=tmp_path)
    assert [t.name for t in suite.tasks] == ["jurkat", "chula"]
    assert suite.tasks[0].params.channels == [0, 2] and suite.tasks[1].params.group_key == "image_id"
    run = run_suite(suite, workdir=tmp_path / "work", device="cpu", progress=False)
    assert run.errors == {}
    record = json.loads(run.json_path.read_text())
    for name, n_architectures, n_recipes, n_finetuned in (("jurkat", 3, 3, 2), ("chula", 2, 2, 2)):
        result = run.results[name]
        rows = result.raw["rows"]
        # per fraction (--quick: no TTA rows): PCA, a random encoder per architecture, the CNN, a probe per recipe,
        # fine-tuning for the recipes not in probe_only
        assert len(rows) == 2 * (1 + n_architectures + 1 + n_recipes + n_finetuned)
        assert {r["labels"] for r in rows} == {"100%", "10%"}
        for r in rows:
            for key in ("accuracy", "macro_f1", "val_macro_f1"):
                assert 0.0 <= r[key] <= 1.0
            assert math.isfinite(r["balanced_accuracy"])
        assert len(result.targets) == 4 and all(t.value >= 0 for t in result.targets)
        assert (tmp_path / result.plots[0]).is_file()
        assert record["tasks"][name]["raw"]["n_test"] == result.raw["n_test"]
        assert result.raw["n_cells"] <= 260
    jurkat = run.results["jurkat"].raw
    assert jurkat["labelled"]["10%"]["n"] < jurkat["labelled"]["100%"]["n"] == jurkat["n_train"]
    text = run.markdown_path.read_text()
    assert "supervised CNN from scratch" in text and "every candidate setting" in text and "(--quick)" in text


def test_pretrained_as_matches_the_same_file_reached_from_another_folder(tmp_path):
    """A model pretrained from one checkout (data reached as ``suites/../data``) is reused from another."""
    (tmp_path / "data").mkdir()
    (tmp_path / "suites").mkdir()
    (tmp_path / "data" / "x.npz").write_bytes(b"")
    config, rows = SimpleNamespace(to_dict=lambda: {"lr": 1}), np.arange(5)
    stored = cc._pretraining(config, tmp_path / "suites" / ".." / "data" / "x.npz", ["a"], rows)
    stored["data"] = str(tmp_path / "suites" / ".." / "data" / "x.npz")  # as older runs wrote it, unresolved
    (tmp_path / cc.PRETRAINED_AS).write_text(json.dumps(stored))
    assert cc._pretrained_as(tmp_path) == cc._pretraining(config, tmp_path / "data" / "x.npz", ["a"], rows)
    assert cc._pretrained_as(tmp_path) != cc._pretraining(config, tmp_path / "data" / "x.npz", ["a"], rows[:4])
    (tmp_path / cc.PRETRAINED_AS).write_text("[1, 2]")  # not ours: never reused
    assert cc._pretrained_as(tmp_path) is None


def test_finetune_grid_crosses_encoder_rates_and_head_starts(tmp_path):
    suite = load_suite(_synthetic_suite(tmp_path, label_fractions=[1.0], encoder_lr_factors=[0.5, 1.0],
                                        finetune_init_heads=["linear_probe", "random"]))
    suite.tasks[0].baselines = []
    run = run_suite(suite, workdir=tmp_path / "work", device="cpu", progress=False)
    assert run.errors == {}
    grid = [g for g in run.results["toy"].raw["grid"] if g["entry"] == "sslcell tiny + fine-tune"]
    assert [g["setting"] for g in grid] == [
        "encoder lr x0.5, 2 epochs, linear_probe head", "encoder lr x1, 2 epochs, linear_probe head",
        "encoder lr x0.5, 2 epochs, random head", "encoder lr x1, 2 epochs, random head"]
    assert sum(g["chosen"] == "yes" for g in grid) == 1


def test_finetune_grid_crosses_layer_decays():
    """layer_decays: a grid axis like the encoder rate; each candidate carries its decay, the label names it."""
    recipe = SimpleNamespace(finetune={"epochs": 2, "encoder_lr_factor": 0.5})
    params = cc.CropClassificationParams(layer_decays=[0.65, 0.75], finetune_epoch_grid=[30, 60])
    grid = cc._finetune_grid(recipe, params, torch.device("cpu"))
    assert [label for label, _ in grid] == [
        "encoder lr x0.5, layer decay 0.65, 30 epochs", "encoder lr x0.5, layer decay 0.75, 30 epochs",
        "encoder lr x0.5, layer decay 0.65, 60 epochs", "encoder lr x0.5, layer decay 0.75, 60 epochs"]
    assert [(c.layer_decay, c.epochs, c.encoder_lr_factor) for _, c in grid] == [
        (0.65, 30, 0.5), (0.75, 30, 0.5), (0.65, 60, 0.5), (0.75, 60, 0.5)]
    no_axis = cc._finetune_grid(SimpleNamespace(finetune={"layer_decay": 0.8}), cc.CropClassificationParams(),
                                torch.device("cpu"))
    assert [(label, c.layer_decay) for label, c in no_axis] == [("encoder lr x0.25, 30 epochs", 0.8)]


def test_finetune_grid_crosses_learning_rates():
    """finetune_lrs: the peak rate as a grid axis (the CNN's cnn_lrs on the other side); the label names it."""
    recipe = SimpleNamespace(finetune={"lr": 0.002, "encoder_lr_factor": 1.0})
    params = cc.CropClassificationParams(finetune_lrs=[1e-3, 3e-3], finetune_init_heads=["random"],
                                         finetune_epoch_grid=[30, 60])
    grid = cc._finetune_grid(recipe, params, torch.device("cpu"))
    assert [label for label, _ in grid] == [
        "lr 0.001, encoder lr x1, 30 epochs, random head", "lr 0.003, encoder lr x1, 30 epochs, random head",
        "lr 0.001, encoder lr x1, 60 epochs, random head", "lr 0.003, encoder lr x1, 60 epochs, random head"]
    assert [(c.lr, c.epochs, c.init_head) for _, c in grid] == [
        (1e-3, 30, "random"), (3e-3, 30, "random"), (1e-3, 60, "random"), (3e-3, 60, "random")]
    own = cc._finetune_grid(recipe, cc.CropClassificationParams(), torch.device("cpu"))
    assert [(label, c.lr) for label, c in own] == [("encoder lr x1, 30 epochs", 0.002)]
    with pytest.raises(ConfigError, match="finetune_lrs"):
        cc.CropClassificationParams(finetune_lrs=[0.001, 0.0]).check()


def test_finetune_grid_crosses_epochs(tmp_path):
    """finetune_epoch_grid: each count a candidate (the recipe's own 2 epochs replaced); the chosen one is the
    count the final model trains for."""
    suite = load_suite(_synthetic_suite(tmp_path, label_fractions=[1.0], encoder_lr_factors=[1.0],
                                        finetune_epoch_grid=[1, 3]))
    suite.tasks[0].baselines = []
    run = run_suite(suite, workdir=tmp_path / "work", device="cpu", progress=False)
    assert run.errors == {}
    grid = [g for g in run.results["toy"].raw["grid"] if g["entry"] == "sslcell tiny + fine-tune"]
    assert [g["setting"] for g in grid] == ["encoder lr x1, 1 epochs", "encoder lr x1, 3 epochs"]
    chosen = next(g["setting"] for g in grid if g["chosen"] == "yes")
    row = next(r for r in run.results["toy"].raw["rows"] if r["entry"] == "sslcell tiny + fine-tune")
    assert row["setting"] == chosen and f"{row['epochs']} epochs" in chosen


def test_pixel_pca_name_says_when_few_crops_clip_the_components():
    cells = _crops(n_per_class=10)
    y = cells.obs["label"].to_numpy()
    p = cc.CropClassificationParams(pca_components=10)
    assert cc._pixel_pca_entry(cells, y, ["a", "b"], p, 0, fewest_fit=11).name == "raw pixels PCA-10 + logistic"
    clipped = cc._pixel_pca_entry(cells, y, ["a", "b"], p, 0, fewest_fit=6)
    assert "PCA-10" not in clipped.name and "up to 10 components" in clipped.name
    x, _ = clipped.fit(0.0, np.array([0, 1, 2, 10, 11, 12]))
    assert x.shape == (20, 5)  # what the name says: one component fewer than the 6 training crops


def test_fine_tuning_trains_with_the_suites_seed_unless_the_recipe_sets_one():
    """As the CNN does (CNNSettings.seed is the suite's); seed 0 keeps the settings and stored keys as they were."""
    cpu, params = torch.device("cpu"), cc.CropClassificationParams()
    own = SimpleNamespace(finetune={"epochs": 2})
    assert cc._finetune_config(own, params, "linear", cpu, seed=3).seed == 3
    assert [c.seed for _, c in cc._finetune_grid(own, params, cpu, seed=3)] == [3]
    assert cc._finetune_config(own, params, "full", cpu).seed == 0
    assert cc._finetune_config(SimpleNamespace(finetune={"seed": 9}), params, "full", cpu, seed=3).seed == 9
