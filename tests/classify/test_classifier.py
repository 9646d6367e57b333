"""CellClassifier: forward pass, save / load round trip (safetensors + JSON only) and refusals of bad files."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sslcell.classify import CellClassifier, load_classifier, save_classifier
from sslcell.config import RecipeConfig
from sslcell.data.images import CellImages
from sslcell.errors import ConfigError, FileFormatError, OverwriteError
from sslcell.methods import build_method

S = 16
NAMES = ["dna", "actin"]
CLASSES = ["neg", "pos", "mid"]


def recipe(kind: str) -> RecipeConfig:
    encoders = {
        "resnet": {"name": "resnet_tiny", "options": {"base_width": 4}},
        "vit": {"name": "vit_tiny", "options": {"patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2}},
    }
    return RecipeConfig.from_dict({
        "modality": "image",
        "method": {"name": "simclr", "projection_dim": 16, "projection_hidden": 32},
        "encoder": encoders[kind],
        "data": {"batch_size": 32},
        "train": {"max_epochs": 1, "seed": 0, "progress_bar": False, "accelerator": "cpu"},
    })


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    """(24, 2, 16, 16) uint16 crops: noise around a per-channel level."""
    rng = np.random.default_rng(0)
    x = np.array([3000.0, 400.0])[None, :, None, None] + rng.normal(0, 200, (24, 2, S, S))
    return np.clip(x, 0, 65535).astype(np.uint16)


def make_classifier(crops: np.ndarray, kind: str = "resnet", dropout: float = 0.3, seed: int = 0) -> CellClassifier:
    """An untrained encoder with a random head and non-trivial feature standardisation (every buffer matters)."""
    stats = CellImages.from_array(crops, channel_names=NAMES).channel_stats()
    contract = {"modality": "image", "channel_names": NAMES, "channel_mean": stats["mean"], "channel_std": stats["std"],
                "image_size": [S, S], "dtype": "uint16"}
    torch.manual_seed(seed)
    model = build_method(recipe(kind), contract)
    classifier = CellClassifier.from_pretrained(model, CLASSES, dropout=dropout)
    g = torch.Generator().manual_seed(seed)
    classifier.eval()
    with torch.no_grad():  # standardise with the crops' own embedding statistics, as a linear probe does
        z = classifier.encoder(classifier.inputs.normalize(torch.from_numpy(crops)))
        classifier.feature_mean.copy_(z.mean(0))
        classifier.feature_std.copy_(z.std(0) + 1e-3)
        classifier.head.weight.copy_(torch.randn(classifier.head.weight.shape, generator=g))
    return classifier


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_save_load_round_trip_gives_identical_probabilities(crops, tmp_path, kind):
    classifier = make_classifier(crops, kind)
    classifier.info = {"note": "round trip"}
    batch = torch.from_numpy(crops)
    expected = classifier.predict_proba(batch)
    assert expected.shape == (24, 3) and expected.dtype == torch.float32
    torch.testing.assert_close(expected.sum(1), torch.ones(24))
    assert len(set(expected.argmax(1).tolist())) > 1  # a non-trivial classifier: the comparison means something

    out = save_classifier(classifier, tmp_path / "clf", info={"extra": 1})
    with pytest.raises(OverwriteError, match="already holds classifier.safetensors, classifier.json"):
        save_classifier(classifier, tmp_path / "clf")
    save_classifier(classifier, tmp_path / "clf", info={"extra": 1}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["classifier.json", "classifier.safetensors"]
    restored = load_classifier(out)
    assert not restored.training
    assert restored.classes == CLASSES
    assert restored.dropout.p == pytest.approx(0.3)
    assert restored.info == {"note": "round trip", "extra": 1}
    assert restored.inputs.contract == classifier.inputs.contract
    assert torch.equal(restored.predict_proba(batch), expected)
    a, b = classifier.state_dict(), restored.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_forward_is_standardise_then_linear(crops):
    classifier = make_classifier(crops)
    x = classifier.inputs.normalize(torch.from_numpy(crops[:5]))
    with torch.no_grad():
        z = (classifier.encoder(x) - classifier.feature_mean) / classifier.feature_std
        reference = (z @ classifier.head.weight.T + classifier.head.bias).softmax(1)
    torch.testing.assert_close(classifier.predict_proba(torch.from_numpy(crops[:5])), reference)


def test_predict_proba_keeps_the_training_mode(crops):
    classifier = make_classifier(crops).train()
    batch = torch.from_numpy(crops[:6])
    first, second = classifier.predict_proba(batch), classifier.predict_proba(batch)
    assert torch.equal(first, second)  # eval inside: no dropout, batch norm running statistics
    assert classifier.training


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_tta_averages_the_eight_orientations_and_ignores_them(crops, kind):
    classifier = make_classifier(crops, kind)
    batch = torch.from_numpy(crops[:6])
    with torch.no_grad():
        x = classifier.inputs.normalize(batch)
        views = [x, x.flip(-1)] + [v for k in (1, 2, 3) for t in [x.rot90(k, (-2, -1))] for v in (t, t.flip(-1))]
        reference = torch.stack([classifier.eval()(v).softmax(1) for v in views]).mean(0)
    averaged = classifier.predict_proba(batch, tta=True)
    torch.testing.assert_close(averaged, reference)
    assert not torch.allclose(averaged, classifier.predict_proba(batch), atol=1e-4)  # the views do differ
    for moved in (batch.rot90(1, (-2, -1)), batch.flip(-2), batch.transpose(-1, -2)):
        torch.testing.assert_close(classifier.predict_proba(moved.contiguous(), tta=True), averaged)


def test_classifier_json_is_plain_json(crops, tmp_path):
    save_classifier(make_classifier(crops), tmp_path)
    meta = json.loads((tmp_path / "classifier.json").read_text())
    assert meta["kind"] == "classifier"
    assert meta["classes"] == CLASSES
    assert meta["base"]["contract"]["channel_names"] == NAMES
    assert meta["base"]["recipe"]["encoder"]["name"] == "resnet_tiny"


def test_loading_unpickles_nothing(crops, tmp_path, monkeypatch):
    save_classifier(make_classifier(crops), tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("load_classifier must not unpickle anything")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    assert load_classifier(tmp_path).classes == CLASSES


def test_fewer_than_two_classes_is_a_config_error(crops):
    classifier = make_classifier(crops)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        CellClassifier(classifier.inputs, classifier.encoder, ["only"], classifier.base)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        CellClassifier(classifier.inputs, classifier.encoder, [], classifier.base)


# ------------------------------------------------------------------------------------------- bad files
@pytest.fixture
def saved(crops, tmp_path):
    return save_classifier(make_classifier(crops), tmp_path / "clf")


def test_missing_directory_or_description(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such classifier directory"):
        load_classifier(tmp_path / "nowhere")
    (saved / "classifier.json").unlink()
    with pytest.raises(FileFormatError, match="not an sslcell classifier.*classifier.json"):
        load_classifier(saved)
    with pytest.raises(FileFormatError, match="not an sslcell classifier"):
        load_classifier(tmp_path)  # a directory without any classifier files


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing"])
def test_unreadable_weights(saved, damage):
    weights = saved / "classifier.safetensors"
    if damage == "garbage":
        weights.write_bytes(b"this is not a safetensors file" * 4)
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    else:
        weights.unlink()
    with pytest.raises(FileFormatError, match="classifier.safetensors: cannot read weights"):
        load_classifier(saved)


@pytest.mark.parametrize("change", ["head_shape", "missing_key", "extra_key"])
def test_weights_that_do_not_match_the_description(saved, change):
    weights = saved / "classifier.safetensors"
    state = load_file(str(weights))
    if change == "head_shape":
        state["head.weight"] = torch.zeros(state["head.weight"].shape[0], state["head.weight"].shape[1] + 1)
    elif change == "missing_key":
        del state["feature_std"]
    else:
        state["surprise"] = torch.zeros(3)
    save_file(state, str(weights))
    with pytest.raises(FileFormatError, match="weights do not match the settings in classifier.json"):
        load_classifier(saved)


def test_reordered_or_renamed_classes_are_refused(saved):
    """Same count, another order: loaded without a word before, and every prediction was relabelled."""
    meta = json.loads((saved / "classifier.json").read_text())
    trained = list(meta["classes"])
    for edited in ([trained[1], trained[0], *trained[2:]], ["x", *trained[1:]]):
        (saved / "classifier.json").write_text(json.dumps({**meta, "classes": edited}))
        with pytest.raises(FileFormatError, match=r"classifier\.json: classes .* are not those the weights were "
                                                  r"trained on, in their order"):
            load_classifier(saved)
    (saved / "classifier.json").write_text(json.dumps(meta))
    assert load_classifier(saved).classes == trained


def test_description_with_other_classes_than_the_weights(saved):
    meta = json.loads((saved / "classifier.json").read_text())
    meta["classes"] = ["neg", "pos"]  # the weights have 3 outputs
    (saved / "classifier.json").write_text(json.dumps(meta))
    with pytest.raises(FileFormatError, match="weights do not match"):
        load_classifier(saved)


@pytest.mark.parametrize("edit", [
    lambda meta: "{not json",
    lambda meta: json.dumps({k: v for k, v in meta.items() if k != "base"}),
    lambda meta: json.dumps({**meta, "classes": ["alone"]}),
    lambda meta: json.dumps({**meta, "base": {**meta["base"], "recipe": {**meta["base"]["recipe"], "modality": "x"}}}),
], ids=["not_json", "no_base", "one_class", "bad_recipe"])
def test_invalid_description(saved, edit):
    meta = json.loads((saved / "classifier.json").read_text())
    (saved / "classifier.json").write_text(edit(meta))
    with pytest.raises(FileFormatError, match="classifier.json: not a valid classifier description"):
        load_classifier(saved)


def test_inconsistent_contract_is_a_file_format_error(saved):
    meta = json.loads((saved / "classifier.json").read_text())
    meta["base"]["contract"]["channel_mean"] = [1.0]
    (saved / "classifier.json").write_text(json.dumps(meta))
    with pytest.raises(FileFormatError, match="classifier.json"):
        load_classifier(saved)


def test_description_with_a_class_twice_is_refused(saved):
    meta = json.loads((saved / "classifier.json").read_text())
    meta["classes"] = [meta["classes"][0]] * len(meta["classes"])
    (saved / "classifier.json").write_text(json.dumps(meta))
    with pytest.raises(FileFormatError, match="classes must be distinct"):
        load_classifier(saved)



def test_edited_statistics_are_refused_and_a_blank_channel_still_loads(saved, crops, tmp_path):
    """The JSON's channel statistics must be the weights': an edit is refused by name. A blank channel (std 0,
    held as 1 by the input module) is no edit: a classifier from scratch on such crops saves and loads."""
    meta = json.loads((saved / "classifier.json").read_text())
    meta["base"]["contract"]["channel_mean"][1] += 1.0
    (saved / "classifier.json").write_text(json.dumps(meta))
    with pytest.raises(FileFormatError, match="classifier.json: contract.channel_mean differs from the one the wei"):
        load_classifier(saved)
    blank = crops.copy()
    blank[:, 1] = 0
    cells = CellImages.from_array(blank, channel_names=NAMES)
    clf = CellClassifier.from_scratch(cells, CLASSES)
    assert clf.base["contract"]["channel_std"][1] == 0.0
    x = torch.from_numpy(blank[:4])
    torch.testing.assert_close(load_classifier(save_classifier(clf, tmp_path / "blank")).predict_proba(x),
                               clf.eval().predict_proba(x))
