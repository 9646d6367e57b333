"""finetune on expression models: the three heads, validation split and early stopping, supervised contrastive
loss, class balancing, save / load, backed files and the CLI."""

from __future__ import annotations

import importlib

import anndata as ad
import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses, miners

import sslcell
from sslcell.classify import FinetuneConfig, finetune, load_classifier, save_classifier
from sslcell.classify.finetune import _validation_mask
from sslcell.classify.objectives import EarlyStopping, SupervisedLoss
from sslcell.cli import main
from sslcell.data.expression import CountRows, ExpressionDataset, open_counts
from sslcell.errors import ConfigError, InputError
from sslcell.inference import embed_rows
from tests.conftest import tiny_recipe


def config(head: str, **values) -> FinetuneConfig:
    base = {"head": head, "epochs": 15, "batch_size": 32, "progress_bar": False, "accelerator": "cpu",
            "precision": "32-true", "hidden_dim": 32}
    return FinetuneConfig(**{**base, **values})


@pytest.fixture(scope="module")
def model(small_counts, tmp_path_factory):
    return sslcell.pretrain(tiny_recipe("mae", train={"max_epochs": 10}, encoder={"latent": 16}), small_counts,
                            tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="module")
def split(small_counts):
    return small_counts[:300].copy(), small_counts[300:].copy()


def accuracy(classifier, adata) -> float:
    """Accuracy of ``sslcell.tl.predict`` (the user's path) against ``obs["cell_type"]``."""
    scored = sslcell.tl.predict(adata, classifier, copy=True)
    return float(np.mean(scored.obs["sslcell_pred"].astype(str) == scored.obs["cell_type"].astype(str)))


def counts(adata, model, n: int) -> torch.Tensor:
    """The first ``n`` cells' counts over the model's genes ``(n, G)``."""
    with open_counts(adata, model.inputs.genes) as dataset:
        return torch.from_numpy(dataset.read_rows(0, n).toarray())


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


# 4 overlapping types, chance 0.25; the tiny frozen encoder's embedding limits the frozen heads (scikit-learn's
# logistic regression and MLP on it: 0.62); fine-tuning the encoder reaches ~0.9
MIN_ACCURACY = {"linear": 0.5, "mlp": 0.5, "full": 0.8}


@pytest.mark.parametrize("head", ["linear", "mlp", "full"])
def test_every_head_learns_the_cell_types_and_leaves_the_model_unchanged(model, split, head):
    train, test = split
    before = state(model)
    classifier = finetune(train, model, "cell_type", config(head))
    assert accuracy(classifier, test) > MIN_ACCURACY[head]
    for key, value in state(model).items():
        torch.testing.assert_close(value, before[key])
    encoder_moved = any(not torch.equal(p, q) for p, q in
                        zip(classifier.encoder.state_dict().values(), model.encoder.state_dict().values(), strict=True))
    assert encoder_moved == (head == "full")
    assert (classifier.hidden is not None) == (head == "mlp")
    assert classifier.info["n_train"] == train.n_obs


def test_mlp_head_round_trips_through_save_and_load(model, split, tmp_path):
    train, test = split
    classifier = finetune(train, model, "cell_type", config("mlp", epochs=3))
    save_classifier(classifier, tmp_path / "clf")
    loaded = load_classifier(tmp_path / "clf")
    batch = counts(test, model, 20)
    torch.testing.assert_close(loaded.predict_proba(batch), classifier.predict_proba(batch))
    assert loaded.hidden_dim == 32


def test_full_finetuning_reads_a_backed_file_like_the_same_cells_in_memory(model, split, tmp_path):
    train, _ = split
    train.write_h5ad(tmp_path / "train.h5ad")
    import anndata as ad

    backed = ad.read_h5ad(tmp_path / "train.h5ad", backed="r")
    a = finetune(backed, model, "cell_type", config("full", epochs=2))
    b = finetune(train, model, "cell_type", config("full", epochs=2))
    for key, value in a.state_dict().items():
        torch.testing.assert_close(value, b.state_dict()[key])


