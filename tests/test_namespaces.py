"""dir() of sslcell's packages (what tab completion offers): the public API, lazy names included, not imports."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PACKAGES = ["sslcell", "sslcell.tl", "sslcell.pl", "sslcell.classify", "sslcell.evaluate", "sslcell.transfer"]


@pytest.mark.parametrize("name", PACKAGES)
def test_dir_lists_the_public_api_and_not_imported_helpers(name):
    module = importlib.import_module(name)
    listed = dir(module)
    assert set(module.__all__) <= set(listed)
    assert not {"Any", "annotations", "warnings", "importlib", "TYPE_CHECKING"} & set(listed)
    assert "__name__" in listed and "__doc__" in listed
    for attribute in listed:  # every name offered resolves (no deprecated or missing lazy name)
        getattr(module, attribute)


def test_lazy_names_are_listed_before_first_use():
    code = "import sys, sslcell; d = dir(sslcell); print('pretrain' in d, 'tl' in d, 'sslcell.train' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "False"]  # listed, not imported by listing
