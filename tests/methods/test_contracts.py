"""Typed input contracts: validated fields, the JSON round trip, and a clear error on load of a bad one."""

from __future__ import annotations

import json

import pytest

from sslcell.checkpoint import load, save_model
from sslcell.errors import ConfigError, FileFormatError
from sslcell.methods import build_method
from sslcell.methods.contracts import ExpressionContract, ImageContract, contract_from_dict
from tests.conftest import tiny_image_recipe

IMAGE = {"modality": "image", "channel_names": ["dna", "actin"], "channel_mean": [10.0, 20.0],
         "channel_std": [2.0, 3.0], "image_size": [16, 16], "dtype": "uint16"}


def test_round_trip_is_typed_and_lossless():
    image = contract_from_dict(IMAGE)
    assert isinstance(image, ImageContract) and image.channel_names == ("dna", "actin") and image.n_channels == 2
    assert image.to_dict() == IMAGE
    expr = ExpressionContract(genes=["a", "b"], gene_mean=[0.0, 1.0], gene_std=[1.0, 2.0])
    assert contract_from_dict(json.loads(json.dumps(expr.to_dict()))) == expr
    assert expr.scaled and not ExpressionContract(genes=["a"]).scaled


@pytest.mark.parametrize(("change", "message"), [
    ({"channel_std": [1.0]}, r"contract\.channel_std: expected one value per gene or channel \(2\), got 1"),
    ({"channel_mean": [float("nan"), 1.0]}, r"contract\.channel_mean: values must be finite; entry 0"),
    ({"channel_std": [-1.0, 1.0]}, r"contract\.channel_std: values must be finite and >= 0"),
    ({"image_size": [16]}, r"contract\.image_size"),
    ({"dtype": "int8"}, r"contract\.dtype: 'int8'"),
    ({"channel_names": ["dna", "dna"]}, r"contract\.channel_names: names must be unique"),
    ({"modality": "audio"}, r"contract\.modality: 'audio'"),
    ({"gain": 2}, r"contract\.gain: unknown field"),
])
def test_bad_fields_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        contract_from_dict({**IMAGE, **change})


def test_missing_and_expression_fields_are_named():
    with pytest.raises(ConfigError, match=r"contract\.channel_mean: missing"):
        contract_from_dict({k: v for k, v in IMAGE.items() if k != "channel_mean"})
    with pytest.raises(ConfigError, match=r"gene_mean / gene_std: give both"):
        ExpressionContract(genes=["a"], gene_mean=[0.0])
    with pytest.raises(ConfigError, match=r"contract\.target_sum"):
        contract_from_dict({"modality": "expression", "genes": ["a"], "target_sum": 0})


def test_a_corrupt_contract_on_disk_is_a_file_format_error(tmp_path):
    model = build_method(tiny_image_recipe("simclr"), IMAGE)
    assert model.inputs.contract == contract_from_dict(IMAGE)
    save_model(model, tmp_path / "m")
    assert load(tmp_path / "m").inputs.contract == model.inputs.contract
    config = tmp_path / "m" / "config.json"
    meta = json.loads(config.read_text())
    meta["contract"]["channel_std"] = [1.0, float("nan")]
    config.write_text(json.dumps(meta))
    with pytest.raises(FileFormatError, match=r"config\.json.*contract\.channel_std"):
        load(tmp_path / "m")
