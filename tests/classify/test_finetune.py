"""finetune: linear probe and full fine-tuning on a learnable crop task, label handling, refusals, settings."""

from __future__ import annotations

import importlib

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from sslcell.checkpoint import load
from sslcell.classify import (
    SCRATCH_RECIPE,
    CellClassifier,
    FinetuneConfig,
    finetune,
    load_classifier,
    save_classifier,
    train_from_scratch,
)
from sslcell.classify.objectives import SupervisedLoss
from sslcell.config import RecipeConfig
from sslcell.data.images import CellImages
from sslcell.errors import ConfigError, InputError
from sslcell.methods import build_method
from sslcell.train import pretrain
from tests.conftest import tiny_image_recipe, tiny_recipe

# the module, not the function: ``sslcell.classify`` re-exports ``finetune``, shadowing the submodule's name
training_module = importlib.import_module("sslcell.classify.training")  # full fine-tuning's run
probes_module = importlib.import_module("sslcell.evaluate.probes")  # the one logistic probe

S = 16
NAMES = ["dna", "actin"]
CLASSES = np.array(["neg", "pos", "mid"])
LEVEL = np.array([30.0, 180.0, 100.0])  # blob brightness in the "actin" channel per class


def crops_of(y: np.ndarray, seed: int) -> np.ndarray:
    """(n, 2, 16, 16) uint8 crops: a gaussian cell at a random place; its "actin" brightness gives the class."""
    rng = np.random.default_rng(seed)
    n = len(y)
    yy, xx = np.mgrid[:S, :S]
    centre = rng.uniform(5, S - 5, size=(n, 2))
    blob = np.exp(-((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2) / (2 * 2.5**2))
    x = np.empty((n, 2, S, S))
    x[:, 0] = 20 + 150 * blob * rng.uniform(0.7, 1.0, (n, 1, 1))
    x[:, 1] = 20 + LEVEL[y][:, None, None] * blob
    x += rng.normal(0, 8, x.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def task(n: int, seed: int, n_classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Crops and integer classes, classes in shuffled order (row order carries no information)."""
    y = np.random.default_rng(seed + 100).permutation(np.arange(n) % n_classes)
    return crops_of(y, seed), y


def cells_of(x: np.ndarray, labels) -> CellImages:
    return CellImages.from_array(x, channel_names=NAMES, labels=labels)


def recipe() -> RecipeConfig:
    return RecipeConfig.from_dict({
        "modality": "image",
        "method": {"name": "simclr", "projection_dim": 16, "projection_hidden": 32},
        "encoder": {"name": "resnet_tiny", "options": {"base_width": 4}},
        "data": {"batch_size": 32},
        "train": {"max_epochs": 1, "seed": 0, "progress_bar": False, "accelerator": "cpu"},
    })


def full(**kw) -> FinetuneConfig:
    """Settings that learn the task in every run (checked over 10 head initialisations: >= 0.99 held out)."""
    values = {"head": "full", "epochs": 6, "lr": 1e-2, "encoder_lr_factor": 0.1, "batch_size": 32,
              "progress_bar": False, "accelerator": "cpu"}
    return FinetuneConfig(**{**values, **kw})


def linear(**kw) -> FinetuneConfig:
    return FinetuneConfig(head="linear", **kw)


@pytest.fixture(scope="module")
def train():
    x, y = task(192, 0)
    return x, y


@pytest.fixture(scope="module")
def heldout():
    return task(96, 1)


@pytest.fixture(scope="module")
def model(train, tmp_path_factory):
    """A tiny ResNet pretrained for 2 steps on the training crops, loaded back from its run directory."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    pretrain(recipe(), cells_of(train[0], None), out, max_steps=2)
    return load(out)


def accuracy(classifier, x: np.ndarray, y: np.ndarray) -> float:
    proba = classifier.predict_proba(torch.from_numpy(x)).numpy()
    return float((proba.argmax(1) == y).mean())


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------ learning
@pytest.mark.parametrize("config", [linear(), full()], ids=["linear", "full"])
def test_learns_a_learnable_task_and_leaves_the_model_unchanged(model, train, heldout, config):
    before = state(model)
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    classifier = finetune(model, cells_of(train[0], CLASSES[train[1]]), "label", config)
    assert classifier.classes == ["neg", "pos"]
    assert accuracy(classifier, *train) > 0.9
    assert accuracy(classifier, *heldout) > 0.9
    after = state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads
    assert classifier.encoder is not model.encoder
    assert not classifier.training  # returned ready for inference
    assert classifier.info["n_train"] == len(train[1])
    assert classifier.info["train_class_counts"] == {"neg": 96, "pos": 96}
    assert classifier.dropout.p == (config.dropout if config.head == "full" else 0.0)


@pytest.mark.parametrize("config", [linear(), full()], ids=["linear", "full"])
def test_shuffled_labels_give_chance(model, train, heldout, config):
    """The same crops with labels permuted: nothing to learn, so held-out accuracy stays near 0.5."""
    shuffled = np.random.default_rng(7).permutation(train[1])
    classifier = finetune(model, cells_of(train[0], CLASSES[shuffled]), "label", config)
    assert accuracy(classifier, *heldout) < 0.7


def test_linear_probe_matches_sklearn_on_standardised_embeddings(model):
    """Reference: embed, standardise, fit sklearn's multinomial logistic regression; same probabilities.
    Three present classes plus one declared class without cells, listed first: every column must line up."""
    x, y = task(150, 3, n_classes=3)
    labels = pd.Categorical(CLASSES[y], categories=["none", "mid", "neg", "pos"])
    classifier = finetune(model, cells_of(x, labels), "label", linear(oversample=False))
    assert classifier.classes == ["none", "mid", "neg", "pos"]
    with torch.no_grad():
        z = model.embed(torch.from_numpy(x)).double().numpy()
    z = (z - z.mean(0)) / (z.std(0) + 1e-6)
    codes = labels.codes
    reference = LogisticRegression(C=1.0, max_iter=2000).fit(z, codes)
    proba = classifier.predict_proba(torch.from_numpy(x)).double().numpy()
    assert proba.shape == (150, 4)
    assert proba[:, 0].max() < 1e-12  # the class without training cells is never predicted
    np.testing.assert_allclose(proba[:, 1:], reference.predict_proba(z), atol=2e-3)


def test_validation_never_picks_a_class_without_training_cells():
    """Two labelled classes after a declared empty one: the binary probe leaves the empty class's logit at 0, so
    before it was hidden the validation score counted cells predicted as it (recorded macro-F1 0.5, not 1.0)."""
    from sslcell.classify.classifier import CellClassifier
    from sslcell.classify.finetune import _train

    class Identity(torch.nn.Module):
        embed_dim = 2

        def forward(self, x):
            return x

    rng = np.random.default_rng(0)
    codes = np.repeat([1, 2], 20)  # class 0 ("a") has no labelled cell
    x = (rng.normal(size=(40, 2)) + np.c_[codes * 3 - 4.5, np.zeros(40)]).astype(np.float32)
    classifier = _train(lambda rows: CellClassifier(None, Identity(), ["a", "b", "c"], {}, 0.0, 0), np.arange(40),
                        codes, FinetuneConfig(head="linear", val_fraction=0.25, progress_bar=False), "toy",
                        embed=lambda cells: x)
    assert classifier.info["validation"]["best_macro_f1"] == 1.0  # well-separated classes: every cell right


def test_binary_linear_probe_matches_sklearn(model, train):
    """Binary: sklearn keeps one coefficient row (class 1 vs 0); the two-column softmax must equal its sigmoid."""
    x, y = train
    classifier = finetune(model, cells_of(x, CLASSES[y]), "label", linear(C=0.1))
    with torch.no_grad():
        z = model.embed(torch.from_numpy(x)).double().numpy()
    z = (z - z.mean(0)) / (z.std(0) + 1e-6)
    reference = LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced").fit(z, y)
    proba = classifier.predict_proba(torch.from_numpy(x)).double().numpy()
    np.testing.assert_allclose(proba, reference.predict_proba(z), atol=2e-3)


# ------------------------------------------------------------------------------------------ labels
def test_classes_follow_the_categories_including_empty_ones(model, train, heldout):
    labels = pd.Categorical(CLASSES[train[1]], categories=["pos", "empty", "neg"])
    classifier = finetune(model, cells_of(train[0], labels), "label", full())
    assert classifier.classes == ["pos", "empty", "neg"]
    assert classifier.info["train_class_counts"] == {"pos": 96, "empty": 0, "neg": 96}
    proba = classifier.predict_proba(torch.from_numpy(heldout[0])).numpy()
    predicted = np.asarray(classifier.classes)[proba.argmax(1)]
    assert "empty" not in set(predicted)
    assert (predicted == CLASSES[heldout[1]]).mean() > 0.9  # columns follow the categories, not sorted names


def test_cells_without_labels_are_skipped(model, train, heldout):
    """The first 40% of the rows are unlabelled: training on the rest must keep images and labels aligned."""
    x, y = train
    labels = CLASSES[y].astype(object)
    labels[: int(0.4 * len(y))] = None
    classifier = finetune(model, cells_of(x, labels), "label", full())
    n = len(y) - int(0.4 * len(y))
    assert classifier.info["n_train"] == n
    kept = y[int(0.4 * len(y)) :]
    assert classifier.info["train_class_counts"] == {"neg": int((kept == 0).sum()), "pos": int((kept == 1).sum())}
    assert accuracy(classifier, *heldout) > 0.9


def test_labels_as_an_array_and_as_another_obs_column(model, train, heldout):
    x, y = train
    obs = pd.DataFrame({"fate": CLASSES[y], "other": np.zeros(len(y))})
    by_column = finetune(model, CellImages.from_array(x, channel_names=NAMES, obs=obs), "fate", linear())
    by_array = finetune(model, cells_of(x, None), CLASSES[y], linear())
    assert by_column.classes == by_array.classes == ["neg", "pos"]
    probe = torch.from_numpy(heldout[0])
    torch.testing.assert_close(by_column.predict_proba(probe), by_array.predict_proba(probe))
    assert accuracy(by_array, *heldout) > 0.9


def test_labels_as_a_series_are_matched_by_cell_not_by_position(model, train, heldout):
    x, y = train
    cells = cells_of(x, CLASSES[y])
    by_column = finetune(cells, model, "label", linear())
    shuffled = cells.obs["label"].iloc[::-1]  # the same labels, in another row order
    by_series = finetune(cells, model, shuffled, linear())
    probe = torch.from_numpy(heldout[0])
    torch.testing.assert_close(by_series.predict_proba(probe), by_column.predict_proba(probe))
    with pytest.raises(InputError, match="a Series is matched to the cells by its index"):
        finetune(cells, model, pd.Series(CLASSES[y]).set_axis([f"x{i}" for i in range(len(y))]), linear())


def test_labels_array_of_wrong_length_is_refused(model, train):
    x, y = train
    with pytest.raises(InputError, match=r"labels has shape \(10,\) for 192 cells"):
        finetune(model, cells_of(x, None), CLASSES[y][:10], linear())


def test_label_refusals(model, train):
    x, y = train
    cells = cells_of(x, CLASSES[y])
    with pytest.raises(InputError, match=r"no obs column 'fate'.*\['label'\]"):
        finetune(model, cells, "fate", linear())
    with pytest.raises(InputError, match="at least 2 classes"):
        finetune(model, cells_of(x, np.full(len(y), "neg")), "label", linear())
    one_present = pd.Categorical(np.full(len(y), "neg"), categories=["neg", "pos"])
    with pytest.raises(InputError, match="at least 2 classes"):
        finetune(model, cells_of(x, one_present), "label", full())


def test_expression_model_is_refused(train):
    contract = {"modality": "expression", "genes": [f"g{i}" for i in range(100)], "target_sum": 1e4,
                "counts_are_log_normalized": False}
    expression_model = build_method(tiny_recipe("mae"), contract)
    with pytest.raises(InputError, match="expression"):
        finetune(expression_model, cells_of(train[0], CLASSES[train[1]]), "label", linear())


@pytest.mark.parametrize("values,field", [
    ({"head": "mlp2"}, "head"),
    ({"epochs": 0}, "epochs"),
    ({"batch_size": 0}, "batch_size"),
    ({"dropout": 1.0}, "dropout"),
    ({"dropout": -0.1}, "dropout"),
    ({"lr": 0.0}, "lr"),
    ({"encoder_lr_factor": -1.0}, "encoder_lr_factor"),
    ({"epoch": 3}, "epoch"),  # unknown field, through from_dict
    ({"epochs": "many"}, "epochs"),
    ({"schedule": "linear"}, "schedule"),
    ({"schedule": "one_cycle", "head": "mlp"}, "schedule"),  # the mlp head's loop has warm-up + cosine only
    ({"balance": "weights"}, "balance"),
    ({"balance": "loss", "head": "mlp"}, "balance"),
    ({"min_steps": -1}, "min_steps"),
    ({"min_steps": 2.5}, "min_steps"),
    ({"layer_decay": 0.0}, "layer_decay"),
    ({"layer_decay": 1.5}, "layer_decay"),
    ({"drop_path": 1.0}, "drop_path"),
    ({"head": "linear", "layer_decay": 0.75}, "layer_decay"),
    ({"head": "mlp", "drop_path": 0.1}, "drop_path"),
    ({"mixup": -0.2}, "mixup"),
    ({"cutmix": -1.0}, "cutmix"),
    ({"head": "mlp", "mixup": 0.8}, "mixup"),  # soft labels blend crops while fine-tuning only
    ({"cutmix": 1.0, "supcon_weight": 0.5}, "supcon_weight"),
    ({"augment": {"output_size": 20}}, "augment.output_size: 20: fine-tuning trains on views of the crops' own size"),
    ({"augment": ["hflip"]}, "augment: expected a mapping"),
])
def test_config_validation(values, field):
    with pytest.raises(ConfigError, match=field):
        FinetuneConfig.from_dict(values)


@pytest.mark.parametrize("values, message", [
    ({"epochs": "3"}, "epochs: expected an integer, got '3'"),
    ({"oversample": "yes"}, "oversample: 'yes' is none of the types bool, float"),
])
def test_config_built_in_python_names_the_field(values, message):
    """Built directly (not from YAML), a wrong type is the same ConfigError, not a TypeError from a comparison."""
    with pytest.raises(ConfigError, match=message):
        FinetuneConfig(**values)


# ------------------------------------------------------------------------------------------ settings
def test_oversampling_weights_are_inverse_class_counts(model, monkeypatch):
    """95/5 classes: each cell is drawn with weight 1/(its class count), so an epoch draws both classes ~equally."""
    y = np.zeros(200, dtype=int)
    y[np.random.default_rng(0).choice(200, 10, replace=False)] = 1
    x = crops_of(y, 5)
    captured = []
    original = training_module.make_image_dataloader

    def spy(cells, **kwargs):
        loader = original(cells, **kwargs)
        captured.append((kwargs.get("weights"), loader.dataset))
        return loader

    monkeypatch.setattr(training_module, "make_image_dataloader", spy)
    finetune(model, cells_of(x, CLASSES[y]), "label", full(epochs=1))
    weights, dataset = captured[-1]
    expected = np.where(y == 1, 1 / 10, 1 / 190)
    np.testing.assert_allclose(weights / weights.sum(), expected / expected.sum())
    drawn = y[dataset.epoch_order()]
    assert 0.4 < drawn.mean() < 0.6  # minority class drawn about half the time (5% without oversampling)

    finetune(model, cells_of(x, CLASSES[y]), "label", full(epochs=1, oversample=False))
    assert captured[-1][0] is None

    finetune(model, cells_of(x, CLASSES[y]), "label", full(epochs=1, oversample=0.5))  # square-root sampling
    expected = np.where(y == 1, 10**-0.5, 190**-0.5)
    np.testing.assert_allclose(captured[-1][0] / captured[-1][0].sum(), expected / expected.sum())


@pytest.mark.parametrize("oversample", [True, False])
def test_linear_probe_balances_class_weights_when_oversampling(model, train, monkeypatch, oversample):
    seen = {}

    class Spy(LogisticRegression):
        def fit(self, X, y, sample_weight=None):
            seen["class_weight"] = self.class_weight
            return super().fit(X, y, sample_weight)

    monkeypatch.setattr(probes_module, "LogisticRegression", Spy)
    finetune(model, cells_of(train[0], CLASSES[train[1]]), "label", linear(oversample=oversample))
    assert seen["class_weight"] == ("balanced" if oversample else None)


def test_linear_probe_class_weights_follow_the_oversampling_power(model, monkeypatch):
    seen = {}

    class Spy(LogisticRegression):
        def fit(self, X, y, sample_weight=None):
            seen["class_weight"] = self.class_weight
            return super().fit(X, y, sample_weight)

    y = np.array([0] * 30 + [1] * 10 + [2] * 20)
    monkeypatch.setattr(probes_module, "LogisticRegression", Spy)
    finetune(model, cells_of(crops_of(y, 3), CLASSES[y]), "label", linear(oversample=0.5))
    # codes follow the sorted class names: mid (20 cells), neg (30), pos (10); sklearn's "balanced" is n / (K count)
    balanced = {k: 60 / (3 * count) for k, count in enumerate([20, 30, 10])}
    assert seen["class_weight"] == pytest.approx({k: w**0.5 for k, w in balanced.items()})


@pytest.mark.parametrize("value", [1.5, -0.1, "yes", None])
def test_oversample_must_be_a_flag_or_a_power(value):
    with pytest.raises(ConfigError, match="oversample"):
        FinetuneConfig(oversample=value)


def test_encoder_learning_rate_is_lr_times_factor(model, train, monkeypatch):
    groups = []
    original = training_module._FinetuneModule.configure_optimizers

    def spy(self):
        out = original(self)
        groups.append([(g["initial_lr"], {id(p) for p in g["params"]}) for g in out["optimizer"].param_groups])
        groups.append(self.classifier)
        return out

    monkeypatch.setattr(training_module._FinetuneModule, "configure_optimizers", spy)
    finetune(model, cells_of(train[0], CLASSES[train[1]]), "label", full(epochs=1, lr=2e-3, encoder_lr_factor=0.05))
    (head_lr, head_ids), (encoder_lr, encoder_ids) = groups[0]
    classifier = groups[1]
    assert head_lr == pytest.approx(2e-3) and encoder_lr == pytest.approx(2e-3 * 0.05)
    assert head_ids == {id(p) for p in classifier.head.parameters()}
    assert encoder_ids == {id(p) for p in classifier.encoder.parameters()}


@pytest.fixture(scope="module")
def vit_model(train, tmp_path_factory):
    """A 2-block ViT pretrained with MAE for 2 steps on the training crops."""
    out = tmp_path_factory.mktemp("pretrain_vit") / "run"
    config = tiny_image_recipe("mae", "vit", encoder={"options": {"patch_size": 4, "depth": 2, "embed_dim": 32,
                                                                   "num_heads": 2}})
    pretrain(config, cells_of(train[0], None), out, max_steps=2)
    return load(out)


def test_layer_decay_gives_each_vit_layer_its_rate(vit_model, train, monkeypatch):
    """MAE's layer-wise decay: layer l of L = depth + 1 at lr * factor * decay ** (L - l); the head at lr."""
    seen = {}
    original = training_module._FinetuneModule.configure_optimizers

    def spy(self):
        out = original(self)
        seen["groups"] = [(g["initial_lr"], {id(p) for p in g["params"]}) for g in out["optimizer"].param_groups]
        seen["classifier"] = self.classifier
        return out

    monkeypatch.setattr(training_module._FinetuneModule, "configure_optimizers", spy)
    finetune(cells_of(train[0], CLASSES[train[1]]), vit_model, "label",
             full(epochs=1, lr=2e-3, encoder_lr_factor=0.1, layer_decay=0.5))
    classifier = seen["classifier"]
    encoder = dict(classifier.encoder.named_parameters())

    def ids(*prefixes):
        return {id(p) for name, p in encoder.items() if name.startswith(prefixes)}

    expected = [(2e-3, {id(p) for p in classifier.head.parameters()}),
                (2e-4 * 0.5**3, ids("patch_embed.", "cls_token")),
                (2e-4 * 0.5**2, ids("blocks.0.")),
                (2e-4 * 0.5, ids("blocks.1.")),
                (2e-4, ids("norm."))]
    assert len(seen["groups"]) == len(expected)
    for (lr, group), (want_lr, want) in zip(seen["groups"], expected, strict=True):
        assert lr == pytest.approx(want_lr) and group == want and group
    assert set().union(*(g for _, g in seen["groups"][1:])) == {id(p) for p in encoder.values()}


def test_drop_path_is_the_configs_while_training_then_the_encoders_own(vit_model, train, monkeypatch):
    rates = []
    original = training_module._FinetuneModule.training_step

    def spy(self, batch, batch_idx):
        rates.append(self.classifier.encoder.drop_path)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(training_module._FinetuneModule, "training_step", spy)
    classifier = finetune(cells_of(train[0], CLASSES[train[1]]), vit_model, "label", full(epochs=1, drop_path=0.3))
    assert rates and rates == pytest.approx([0.3] * len(rates))
    assert classifier.encoder.drop_path == vit_model.encoder.drop_path == 0.0


@pytest.mark.parametrize("values", [{"layer_decay": 0.75}, {"drop_path": 0.1}], ids=["layer_decay", "drop_path"])
def test_vit_only_settings_are_refused_for_a_cnn_before_training(model, train, values, monkeypatch):
    monkeypatch.setattr(training_module.pl.Trainer, "fit", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ConfigError, match=f"{next(iter(values))}.*ViT.*ResNet"):
        finetune(cells_of(train[0], CLASSES[train[1]]), model, "label", full(epochs=1, **values))


@pytest.mark.parametrize("factor", [0.0, 0.1])
def test_encoder_is_frozen_only_with_factor_zero(model, train, factor):
    cells = cells_of(train[0], CLASSES[train[1]])
    classifier = finetune(model, cells, "label", full(epochs=1, encoder_lr_factor=factor))
    start = dict(model.encoder.named_parameters())
    moved = [k for k, p in classifier.encoder.named_parameters() if not torch.equal(p.detach(), start[k].detach())]
    assert (len(moved) == 0) == (factor == 0.0)
    assert not torch.equal(classifier.head.weight, torch.zeros_like(classifier.head.weight))


def test_full_finetuning_is_reproducible(model, train):
    cells = cells_of(train[0], CLASSES[train[1]])
    probe = torch.from_numpy(train[0][:16])
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(0)  # the same global state each time
        runs.append(finetune(model, cells, "label", full(epochs=1, seed=seed)).predict_proba(probe))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_full_finetuning_depends_only_on_its_seed(model, train):
    cells = cells_of(train[0], CLASSES[train[1]])
    probe = torch.from_numpy(train[0][:16])
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        runs.append(finetune(model, cells, "label", full(epochs=1, seed=3)).predict_proba(probe))
    assert torch.equal(runs[0], runs[1])


def test_frozen_encoder_keeps_its_batchnorm_statistics(model, train):
    """encoder_lr_factor=0: the whole encoder state (weights and batch-norm running statistics) is unchanged."""
    cells = cells_of(train[0], CLASSES[train[1]])
    classifier = finetune(model, cells, "label", full(epochs=2, encoder_lr_factor=0.0))
    before = model.encoder.state_dict()
    after = classifier.encoder.state_dict()
    assert any("running_mean" in k for k in before)  # the test model has batch norm
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []


def test_default_augmentation_only_turns_and_flips():
    """The default fine-tuning views are exact dihedral copies of the crop: no rescaling, no intensity change."""
    from sslcell.augment.image import ImageAugment
    from sslcell.methods.inputs import image_augment_config

    x = torch.randn(64, 2, 12, 12)
    views = ImageAugment(image_augment_config(FinetuneConfig().augment))(x, torch.Generator().manual_seed(0))
    turns = [torch.rot90(f, k, dims=(-2, -1)) for f in (x, x.flip(-1)) for k in range(4)]  # 8 orientations
    error = torch.stack([(views - t).abs().amax(dim=(1, 2, 3)) for t in turns]).amin(0)  # (64,): nearest one
    assert error.max() < 1e-5
    assert len({int(torch.stack([(views[i] - t[i]).abs().max() for t in turns]).argmin()) for i in range(64)}) > 4


def test_augment_fields_are_added_to_the_label_preserving_defaults():
    config = FinetuneConfig(augment={"brightness": 0.1})
    assert config.augment["brightness"] == 0.1
    assert config.augment["scale"] == [1.0, 1.0] and config.augment["noise_p"] == 0.0
    with pytest.raises(ConfigError, match="scale"):
        FinetuneConfig(augment={"scale": [0.0, 2.0]})


def test_batch_norm_statistics_are_those_of_the_final_encoder_on_the_crops(model, train):
    """After fine-tuning, the stem's batch-norm running mean and variance are the per-channel statistics of the
    final stem convolution's output on the un-augmented training crops (not trailing averages of the run)."""
    cells = cells_of(train[0], CLASSES[train[1]])
    config = full(epochs=2, encoder_lr_factor=1.0, oversample=False)  # 192 crops, 6 batches of 32
    classifier = finetune(model, cells, "label", config)
    conv, norm = classifier.encoder.stem[0], classifier.encoder.stem[1]
    with torch.no_grad():
        h = conv(classifier.inputs.normalize(torch.from_numpy(train[0])))  # (192, w, 16, 16)
    mean = h.mean(dim=(0, 2, 3))  # equal batches: the mean of the batch means
    var = h.transpose(0, 1).flatten(1).var(dim=1)  # the mean of per-batch variances, up to between-batch spread
    assert torch.allclose(norm.running_mean, mean, atol=1e-4, rtol=1e-4)
    assert torch.allclose(norm.running_var, var, rtol=0.05)
    assert not classifier.encoder.training


# ------------------------------------------------------------------------------- the supervised baseline's recipe
def overlapping_crops(y: np.ndarray, seed: int) -> np.ndarray:
    """(n, 2, 16, 16) uint8 crops whose "actin" brightness is 80 +- 30 (class 0) or 130 +- 30 (class 1): the classes
    overlap, so where the decision falls depends on how the classes are weighted."""
    rng = np.random.default_rng(seed)
    n = len(y)
    yy, xx = np.mgrid[:S, :S]
    centre = rng.uniform(5, S - 5, size=(n, 2))
    blob = np.exp(-((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2) / (2 * 2.5**2))
    level = np.where(y == 1, 130.0, 80.0) + rng.normal(0, 30, n)
    x = np.stack([20 + 150 * blob, 20 + level[:, None, None] * blob], axis=1) + rng.normal(0, 8, (n, 2, S, S))
    return np.clip(x, 0, 255).astype(np.uint8)


def scratch(**kw) -> FinetuneConfig:
    return FinetuneConfig(**{**SCRATCH_RECIPE, "epochs": 4, "batch_size": 32, "progress_bar": False,
                             "accelerator": "cpu", **kw})


def test_training_epochs_drop_the_partial_batch_and_reach_min_steps():
    config = FinetuneConfig(epochs=30, batch_size=128, min_steps=100)
    assert training_module.training_epochs(219, config) == (100, 1)  # 219 crops: one full batch an epoch
    assert training_module.training_epochs(512, config) == (30, 4)  # 120 steps already
    assert training_module.training_epochs(300, FinetuneConfig(epochs=3, batch_size=128, min_steps=7)) == (4, 2)
    assert training_module.training_epochs(50, config) == (100, 1)  # fewer cells than a batch: one batch of all


def test_one_cycle_schedule_rises_to_each_groups_lr_then_falls_to_zero(model, train, monkeypatch):
    """The learning rate of every step (read in the training step) is torch's OneCycleLR to lr (head) and
    lr * encoder_lr_factor (encoder) over the run's 4 epochs x 6 batches."""
    seen = []
    original = training_module._FinetuneModule.training_step

    def spy(self, batch, batch_idx):
        seen.append([g["lr"] for g in self.trainer.optimizers[0].param_groups])
        return original(self, batch, batch_idx)

    monkeypatch.setattr(training_module._FinetuneModule, "training_step", spy)
    config = full(epochs=4, lr=1e-2, encoder_lr_factor=0.5, schedule="one_cycle")
    classifier = finetune(model, cells_of(train[0], CLASSES[train[1]]), "label", config)
    head, encoder = np.array(seen).T
    assert len(head) == 24 and classifier.info["steps"] == 24 and classifier.info["epochs"] == 4
    np.testing.assert_allclose(encoder, 0.5 * head)
    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(reference, max_lr=1e-2, total_steps=24)
    expected = []
    for _ in range(24):
        expected.append(reference.param_groups[0]["lr"])
        reference.step()
        schedule.step()
    np.testing.assert_allclose(head, expected, rtol=1e-6)
    peak = int(head.argmax())
    assert 0 < peak < 23 and head[peak] == pytest.approx(1e-2, rel=0.05)
    assert np.all(np.diff(head[: peak + 1]) > 0) and np.all(np.diff(head[peak:]) < 0)
    assert head[0] == pytest.approx(1e-2 / 25) and head[-1] < 1e-2 * 1e-3  # from lr/25 to about 0


def test_cosine_schedule_is_still_the_default(model, train, monkeypatch):
    seen = []
    original = training_module._FinetuneModule.training_step

    def spy(self, batch, batch_idx):
        seen.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        return original(self, batch, batch_idx)

    monkeypatch.setattr(training_module._FinetuneModule, "training_step", spy)
    finetune(model, cells_of(train[0], CLASSES[train[1]]), "label", full(epochs=2, lr=1e-2, warmup_fraction=0.25))
    total, warmup = 12, 3
    expected = [1e-2 * training_module.warmup_cosine(step, total, warmup, 0.01) for step in range(total)]
    np.testing.assert_allclose(seen, expected, rtol=1e-6)


def test_loss_balancing_weights_the_cross_entropy_and_predicts_the_minority(monkeypatch):
    """95/5 classes that overlap: unweighted, the minority is almost never predicted; with balance="loss" the
    cross-entropy carries the balanced class weights, the draws stay natural, and most of the minority is found."""
    y = np.zeros(400, dtype=int)
    y[np.random.default_rng(0).choice(400, 20, replace=False)] = 1
    cells = cells_of(overlapping_crops(y, 5), CLASSES[y])
    heldout_y = np.arange(200) % 2
    heldout = overlapping_crops(heldout_y, 6)
    loaders, losses = [], []
    make_loader, fit = training_module.make_image_dataloader, training_module._FinetuneModule.on_train_start

    def spy_loader(cells, **kwargs):
        loaders.append(kwargs.get("weights"))
        return make_loader(cells, **kwargs)

    def spy_fit(self):
        losses.append(self.loss)
        return fit(self)

    monkeypatch.setattr(training_module, "make_image_dataloader", spy_loader)
    monkeypatch.setattr(training_module._FinetuneModule, "on_train_start", spy_fit, raising=False)
    recall = {}
    for name, kw in (("loss", {"balance": "loss"}), ("none", {"oversample": False})):
        classifier = train_from_scratch(cells, "label", scratch(**kw), encoder_options={"widths": [8, 16]})
        predicted = classifier.predict_proba(torch.from_numpy(heldout)).argmax(1).numpy()
        recall[name] = float((predicted[heldout_y == 1] == 1).mean())
    assert loaders == [None, None]  # natural draws both times
    weighted, plain = losses
    assert plain.class_weight is None
    np.testing.assert_allclose(weighted.class_weight.numpy(), [400 / (2 * 380), 400 / (2 * 20)])
    assert recall["loss"] > 0.5 and recall["none"] < 0.3, recall


def test_class_weighted_loss_is_torchs_weighted_mean():
    logits, labels = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 0, 1, 2, 2, 2])
    weight = torch.tensor([0.5, 2.0, 1.0])
    loss = SupervisedLoss(class_weight=weight)(logits, logits, labels)
    per_cell = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(loss, (weight[labels] * per_cell).sum() / weight[labels].sum())


def test_soft_one_hot_targets_give_the_hard_label_loss():
    logits, labels = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 0, 1, 2, 2, 2])
    soft = torch.nn.functional.one_hot(labels, 3).float()
    weight = torch.tensor([0.5, 2.0, 1.0])
    for loss in (SupervisedLoss(), SupervisedLoss(label_smoothing=0.1), SupervisedLoss(class_weight=weight)):
        torch.testing.assert_close(loss(logits, logits, soft), loss(logits, logits, labels))
    # a blended cell counts with its blend of class weights: half class 0 (0.5), half class 1 (2.0)
    half = torch.tensor([[0.5, 0.5, 0.0]])
    per_cell = torch.nn.functional.cross_entropy(logits[:1], half, reduction="none")
    mixed = SupervisedLoss(class_weight=weight)(torch.cat([logits[:1], logits[1:2]]), None,
                                                torch.cat([half, soft[1:2]]))
    plain = torch.nn.functional.cross_entropy(logits[1:2], labels[1:2])
    torch.testing.assert_close(mixed, (1.25 * per_cell[0] + 0.5 * plain) / 1.75)


