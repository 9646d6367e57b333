"""The README's Python and CLI tours run as written, on small stand-ins for the files they name.

Stand-ins: ``atlas.h5ad`` and ``atlas_shards/`` (the same cells, two shards), ``my_cells.h5ad`` and
``reference.h5ad`` (synthetic counts with ``cell_type``), ``crops.npz`` / ``train_crops.npz`` / ``test_crops.npz``
(16 x 16 crops with named channels, ``label``, ``labels`` and ``plate``). Only the training budgets are cut
(1 epoch, batches of 32): the code is the README's, line for line. ``sslcell quickstart`` runs in its own test.
"""

from __future__ import annotations

import re
import shlex

import numpy as np
import pytest

import sslcell
from sslcell import classify
from sslcell.cli import main
from sslcell.data.synthetic import make_expression
from tests.conftest import REPO

TEXT = (REPO / "README.md").read_text()


def _section(start: str, end: str) -> str:
    return TEXT[TEXT.index(start) : TEXT.index(end)]


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _crops(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    yy, xx = np.mgrid[:16, :16]
    centre = rng.uniform(5, 11, size=(n, 2))
    blob = np.exp(-((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2) / 10.0)
    images = np.stack([40 + 150 * blob, 30 + np.where(y == 1, 120, 50)[:, None, None] * blob,
                       20 + 90 * blob * (1 + y[:, None, None])], axis=1)
    images = np.clip(images + rng.normal(0, 8, images.shape), 0, 255).astype(np.uint8)
    labels = np.array(["G1", "M"])[y]
    return {"images": images, "channel_names": np.array(["brightfield", "fluorescence", "darkfield"]),
            "label": labels, "labels": labels, "plate": np.array(["plate1", "plate2", "plate3"])[np.arange(n) % 3]}


def _tirosh_names(names) -> list[str]:
    """The simulated cycle genes (S_xx, G2M_xx) renamed to shipped Tirosh S and G2/M symbols, mouse-cased."""
    from sslcell.data.genesets import example_programmes

    shipped = example_programmes()
    s, g2m = iter(shipped["TIROSH2016_S_PHASE"]), iter(shipped["TIROSH2016_G2M_PHASE"])
    return [next(s).capitalize() if n.startswith("S_") else next(g2m).capitalize() if n.startswith("G2M_") else n
            for n in names]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "configs").symlink_to(REPO / "configs")
    (tmp_path / "benchmarks").symlink_to(REPO / "benchmarks")
    counts = make_expression(n_cells=900, n_genes=300, n_cell_types=4, n_batches=2, seed=3)
    counts.var_names = _tirosh_names(counts.var_names)
    (tmp_path / "atlas_shards").mkdir()
    counts[:300].write_h5ad(tmp_path / "atlas_shards" / "part0.h5ad")
    counts[300:600].write_h5ad(tmp_path / "atlas_shards" / "part1.h5ad")
    counts[:600].write_h5ad(tmp_path / "atlas.h5ad")
    counts[600:800].write_h5ad(tmp_path / "my_cells.h5ad")
    counts[800:].write_h5ad(tmp_path / "reference.h5ad")
    counts[700:].write_h5ad(tmp_path / "more_cells.h5ad")
    np.savez(tmp_path / "crops.npz", **_crops(96, 0))
    np.savez(tmp_path / "train_crops.npz", **_crops(64, 1))
    np.savez(tmp_path / "test_crops.npz", **_crops(32, 2))
    monkeypatch.chdir(tmp_path)

    def small(recipe):
        config = real_load_config(recipe)
        config.train.max_epochs, config.train.progress_bar, config.train.accelerator = 1, False, "cpu"
        config.data.batch_size = 32
        return config

    real_load_config, real_config = sslcell.config.load_config, classify.FinetuneConfig
    monkeypatch.setattr(sslcell, "load_config", small)
    monkeypatch.setattr(sslcell.config, "load_config", small)
    class SmallFinetune(real_config):
        def __post_init__(self) -> None:
            for name, value in {"epochs": 1, "batch_size": 32, "progress_bar": False, "accelerator": "cpu"}.items():
                object.__setattr__(self, name, value)
            super().__post_init__()

    monkeypatch.setattr(classify, "FinetuneConfig", SmallFinetune)
    return tmp_path


def test_python_tour_runs_as_written(workdir):
    blocks = _blocks(_section("## Python tour", "## CLI tour"), "python")
    assert len(blocks) == 2
    namespaces = []
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (our own README)
        namespaces.append(namespace)
    assert (workdir / "umap.png").is_file() and (workdir / "confusion.png").is_file()
    assert (workdir / "cycle.png").is_file() and (workdir / "runs" / "cycle_recipe" / "cycle.json").is_file()
    assert (workdir / "runs" / "img_classifier").is_dir()
    assert "sslcell_pred_proba" in namespace["pred"].obsm
    expression = namespaces[0]
    assert expression["ref"].uns["sslcell"]["cycle_sslcell"]["projected"]
    assert expression["run"].markdown_path.is_file() and not expression["run"].errors


def test_cli_tour_runs_as_written(workdir, capsys):
    block = _blocks(_section("## CLI tour", "## Architecture"), "bash")[0]
    commands = [line.split("#")[0] for line in block.splitlines() if line.startswith("sslcell ")]
    assert len(commands) >= 8
    for line in commands:
        argv = shlex.split(re.sub(r"\[[^\]]*\]", "", line))[1:]  # drop the optional [--flags]
        if argv[0] == "quickstart":
            continue  # tests/test_quickstart.py
        if argv[0] == "pretrain":
            argv += ["--max-epochs", "1"]
        assert main(argv) == 0, (line, capsys.readouterr().err)
    assert (workdir / "runs" / "pred" / "predictions.h5ad").is_file()
    assert (workdir / "report.md").is_file() and (workdir / "runs" / "clf").is_dir()
    assert "pixel" in (workdir / "crop_report.md").read_text().lower()
    assert (workdir / "more_cycled.h5ad").is_file() and (workdir / "bench_quick" / "crop_speed_quick.md").is_file()
