import json

import pytest
import torch

from sslcell.checkpoint import load, save_model
from sslcell.errors import FileFormatError, OverwriteError
from sslcell.methods import build_method
from tests.conftest import tiny_recipe

GENES = [f"g{i}" for i in range(30)]
CONTRACT = {"modality": "expression", "genes": GENES, "target_sum": 1e4, "counts_are_log_normalized": False}


@pytest.mark.parametrize("method", ["mae", "byol"])
def test_round_trip(tmp_path, method):
    model = build_method(tiny_recipe(method), CONTRACT)
    save_model(model, tmp_path / "m", trained={"epochs": 3})
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["contract"]["genes"] == GENES
    assert meta["recipe"]["method"]["name"] == method
    assert meta["seed"] == 0 and "torch" in meta["versions"]
    restored = load(tmp_path / "m")
    x = torch.poisson(torch.full((8, 30), 3.0))
    assert torch.equal(model.embed(x), restored.embed(x))
    assert restored.trained_info == {"epochs": 3}
    with pytest.raises(OverwriteError, match=r"m: already holds model.safetensors, config.json; pass overwrite=True"):
        save_model(build_method(tiny_recipe(method), CONTRACT), tmp_path / "m")
    assert torch.equal(load(tmp_path / "m").embed(x), restored.embed(x))  # the saved model is kept


def test_weights_are_safetensors_not_pickle(tmp_path):
    save_model(build_method(tiny_recipe(), CONTRACT), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    head = (tmp_path / "model.safetensors").read_bytes()[:2]
    assert head != b"\x80\x04" and head[:1] != b"PK"  # neither a pickle nor a torch zip


def test_every_file_of_a_model_gets_the_umasks_mode(tmp_path):
    """safetensors writes owner-only files: colleagues could read a shared model's config but not its weights."""
    import os

    old = os.umask(0o022)
    try:
        save_model(build_method(tiny_recipe(), CONTRACT), tmp_path / "m")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()}
    assert modes == {"model.safetensors": 0o644, "config.json": 0o644, "README.md": 0o644}


def test_corrupt_or_missing_files(tmp_path):
    save_model(build_method(tiny_recipe(), CONTRACT), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(FileFormatError, match="model.safetensors"):
        load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(FileFormatError, match="config.json"):
        load(tmp_path)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nowhere")
    with pytest.raises(FileFormatError, match="not an sslcell model"):
        load(tmp_path.parent)


def test_weights_for_another_recipe_are_refused(tmp_path):
    save_model(build_method(tiny_recipe(), CONTRACT), tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["recipe"]["encoder"]["hidden"] = [64]
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(FileFormatError, match="do not match"):
        load(tmp_path)


@pytest.mark.parametrize("damage", ["nan", "float16", "int64"])
def test_weights_of_the_wrong_dtype_or_not_finite_are_refused(tmp_path, damage):
    from safetensors.torch import load_file, save_file

    from sslcell.checkpoint import WEIGHTS
    from sslcell.methods import build_method
    from tests.conftest import tiny_recipe

    contract = {"modality": "expression", "genes": [f"g{i}" for i in range(20)]}
    save_model(build_method(tiny_recipe("mae"), contract), tmp_path / "m")
    state = load_file(tmp_path / "m" / WEIGHTS)
    name = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 2)
    if damage == "nan":
        state[name][0, 0] = float("nan")
        message = "NaN or infinite"
    else:
        state[name] = state[name].to(getattr(torch, damage))
        message = f"wrong dtype: {name} \\(torch.{damage}"
    save_file(state, tmp_path / "m" / WEIGHTS)
    with pytest.raises(FileFormatError, match=message):
        load(tmp_path / "m")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda meta: [meta], "expected a JSON object, got list"),
    (lambda meta: {**meta, "embed_dim": meta["embed_dim"] + 1}, "embed_dim .* does not match"),
    (lambda meta: {**meta, "surprise": 1}, r"unknown field\(s\) \['surprise'\]"),
    (lambda meta: {**meta, "contract": [1, 2]}, "bad recipe or input contract"),
    (lambda meta: {**meta, "recipe": "mae"}, "bad recipe or input contract"),
])
def test_a_model_config_that_does_not_fit_is_refused(tmp_path, edit, message):
    from sslcell.methods import build_method
    from tests.conftest import tiny_recipe

    save_model(build_method(tiny_recipe("mae"), {"modality": "expression", "genes": ["a", "b", "c"]}), tmp_path / "m")
    config = tmp_path / "m" / "config.json"
    config.write_text(json.dumps(edit(json.loads(config.read_text()))))
    with pytest.raises(FileFormatError, match=message):
        load(tmp_path / "m")