@pytest.mark.parametrize("values", [{"mixup": 0.8}, {"cutmix": 1.0}, {"mixup": 0.8, "cutmix": 1.0}])
def test_mixup_and_cutmix_blend_crops_and_labels_reproducibly(model, train, monkeypatch, values):
    """Each step's crops are blended (no longer one of the 8 orientations of a training crop) and its targets are
    class probabilities (B, K) mixing two classes; the same seed blends the same way."""
    seen = []
    original = training_module.SupervisedLoss.forward

    def spy(self, logits, head_input, labels):
        seen.append(labels.detach().clone())
        return original(self, logits, head_input, labels)

    monkeypatch.setattr(training_module.SupervisedLoss, "forward", spy)
    cells = cells_of(train[0], CLASSES[train[1]])
    runs = [finetune(model, cells, "label", full(epochs=1, **values)) for _ in range(2)]
    targets = seen[: len(seen) // 2]
    assert targets and all(t.shape == (32, 2) for t in targets)
    for t in targets:
        torch.testing.assert_close(t.sum(1), torch.ones(32))
    assert any(((t > 0.01) & (t < 0.99)).any() for t in targets)  # some cells carry two classes
    probe = torch.from_numpy(train[0][:16])
    torch.testing.assert_close(runs[0].predict_proba(probe), runs[1].predict_proba(probe))
    assert runs[0].info["finetune"] | values == runs[0].info["finetune"]


def test_min_steps_raises_the_epochs_with_few_labels(model, train):
    """192 crops at batch 128: one step an epoch (the last 64 crops are dropped); 2 epochs but at least 5 steps."""
    cells = cells_of(train[0], CLASSES[train[1]])
    classifier = finetune(model, cells, "label", full(epochs=2, batch_size=128, min_steps=5))
    assert classifier.info["epochs"] == 5 and classifier.info["steps"] == 5
    assert classifier.info["finetune"]["epochs"] == 2  # the settings as given
    classifier = finetune(model, cells, "label", full(epochs=2, batch_size=128))
    assert classifier.info["epochs"] == 2 and classifier.info["steps"] == 2
    mlp = finetune(model, cells, "label", FinetuneConfig(head="mlp", epochs=2, batch_size=128, min_steps=5,
                                                         progress_bar=False))
    assert mlp.info["epochs"] == 5


# ------------------------------------------------------------------------------------------ from scratch
def test_from_scratch_standardises_with_the_crops_and_round_trips(train, tmp_path):
    x, y = train
    cells = cells_of(x, CLASSES[y])
    classifier = CellClassifier.from_scratch(cells, ["neg", "pos"], "plain_cnn", {"widths": [4, 8]}, dropout=0.2)
    contract = classifier.inputs.contract
    np.testing.assert_allclose(contract.channel_mean, x.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(contract.channel_std, x.std(axis=(0, 2, 3)), rtol=1e-5)
    assert contract.channel_names == tuple(NAMES) and classifier.encoder.embed_dim == 8
    assert classifier.dropout.p == 0.2 and classifier.base["encoder"] == {"name": "plain_cnn",
                                                                            "options": {"widths": [4, 8]}}
    loaded = load_classifier(save_classifier(classifier, tmp_path / "c"))
    batch = torch.from_numpy(x[:8])
    torch.testing.assert_close(loaded.predict_proba(batch), classifier.predict_proba(batch))
    resnet = CellClassifier.from_scratch(cells, ["neg", "pos"], "resnet_tiny", {"base_width": 4})
    assert resnet.encoder.embed_dim == 32
    with pytest.raises(ConfigError, match="unknown image encoder 'cnn'"):
        CellClassifier.from_scratch(cells, ["neg", "pos"], "cnn")


def test_train_from_scratch_learns_and_keeps_the_callers_random_state(train, heldout):
    state = torch.random.get_rng_state()
    labels = pd.Categorical(CLASSES[train[1]], categories=["neg", "none", "pos"])
    classifier = train_from_scratch(cells_of(train[0], None), labels, scratch(epochs=6, lr=1e-2),
                                    encoder_options={"widths": [8, 16]})
    assert torch.equal(state, torch.random.get_rng_state())
    assert classifier.classes == ["neg", "none", "pos"] and not classifier.training
    proba = classifier.predict_proba(torch.from_numpy(heldout[0])).numpy()
    assert proba[:, 1].max() < 1e-3  # no training crops: never predicted
    assert (np.array([0, 2])[heldout[1]] == proba.argmax(1)).mean() > 0.9


@pytest.mark.parametrize("values,field", [
    ({"head": "linear"}, "head"),
    ({"init_head": "linear_probe"}, "init_head"),
    ({"encoder_lr_factor": 0.0}, "encoder_lr_factor"),
])
def test_train_from_scratch_refuses_settings_that_need_a_pretrained_encoder(train, values, field):
    with pytest.raises(ConfigError, match=field):
        train_from_scratch(cells_of(train[0], CLASSES[train[1]]), "label", scratch(**values))


def test_lp_ft_probe_is_fitted_on_the_features_training_starts_from(model, train):
    """After 2 pretraining steps the running batch-norm averages are far from batch statistics: a probe fitted on
    eval-mode embeddings then met features shifted by several stds in the first training step (cross-entropy in the
    hundreds). Before LP-FT's probe the statistics are re-estimated as training draws the cells."""
    import copy

    from sslcell.classify import CellClassifier

    x, y = train
    cells = cells_of(x, y)
    classifier = CellClassifier.from_pretrained(copy.deepcopy(model), ["0", "1"])
    batch = classifier.inputs.normalize(torch.from_numpy(x[:96]))

    def gap() -> float:
        """How far eval-mode features sit from train-mode (batch-statistics) ones, in train-mode stds."""
        with torch.no_grad():
            in_training = copy.deepcopy(classifier.encoder).train()(batch)
            in_eval = classifier.encoder.eval()(batch)
        return float(((in_eval.mean(0) - in_training.mean(0)).abs() / (in_training.std(0) + 1e-6)).median())

    before = gap()
    training_module.calibrate_before_training(classifier, cells, y.astype(np.int64), full())
    assert before > 0.5 and gap() < 0.25 * before
    frozen = CellClassifier.from_pretrained(copy.deepcopy(model), ["0", "1"])
    training_module.calibrate_before_training(frozen, cells, y.astype(np.int64), full(encoder_lr_factor=0.0))
    assert all(torch.equal(a, b) for a, b in zip(frozen.encoder.state_dict().values(),
                                                 model.encoder.state_dict().values(), strict=True))


def test_finetune_calibrates_before_lp_ft_probe_only(model, train, monkeypatch):
    finetune_module = importlib.import_module("sslcell.classify.finetune")
    calls = []
    real = finetune_module.calibrate_before_training
    monkeypatch.setattr(finetune_module, "calibrate_before_training",
                        lambda *a: calls.append(len(a[2])) or real(*a))
    x, y = train
    finetune(cells_of(x, y), model, config=full(epochs=1))
    finetune(cells_of(x, y), model, config=full(epochs=1, init_head="random"))
    finetune(cells_of(x, y), model, config=linear())
    assert calls == [len(y)]  # LP-FT only, on its training cells


def test_early_stopping_scores_the_network_it_returns(model):
    """With batch norm, each epoch is scored with the statistics fit_full leaves (re-estimated on the training
    crops): the returned classifier's validation macro-F1 is the best epoch's recorded score. Scored with the
    running averages training trails, every epoch here read as one class for all cells (macro-F1 0.17 against the
    returned network's 0.96), so the choice of epoch was blind."""
    from sklearn.metrics import f1_score

    from sslcell.classify.finetune import _validation_mask

    x, y = task(192, 0, n_classes=3)
    config = full(epochs=4, encoder_lr_factor=1.0, lr=3e-2, val_fraction=0.3, patience=10)
    classifier = finetune(model, cells_of(x, CLASSES[y]), "label", config)
    codes = pd.Categorical(CLASSES[y]).codes.astype(np.int64)
    val = _validation_mask(codes, 0.3, config.seed)
    predicted = classifier.predict_proba(torch.from_numpy(x[val])).numpy().argmax(1)
    info = classifier.info["validation"]
    score = f1_score(codes[val], predicted, labels=np.unique(codes[val]), average="macro", zero_division=0)
    assert score == pytest.approx(info["best_macro_f1"], abs=1e-9) and score > 0.5
    assert info["macro_f1_per_epoch"][info["best_epoch"] - 1] == info["best_macro_f1"]