def test_validation_mask_is_stratified_and_keeps_a_training_cell_per_class():
    codes = np.array([0] * 10 + [1] * 4 + [2] * 2 + [3])
    val = _validation_mask(codes, 0.2, seed=0)
    assert [int(val[codes == c].sum()) for c in range(4)] == [2, 1, 1, 0]
    assert not _validation_mask(codes, 0.0, seed=0).any()
    np.testing.assert_array_equal(val, _validation_mask(codes, 0.2, seed=0))


def test_validation_by_group_holds_out_whole_groups_balanced_by_class():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(20), 10)  # 20 images of 10 cells
    codes = rng.integers(0, 3, len(groups))
    val = _validation_mask(codes, 0.2, seed=1, groups=groups)
    assert set(groups[val]).isdisjoint(groups[~val])  # no image on both sides
    assert len(set(groups[val])) == 4 and val.sum() == 40  # one fold of five: a fifth of the images
    assert set(codes[val]) == {0, 1, 2}
    np.testing.assert_array_equal(val, _validation_mask(codes, 0.2, seed=1, groups=groups))
    assert not np.array_equal(val, _validation_mask(codes, 0.2, seed=2, groups=groups))
    with pytest.raises(InputError, match="1 group"):
        _validation_mask(codes, 0.2, seed=1, groups=np.zeros(len(codes), dtype=int))


def test_finetune_validates_on_the_groups_it_is_given(model, split):
    train = split[0].copy()
    train.obs["donor"] = np.where(np.arange(train.n_obs) < 100, "a", np.where(np.arange(train.n_obs) < 200, "b", "c"))
    classifier = finetune(train, model, "cell_type", config("mlp", epochs=2, val_fraction=0.3),
                          val_group_key="donor")
    assert classifier.info["validation"]["n_groups"] == 1 and classifier.info["validation"]["n_cells"] == 100
    train.obs.loc[train.obs_names[7], "donor"] = None
    with pytest.raises(InputError, match="no group for 1 labelled cell"):
        finetune(train, model, "cell_type", config("mlp", epochs=2, val_fraction=0.3), val_group_key="donor")
    with pytest.raises(InputError, match="no obs column 'plate' for val_group_key"):
        finetune(train, model, "cell_type", config("mlp", epochs=2, val_fraction=0.3), val_group_key="plate")
    with pytest.raises(InputError, match=rf"val_group_key has shape \(3,\) for {train.n_obs} cells"):
        finetune(train, model, "cell_type", config("mlp", epochs=2, val_fraction=0.3), val_group_key=["a", "b", "c"])
    with pytest.raises(ConfigError, match="val_fraction > 0"):
        finetune(train, model, "cell_type", config("mlp", epochs=2), val_group_key="donor")


def test_a_continuous_label_column_is_refused(model, split):
    train = split[0].copy()
    train.obs["size"] = np.linspace(0.5, 3.0, train.n_obs)  # one "class" per cell otherwise
    with pytest.raises(InputError, match=r"obs column 'size' holds continuous values"):
        finetune(train, model, "size", config("mlp", epochs=1))
    codes = (np.arange(train.n_obs) % 3).astype(float)
    codes[0] = np.nan  # an integer column with a missing label: pandas stores it as floats
    train.obs["code"] = codes
    classifier = finetune(train, model, "code", config("linear"))
    assert classifier.classes == ["0", "1", "2"]  # the classes an integer column of new cells is read as
    test = split[1].copy()
    test.obs["code"] = np.arange(test.n_obs) % 3
    sslcell.tl.predict(test, classifier, label_key="code")


