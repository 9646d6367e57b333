from pathlib import Path

import pytest

from sslcell.config import RecipeConfig, load_config, read_yaml
from sslcell.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    config = load_config(path)
    assert config.method.name in path.stem


def test_one_recipe_per_expression_method():
    names = {load_config(p).method.name for p in CONFIGS if load_config(p).modality == "expression"}
    assert {"mae", "byol", "barlow_twins", "simclr", "vicreg"} <= names


def test_round_trip():
    config = RecipeConfig.from_dict({"method": {"name": "byol", "momentum": 0.9}, "optim": {"lr": "1e-3"}})
    assert config.optim.lr == pytest.approx(1e-3)
    assert RecipeConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "values, field",
    [
        ({"method": {"nmae": "mae"}}, "method.nmae"),
        ({"encoder": {"hidden": [512, "wide"]}}, "encoder.hidden[1]"),
        ({"train": {"max_epochs": 1.5}}, "train.max_epochs"),
        ({"method": {"masking": "genes"}}, "method.masking"),
        ({"method": {"mask_rate": 1.5}}, "method.mask_rate"),
        ({"method": {"name": "dino"}}, "method.name"),
        ({"data": {"batch_size": 0}}, "data.batch_size"),
        ({"train": {"progress_bar": "yes"}}, "train.progress_bar"),
        ({"encoder": {"hidden": [32, -4]}}, "encoder.hidden"),
        ({"encoder": {"latent": 0}}, "encoder.latent"),
        ({"encoder": {"dropout": 1.0}}, "encoder.dropout"),
        ({"train": {"devices": 0}}, "train.devices"),
        ({"train": {"accelerator": "tpu"}}, "train.accelerator"),
    ],
)
def test_errors_name_the_field(values, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        RecipeConfig.from_dict(values)


def test_load_config_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("method: {name: mae, mask_rate: [1]}\n")
    with pytest.raises(ConfigError, match="bad.yaml.*method.mask_rate"):
        load_config(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such config"):
        load_config(tmp_path / "missing.yaml")


def test_read_yaml_errors_name_the_file_and_its_role(tmp_path):
    assert read_yaml(_text(tmp_path / "empty.yaml", "")) == {}
    assert read_yaml(_text(tmp_path / "ok.yaml", "a: 1\n")) == {"a": 1}
    with pytest.raises(ConfigError, match=r"missing.yaml: no such suite file"):
        read_yaml(tmp_path / "missing.yaml", "suite")
    with pytest.raises(ConfigError, match=r"folder: cannot read the suite file"):
        read_yaml(_folder(tmp_path / "folder"), "suite")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML \(.*line 1"):
        read_yaml(_text(tmp_path / "bad.yaml", "a: [1\n"))
    with pytest.raises(ConfigError, match=r"list.yaml: the top level must be a mapping, got list"):
        read_yaml(_text(tmp_path / "list.yaml", "- 1\n"))


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


def test_recipe_built_in_python_is_type_checked_like_yaml():
    config = RecipeConfig()
    config.train.max_epochs = "3"  # a string where YAML would have given an integer
    with pytest.raises(ConfigError, match=r"train.max_epochs: expected an integer, got '3'"):
        config.check()
    config = RecipeConfig()
    config.optim.lr = 1  # an integer where the field is a float: accepted, as from YAML
    config.check()
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    import numpy as np

    config.train.max_epochs, config.optim.lr = np.int64(3), np.float32(0.5)  # e.g. from a NumPy grid
    config.check()
    assert (config.train.max_epochs, config.optim.lr) == (3, 0.5) and type(config.train.max_epochs) is int
