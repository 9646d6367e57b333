"""Every released checkpoint format stays loadable: the committed fixtures (tests/fixtures/checkpoints/format<N>/,
written once by make_fixture.py and never regenerated) load and compute what the release that wrote them computed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import sslcell
from sslcell.checkpoint import FORMAT_VERSION, READABLE_FORMATS
from sslcell.classify import load_classifier
from sslcell.errors import FileFormatError

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"


def test_the_current_format_is_readable_and_every_readable_format_has_a_fixture():
    assert FORMAT_VERSION in READABLE_FORMATS
    for version in READABLE_FORMATS:
        assert (FIXTURES / f"format{version}" / "expected.npz").is_file(), f"no fixture for format {version}"


@pytest.mark.parametrize("version", READABLE_FORMATS)
def test_released_models_and_classifiers_load_and_compute_as_when_written(version):
    folder = FIXTURES / f"format{version}"
    expected = np.load(folder / "expected.npz", allow_pickle=False)
    counts, crops = torch.from_numpy(expected["counts"]), torch.from_numpy(expected["crops"])
    expression, image = sslcell.load(folder / "expression_mae"), sslcell.load(folder / "image_simclr")
    with torch.no_grad():
        np.testing.assert_allclose(expression.encoder(expression.inputs.normalize(counts)).numpy(),
                                   expected["expression_embedding"], atol=1e-5)
        np.testing.assert_allclose(image.encoder(image.inputs.normalize(crops)).numpy(),
                                   expected["image_embedding"], atol=1e-4)
    for name, batch in (("expression", counts), ("image", crops)):
        classifier = load_classifier(folder / f"{name}_classifier")
        np.testing.assert_allclose(classifier.predict_proba(batch).numpy(), expected[f"{name}_proba"], atol=1e-5)


def test_model_directories_carry_a_model_card():
    card = (FIXTURES / f"format{FORMAT_VERSION}" / "expression_mae" / "README.md").read_text()
    assert "Method:** mae" in card and "Seed:" in card and "Versions:" in card


@pytest.mark.parametrize("version,message", [
    (FORMAT_VERSION + 1, "written by a newer sslcell"),
    ("1", "is not an sslcell format"),
    (None, "is not an sslcell format"),
    (True, "is not an sslcell format"),
])
@pytest.mark.parametrize("what", ["expression_mae", "expression_classifier"])
def test_an_unreadable_format_version_is_refused_with_the_reason(tmp_path, version, message, what):
    target = tmp_path / what
    shutil.copytree(FIXTURES / f"format{FORMAT_VERSION}" / what, target)
    config = target / ("config.json" if what == "expression_mae" else "classifier.json")
    meta = json.loads(config.read_text())
    meta["format_version"] = version
    config.write_text(json.dumps(meta))
    reader = sslcell.load if what == "expression_mae" else load_classifier
    with pytest.raises(FileFormatError, match=message):
        reader(target)