def test_whole_group_validation_never_takes_every_cell_of_a_class(model, split):
    train = split[0].copy()
    first = train.obs["cell_type"].cat.categories[0]
    train.obs["donor"] = np.where(train.obs["cell_type"] == first, "a", "b")  # one donor per side of the split
    with pytest.raises(InputError, match="falls in the held-out groups"):
        finetune(train, model, "cell_type", config("mlp", epochs=1, val_fraction=0.2), val_group_key="donor")
    train.obs["donor"] = np.arange(train.n_obs) % 3  # 3 donors: one held out is a third, not a tenth
    with pytest.warns(UserWarning, match=r"the held-out groups hold 33% of the labelled cells \(val_fraction 0.1\)"):
        finetune(train, model, "cell_type", config("mlp", epochs=1, val_fraction=0.1), val_group_key="donor")


def test_early_stopping_keeps_the_best_epoch_and_stops_after_patience():
    net = torch.nn.Linear(2, 2)
    stopper = EarlyStopping(np.array([0, 1, 1]), patience=2)
    assert not stopper.update(0, np.array([1, 1, 1]), net)  # macro-F1 (0 + 0.8) / 2 = 0.4
    best = state(net)
    with torch.no_grad():
        net.weight.add_(1.0)
    assert not stopper.update(1, np.array([0, 0, 0]), net)  # (0.5 + 0) / 2 = 0.25: not better
    assert stopper.update(2, np.array([1, 0, 0]), net)  # 0.0: two epochs without a better score
    stopper.restore(net)
    for key, value in state(net).items():
        torch.testing.assert_close(value, best[key])
    assert stopper.summary()["best_epoch"] == 1 and stopper.summary()["best_macro_f1"] == pytest.approx(0.4)
    assert len(stopper.summary()["macro_f1_per_epoch"]) == 3


@pytest.mark.parametrize("head", ["mlp", "full"])
def test_validation_split_stops_early_and_restores_the_best_epoch(model, split, head):
    train, _ = split
    classifier = finetune(train, model, "cell_type", config(head, epochs=40, val_fraction=0.25, patience=2))
    info = classifier.info["validation"]
    history = info["macro_f1_per_epoch"]
    assert info["n_cells"] == 75 and classifier.info["n_train"] == 225
    assert len(history) < 40  # stopped early
    assert info["best_macro_f1"] == max(history) and history[info["best_epoch"] - 1] == max(history)
    assert len(history) - info["best_epoch"] == 2  # patience epochs after the best one


def test_linear_head_scores_its_validation_cells(model, split):
    train, _ = split
    classifier = finetune(train, model, "cell_type", config("linear", val_fraction=0.2))
    assert classifier.info["validation"]["n_cells"] == 60
    assert 0.0 < classifier.info["validation"]["best_macro_f1"] <= 1.0


def test_supervised_contrastive_loss_is_cross_entropy_plus_weighted_supcon():
    torch.manual_seed(0)
    logits, z = torch.randn(16, 3), torch.randn(16, 8)
    y = torch.arange(16) % 3
    plain = torch.nn.functional.cross_entropy(logits, y)
    torch.testing.assert_close(SupervisedLoss()(logits, z, y), plain)
    supcon = losses.SupConLoss(temperature=0.2)(z, y, miners.MultiSimilarityMiner(epsilon=0.1)(z, y))
    torch.testing.assert_close(SupervisedLoss(supcon_weight=0.5, supcon_temperature=0.2)(logits, z, y),
                               plain + 0.5 * supcon)


def test_supcon_trains_a_different_head(model, split):
    train, test = split
    plain = finetune(train, model, "cell_type", config("mlp", epochs=30))
    supcon = finetune(train, model, "cell_type", config("mlp", epochs=30, supcon_weight=1.0))
    assert not torch.equal(plain.head.weight, supcon.head.weight)
    assert accuracy(supcon, test) > 0.5


@pytest.mark.parametrize("values,field", [
    ({"head": "mlp2"}, "head"),
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"patience": 0}, "patience"),
    ({"hidden_dim": 0}, "hidden_dim"),
    ({"head": "linear", "supcon_weight": 1.0}, "supcon_weight"),
    ({"supcon_temperature": 0.0}, "supcon_temperature"),
])
def test_new_settings_are_validated(values, field):
    with pytest.raises(ConfigError, match=field):
        FinetuneConfig(**values)