@pytest.mark.parametrize("field", ["gene_mean", "gene_std"])
def test_statistics_edited_in_the_json_are_refused_not_ignored(tmp_path, field):
    """The per-gene statistics live in the weights too, and those are used: an edit of the JSON's copy is refused
    by name (it was ignored without a word), while the model as saved loads."""
    scaled = {**CONTRACT, "gene_mean": [1.0] * 30, "gene_std": [2.0] * 30}
    save_model(build_method(tiny_recipe(), scaled), tmp_path / "m")
    load(tmp_path / "m")
    config = tmp_path / "m" / "config.json"
    meta = json.loads(config.read_text())
    meta["contract"][field][3] = 1.5
    config.write_text(json.dumps(meta))
    with pytest.raises(FileFormatError, match=rf"config.json: contract.{field} differs from the one the weights hold"):
        load(tmp_path / "m")


def test_temporary_files_of_a_killed_write_are_removed_by_the_next(tmp_path):
    from sslcell.methods import build_method
    from tests.conftest import tiny_recipe

    model = build_method(tiny_recipe("mae"), {"modality": "expression", "genes": ["a", "b", "c"]})
    save_model(model, tmp_path / "m")
    (tmp_path / "m" / ".model.safetensors.abc123").write_bytes(b"half a file")  # as a SIGKILL mid-write leaves
    (tmp_path / "m" / ".config.json.xyz").write_text("{")
    save_model(model, tmp_path / "m", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_every_model_directory_carries_a_model_card(tmp_path):
    save_model(build_method(tiny_recipe("mae"), CONTRACT), tmp_path / "m", trained={"epochs": 3, "n_cells": 400})
    card = (tmp_path / "m" / "README.md").read_text()
    assert card.startswith("# sslcell model")
    for expected in ("**Method:** mae (expression), encoder mlp", f"raw counts of {len(GENES)} genes",
                     "epochs 3, n_cells 400", "**Seed:** 0", "torch", 'sslcell.load("<this folder>")'):
        assert expected in card, expected


def test_damaged_weights_are_refused_by_their_checksum(tmp_path):
    """A flipped byte inside a tensor still parses as safetensors: the checksum in config.json catches it."""
    save_model(build_method(tiny_recipe(), CONTRACT), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # the low bits of the last tensor's last value: finite, same shape and dtype
    weights.write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="model.safetensors: the weights' checksum differs from weights_id"):
        load(tmp_path / "m")
    config = tmp_path / "m" / "config.json"
    meta = json.loads(config.read_text())
    del meta["weights_id"]
    config.write_text(json.dumps(meta))
    with pytest.raises(FileFormatError, match="format 2 needs weights_id"):
        load(tmp_path / "m")


def test_a_model_refreshed_while_it_is_read_loads_the_new_one(tmp_path, monkeypatch):
    """A run refreshes model/ at each checkpoint, weights first: a reader in between meets new weights and the old
    config.json. It reads both again once (after a pause) and gets the new pair; weights that never get their
    config.json are refused."""
    from sslcell import checkpoint

    old, new = build_method(tiny_recipe(), CONTRACT).eval(), build_method(tiny_recipe(), CONTRACT).eval()  # two draws
    save_model(old, tmp_path / "old")
    save_model(new, tmp_path / "new")
    target = tmp_path / "m"
    save_model(old, target)
    (target / "model.safetensors").write_bytes((tmp_path / "new" / "model.safetensors").read_bytes())
    finish = lambda seconds: (target / "config.json").write_text((tmp_path / "new" / "config.json").read_text())  # noqa: E731
    monkeypatch.setattr(checkpoint.time, "sleep", finish)
    x = torch.poisson(torch.full((4, 30), 3.0))
    assert torch.equal(load(target).embed(x), new.embed(x))
    save_model(old, target, overwrite=True)
    (target / "model.safetensors").write_bytes((tmp_path / "new" / "model.safetensors").read_bytes())
    monkeypatch.setattr(checkpoint.time, "sleep", lambda seconds: None)
    with pytest.raises(FileFormatError, match="checksum differs"):
        load(target)
    with torch.no_grad():  # the refreshed pair is checked as fully as the first
        next(new.parameters()).fill_(float("nan"))
    save_model(new, tmp_path / "nan")
    save_model(old, target, overwrite=True)
    (target / "model.safetensors").write_bytes((tmp_path / "new" / "model.safetensors").read_bytes())

    def refresh_to_nan(seconds):
        for name in ("model.safetensors", "config.json"):
            (target / name).write_bytes((tmp_path / "nan" / name).read_bytes())

    monkeypatch.setattr(checkpoint.time, "sleep", refresh_to_nan)
    with pytest.raises(FileFormatError, match="NaN or infinite"):
        load(target)
