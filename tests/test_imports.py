"""Cheap imports: ``import sslcell`` and its encoders load no scanpy, Lightning or anndata, and importing
``sslcell.pl`` never changes the user's matplotlib backend. One fresh interpreter makes every observation, in
order (a process per test spent ~10 s each importing torch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

HEAVY = ("scanpy", "lightning", "pytorch_lightning", "anndata", "matplotlib.pyplot")

SESSION = f"""
import json, sys
import matplotlib
seen = {{"backend_before": matplotlib.get_backend()}}
import sslcell, sslcell.encoders, sslcell.encoders.vit, sslcell.encoders.resnet, sslcell.errors
seen["heavy_after_import"] = [m for m in {HEAVY!r} if m in sys.modules]
sslcell.tl.embed
seen["heavy_after_tl_embed"] = [m for m in {HEAVY!r} if m in sys.modules]
import sslcell.pl, sslcell.tl, sslcell.classify
seen["backend_after_pl"] = matplotlib.get_backend()
print(json.dumps(seen))
"""


@pytest.fixture(scope="module")
def seen() -> dict:
    out = subprocess.run([sys.executable, "-c", SESSION], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "MPLBACKEND": "pdf"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_package_and_encoders_import_nothing_heavy(seen):
    assert seen["heavy_after_import"] == []


def test_lazy_attributes_load_on_use(seen):
    assert "anndata" in seen["heavy_after_tl_embed"]  # the lazy attribute really resolves to the AnnData-level tools


def test_pl_keeps_the_users_matplotlib_backend(seen):
    assert seen["backend_before"].lower() == "pdf" and seen["backend_after_pl"].lower() == "pdf"