def test_mixup_is_refused_for_expression_before_training(model, split, monkeypatch):
    monkeypatch.setattr("sslcell.classify.training.pl.Trainer.fit", lambda *a, **k: pytest.fail("trained"))
    module = importlib.import_module("sslcell.classify.finetune")  # the module: the package re-exports finetune()
    monkeypatch.setattr(module, "embed_rows", lambda *a, **k: pytest.fail("embedded"))
    with pytest.raises(ConfigError, match="mixup and cutmix: they blend crops"):
        finetune(split[0], model, "cell_type", config("full", mixup=0.8))


def test_count_rows_read_selects_rows_in_order(small_counts):
    dataset = ExpressionDataset.open(small_counts)
    rows = np.array([0, 5, 130, 399])
    selected = CountRows.read(dataset, rows, chunk_size=64)
    np.testing.assert_array_equal(selected.batch(np.arange(4)), small_counts.X[rows].toarray())
    with pytest.raises(Exception, match="increasing"):
        CountRows.read(dataset, np.array([5, 0]))


def test_the_probe_sees_the_embeddings_of_tl_embed(model, split):
    train, _ = split
    with open_counts(train, model.inputs.genes) as dataset:
        rows = CountRows.read(dataset, np.arange(train.n_obs))
    np.testing.assert_allclose(embed_rows(model, rows), sslcell.tl.embed(train, model, copy=True).obsm["X_sslcell"],
                               atol=1e-5)


def test_cli_finetunes_an_mlp_head_on_an_h5ad_and_predicts(model, split, tmp_path, capsys):
    train, test = split
    train.write_h5ad(tmp_path / "train.h5ad")
    test.write_h5ad(tmp_path / "test.h5ad")
    sslcell.save_model(model, tmp_path / "model")
    assert main(["finetune", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.h5ad"),
                 "--label-key", "fate", "--out", str(tmp_path / "clf")]) == 2
    assert "train.h5ad: no obs column 'fate'" in capsys.readouterr().err  # the error names the file
    assert main(["finetune", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.h5ad"),
                 "--label-key", "cell_type", "--out", str(tmp_path / "clf"), "--head", "mlp", "--epochs", "5",
                 "--hidden-dim", "16", "--val-fraction", "0.2", "--patience", "2", "--supcon-weight", "0.5"]) == 0
    loaded = load_classifier(tmp_path / "clf")
    assert loaded.hidden_dim == 16 and loaded.info["finetune"]["supcon_weight"] == 0.5
    assert "validation" in loaded.info
    assert main(["predict", "--model", str(tmp_path / "clf"), "--data", str(tmp_path / "test.h5ad"),
                 "--out", str(tmp_path / "pred"), "--tta"]) == 2
    assert "--tta: for image classifiers" in capsys.readouterr().err
    assert main(["predict", "--model", str(tmp_path / "clf"), "--data", str(tmp_path / "test.h5ad"),
                 "--out", str(tmp_path / "pred"), "--label-key", "celltype"]) == 2
    assert "test.h5ad: no obs column 'celltype'" in capsys.readouterr().err  # the error names the file
    assert main(["predict", "--model", str(tmp_path / "clf"), "--data", str(tmp_path / "test.h5ad"),
                 "--out", str(tmp_path / "pred"), "--label-key", "cell_type"]) == 0
    assert (tmp_path / "pred" / "predictions.h5ad").is_file()
    again = ["predict", "--model", str(tmp_path / "clf"), "--data", str(tmp_path / "pred" / "predictions.h5ad"),
             "--out", str(tmp_path / "pred2")]  # predictions already in the input: replaced only when asked
    assert main(again) == 2 and "obs['sslcell_pred'] exists" in capsys.readouterr().err
    assert main([*again, "--key-added", "second"]) == 0
    both = ad.read_h5ad(tmp_path / "pred2" / "predictions.h5ad")
    assert {"sslcell_pred", "second", "second_confidence"} <= set(both.obs) and "second_proba" in both.obsm
    assert main([*again, "--overwrite"]) == 0
