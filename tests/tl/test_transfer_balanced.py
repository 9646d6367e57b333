"""transfer_labels(class_weight="balanced"): each class's votes divided by its share of the reference."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from sslcell import tl
from sslcell.cli import main
from sslcell.errors import ConfigError


def _reference() -> ad.AnnData:
    """90 'common' cells around x = 0 and 10 'rare' cells around x = 1.5, in 1-D (padded to 2-D)."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0.0, 1.0, 90), rng.normal(1.5, 0.3, 10)])
    labels = np.array(["common"] * 90 + ["rare"] * 10)
    return ad.AnnData(obs={"cell_type": labels}, obsm={"X": np.stack([x, np.zeros_like(x)], 1).astype(np.float32)})


def _query(x: float) -> ad.AnnData:
    return ad.AnnData(obs={"i": [0]}, obsm={"X": np.array([[x, 0.0]], np.float32)})


def test_balanced_votes_are_the_vote_shares_divided_by_the_class_shares():
    reference = _reference()
    plain, balanced = _query(1.5), _query(1.5)
    tl.transfer_labels(plain, reference, "cell_type", use_rep="X", n_neighbors=30, weights="uniform")
    tl.transfer_labels(balanced, reference, "cell_type", use_rep="X", n_neighbors=30, weights="uniform",
                       class_weight="balanced")
    share_rare = 1.0 - plain.obs["cell_type_confidence"].iloc[0] if plain.obs["cell_type_pred"].iloc[0] == "common" \
        else plain.obs["cell_type_confidence"].iloc[0]
    weighted = np.array([(1 - share_rare) / 0.9, share_rare / 0.1])
    expected = weighted / weighted.sum()
    assert plain.obs["cell_type_pred"].iloc[0] == "common"  # 30 neighbours: most are common cells
    assert balanced.obs["cell_type_pred"].iloc[0] == "rare"
    assert balanced.obs["cell_type_confidence"].iloc[0] == pytest.approx(expected.max(), rel=1e-5)
    assert balanced.uns["sslcell"]["cell_type_pred"]["class_weight"] == "balanced"


def test_balanced_votes_change_nothing_when_classes_are_equally_common():
    rng = np.random.default_rng(1)
    reference = ad.AnnData(obs={"t": np.repeat(["a", "b", "c"], 20)},
                           obsm={"X": rng.normal(size=(60, 4)).astype(np.float32)})
    query = ad.AnnData(obs={"i": np.arange(30)}, obsm={"X": rng.normal(size=(30, 4)).astype(np.float32)})
    a = tl.transfer_labels(query, reference, "t", use_rep="X", copy=True)
    b = tl.transfer_labels(query, reference, "t", use_rep="X", class_weight="balanced", copy=True)
    assert (a.obs["t_pred"] == b.obs["t_pred"]).all()
    np.testing.assert_allclose(a.obs["t_confidence"], b.obs["t_confidence"], rtol=1e-6)
    with pytest.raises(ConfigError, match="class_weight"):
        tl.transfer_labels(query, reference, "t", use_rep="X", class_weight="inverse", copy=True)


def test_cli_class_weight(tmp_path):
    reference = _reference()
    reference.write_h5ad(tmp_path / "ref.h5ad")
    _query(1.5).write_h5ad(tmp_path / "q.h5ad")
    assert main(["transfer", "--reference", str(tmp_path / "ref.h5ad"), "--query", str(tmp_path / "q.h5ad"),
                 "--label-key", "cell_type", "--use-rep", "X", "--n-neighbors", "30", "--class-weight", "balanced",
                 "--out", str(tmp_path / "out.h5ad")]) == 0
    assert ad.read_h5ad(tmp_path / "out.h5ad").obs["cell_type_pred"].iloc[0] == "rare"
