"""Cheap imports: ``import sslcell`` and its encoders load no scanpy, Lightning or anndata, and importing
``sslcell.pl`` never changes the user's matplotlib backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO

HEAVY = ("scanpy", "lightning", "pytorch_lightning", "anndata", "matplotlib.pyplot")


def _run(code: str, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_package_and_encoders_import_nothing_heavy():
    loaded = _run(
        "import json, sys\n"
        "import sslcell, sslcell.encoders, sslcell.encoders.vit, sslcell.encoders.resnet, sslcell.errors\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    assert loaded == []


def test_lazy_attributes_load_on_use():
    loaded = _run(
        "import json, sys\nimport sslcell\nsslcell.tl.embed\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    assert "anndata" in loaded  # the lazy attribute really resolves to the AnnData-level tools


def test_pl_keeps_the_users_matplotlib_backend():
    backends = _run(
        "import json, matplotlib\nbefore = matplotlib.get_backend()\n"
        "import sslcell, sslcell.pl, sslcell.tl, sslcell.classify\n"
        "print(json.dumps([before, matplotlib.get_backend()]))",
        MPLBACKEND="pdf",
    )
    assert backends[0].lower() == "pdf" and backends[1].lower() == "pdf"
