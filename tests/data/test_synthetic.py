from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from scipy.stats import rankdata
from sklearn.decomposition import PCA
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from sslcell.data.synthetic import make_expression, programmes_of
from sslcell.errors import ConfigError, InputError

SMALL = dict(n_cells=800, n_genes=400, n_cell_types=4, n_batches=3, seed=3)


def _lognorm(adata: ad.AnnData) -> np.ndarray:
    x = adata.X.toarray().astype(float)
    return np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4)


def test_layout_types_and_names():
    a = make_expression(**SMALL)
    assert a.shape == (800, 400)
    assert sp.isspmatrix_csr(a.X) and a.X.dtype == np.int32 and a.X.min() >= 0
    assert list(a.obs["cell_type"].cat.categories) == ["typeA", "typeB", "typeC", "typeD"]
    assert list(a.obs["batch"].cat.categories) == ["batch0", "batch1", "batch2"]
    assert list(a.obs["cycle_phase"].cat.categories) == ["G1", "S", "G2M"]
    theta = a.obs["cycle_theta"].to_numpy()
    assert theta.min() >= 0 and theta.max() < 2 * np.pi
    np.testing.assert_array_equal(a.obs["total_counts"], np.asarray(a.X.sum(1)).ravel())
    assert a.var_names.is_unique
    names = set(a.var_names)
    assert {"typeA_00", "typeD_00", "S_00", "S_19", "G2M_19"} <= names and "G2M_20" not in names
    plain = [n for n in names if n.startswith("gene_")]
    assert plain and all(len(n) == len("gene_0000") for n in plain)
    params = a.uns["synthetic"]["params"]
    assert params["seed"] == 3 and params["n_genes"] == 400 and params["n_programme_genes"] == 30


def test_deterministic_per_seed():
    a, b, c = make_expression(**SMALL), make_expression(**SMALL), make_expression(**{**SMALL, "seed": 4})
    assert (a.X != b.X).nnz == 0
    assert a.obs.equals(b.obs) and a.var.equals(b.var)
    assert (a.X != c.X).nnz > 0


def test_cell_types_have_unequal_sizes():
    counts = make_expression().obs["cell_type"].value_counts()
    assert len(counts) == 6 and counts.min() > 50
    assert counts.max() > 3 * counts.min()


def test_programmes_are_flagged_overlap_and_are_upregulated_in_their_type():
    a = make_expression(**SMALL)
    progs = programmes_of(a)
    assert list(progs) == ["S", "G2M", "typeA", "typeB", "typeC", "typeD"]
    assert all(len(progs[f"type{t}"]) == 30 for t in "ABCD") and len(progs["S"]) == len(progs["G2M"]) == 20
    for name, genes in progs.items():
        flagged = a.var_names[a.var[f"programme_{name}"].to_numpy()]
        assert set(flagged) == set(genes)
    assert len(set(progs["typeA"]) & set(progs["typeB"])) == 6  # programme_overlap 0.2 of 30
    assert a.var.loc["typeA_00", "programme"] == "typeA" and a.var.loc["S_00", "programme"] == "S"

    x, cell_type = _lognorm(a), a.obs["cell_type"].to_numpy()
    for t in "ABCD":
        cols = a.var_names.get_indexer(progs[f"type{t}"])
        inside, outside = x[cell_type == f"type{t}"][:, cols].mean(), x[cell_type != f"type{t}"][:, cols].mean()
        assert inside > outside + 0.3, t


def test_cycle_genes_peak_in_their_phase():
    a = make_expression(**SMALL)
    progs, x = programmes_of(a), _lognorm(a)
    theta, phase = a.obs["cycle_theta"].to_numpy(), a.obs["cycle_phase"].to_numpy()
    np.testing.assert_array_equal(phase == "G1", theta < np.pi)
    np.testing.assert_array_equal(phase == "G2M", theta >= 1.5 * np.pi)
    score = {p: x[:, a.var_names.get_indexer(progs[p])].mean(1) for p in ("S", "G2M")}
    by_phase = {p: {ph: score[p][phase == ph].mean() for ph in ("G1", "S", "G2M")} for p in score}
    assert by_phase["S"]["S"] > max(by_phase["S"]["G1"], by_phase["S"]["G2M"]) + 0.1
    assert by_phase["G2M"]["G2M"] > max(by_phase["G2M"]["G1"], by_phase["G2M"]["S"]) + 0.1
    # the phase angle is recoverable from the two scores (continuous programme, not three blobs)
    peak_s = theta[np.argmax(np.convolve(score["S"][np.argsort(theta)], np.ones(51) / 51, "same"))]
    assert abs(peak_s - 1.25 * np.pi) < 0.3 * np.pi


def test_batches_shift_library_size_and_genes():
    a = make_expression(**{**SMALL, "batch_library_shift": 0.4, "library_sd": 0.2})
    factors = np.asarray(a.uns["synthetic"]["batch_library_factors"])
    np.testing.assert_allclose(factors, np.exp([-0.4, 0.0, 0.4]))
    lib = a.obs.groupby("batch", observed=True)["library_size"].mean().to_numpy()
    np.testing.assert_allclose(lib / lib[1], factors, rtol=0.06)
    total = a.obs.groupby("batch", observed=True)["total_counts"].mean().to_numpy()
    np.testing.assert_allclose(total / lib, 1.0, rtol=0.03)

    def gene_shift(batch_effect: float) -> float:
        b = make_expression(**{**SMALL, "batch_effect": batch_effect})
        x, batch = _lognorm(b), b.obs["batch"].to_numpy()
        return float(np.abs(x[batch == "batch0"].mean(0) - x[batch == "batch1"].mean(0)).mean())

    assert gene_shift(0.5) > 2 * gene_shift(0.0)


def test_counts_follow_the_negative_binomial():
    """With every effect switched off all cells share one mean profile: check per-gene mean and variance."""
    theta = 3.0
    a = make_expression(
        n_cells=4000, n_genes=200, n_cell_types=1, n_batches=1, cycle_genes=0, seed=1, dispersion=theta,
        batch_effect=0.0, programme_lfc=0.0, type_noise=0.0, library_sd=0.0, batch_library_shift=0.0,
        mean_library_size=1000.0, base_sd=0.5,
    )
    x = a.X.toarray().astype(float)
    np.testing.assert_allclose(a.obs["library_size"], 1000.0)
    mean, var = x.mean(0), x.var(0)
    expected = mean + mean**2 / theta
    keep = mean > 2
    assert keep.sum() > 50
    ratio = var[keep] / expected[keep]
    assert abs(np.median(ratio) - 1) < 0.05 and np.all(np.abs(ratio - 1) < 0.3)


def test_not_trivially_separable_but_structured():
    """Defaults: no single gene separates a type, yet PCA + kNN recovers types far above chance."""
    a = make_expression()
    x, y = _lognorm(a), a.obs["cell_type"].cat.codes.to_numpy()
    ranks = rankdata(x, axis=0)
    for k in range(6):
        pos = y == k
        auc = (ranks[pos].sum(0) - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum())
        assert np.max(np.maximum(auc, 1 - auc)) < 0.98
    pcs = PCA(20, random_state=0).fit_transform(x - x.mean(0))
    acc = cross_val_score(KNeighborsClassifier(15), pcs, y, cv=3).mean()
    assert 0.7 < acc < 0.99


def test_h5ad_round_trip(tmp_path):
    a = make_expression(**SMALL)
    a.write_h5ad(tmp_path / "syn.h5ad")
    b = ad.read_h5ad(tmp_path / "syn.h5ad")
    assert programmes_of(b) == programmes_of(a)
    assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs)


def test_bad_sizes_and_foreign_data():
    with pytest.raises(ConfigError, match="n_genes=100 is too small"):
        make_expression(n_genes=100)
    with pytest.raises(ConfigError, match="n_cells"):
        make_expression(n_cells=0)
    with pytest.raises(ConfigError, match="dispersion"):
        make_expression(**SMALL, dispersion=0.0)
    with pytest.raises(InputError, match="synthetic"):
        programmes_of(ad.AnnData(np.zeros((2, 2))))


def _digest(a: ad.AnnData) -> str:
    """Counts, codes and names exactly; the float obs columns to 9 significant digits, since numpy's exp and log
    differ in the last bit between CPUs (its AVX-512 and AVX2 kernels), which the library sizes inherit."""
    import hashlib

    def rounded(x: np.ndarray) -> np.ndarray:
        return np.array([float(f"{v:.9g}") for v in x])

    h = hashlib.sha256()
    for arr in (a.X.data, a.X.indices, a.X.indptr, rounded(a.obs["cycle_theta"].to_numpy()),
                rounded(a.obs["library_size"].to_numpy()), a.obs["cell_type"].cat.codes.to_numpy(),
                a.obs["batch"].cat.codes.to_numpy(), a.obs["cycle_phase"].cat.codes.to_numpy()):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update("\n".join(a.var_names).encode())
    h.update("\n".join(a.var["programme"].astype(str)).encode())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("kwargs,digest,total", [
    ({}, "8ad3f043bafd85ce", 6273141),
    (SMALL, "8d1b9aba2828d28e", 1601329),
    ({**SMALL, "cycle_programme": "s_g2m"}, "8d1b9aba2828d28e", 1601329),
])
def test_default_output_is_unchanged_by_the_cycle_programme_option(kwargs, digest, total):
    """Counts, obs and var of the default (and explicit ``"s_g2m"``) programme are those of the generator before
    ``cycle_programme`` existed (README's quickstart table depends on them). The digests were first computed on that
    code with raw float bytes (a9de362b..., 1d18f5e9...), which the code at f413979 still matched on an AVX-512 CPU;
    these, with rounded floats, were computed from f413979 on an AVX2 CPU."""
    a = make_expression(**kwargs)
    assert int(a.X.sum()) == total
    assert _digest(a) == digest


def test_whitfield_programme_marks_every_phase_and_resolves_mid_g1():
    a = make_expression(**SMALL, cycle_programme="whitfield")
    progs, x = programmes_of(a), _lognorm(a)
    groups = ["MG1", "G1S", "S", "G2", "G2M"]
    assert list(progs)[:5] == groups and all(len(progs[g]) == 8 for g in groups)  # 40 cycle genes, 5 groups
    assert a.uns["synthetic"]["params"]["cycle_programme"] == "whitfield"
    assert set(a.uns["synthetic"]["phase_peaks"]) == set(groups)
    theta = a.obs["cycle_theta"].to_numpy()
    assert (a.obs["cycle_phase"].astype(str).to_numpy() == np.where(
        theta < np.pi, "G1", np.where(theta < 1.5 * np.pi, "S", "G2M"))).all()
    order = np.argsort(theta)
    peaks = {}
    for g in groups:
        score = x[:, a.var_names.get_indexer(progs[g])].mean(1)
        smooth = np.convolve(np.r_[score[order][-50:], score[order], score[order][:50]], np.ones(101) / 101, "same")
        peaks[g] = theta[order][np.argmax(smooth[50:-50])]
        expected = a.uns["synthetic"]["phase_peaks"][g]
        assert abs(np.angle(np.exp(1j * (peaks[g] - expected)))) < 0.25 * np.pi, g
    # mid-G1: the M/G1 score falls and the G1/S score rises between 0.3 pi and 0.7 pi (the default has neither)
    early, late = (theta > 0.25 * np.pi) & (theta < 0.4 * np.pi), (theta > 0.6 * np.pi) & (theta < 0.75 * np.pi)
    for g, sign in (("MG1", 1), ("G1S", -1)):
        score = x[:, a.var_names.get_indexer(progs[g])].mean(1)
        assert sign * (score[early].mean() - score[late].mean()) > 0.1, g
    default = make_expression(**SMALL)
    assert not any(name.startswith(("MG1_", "G1S_", "G2_")) for name in default.var_names)


def test_whitfield_programme_refusals():
    with pytest.raises(ConfigError, match="cycle_programme must be one of"):
        make_expression(**SMALL, cycle_programme="tricycle")
    with pytest.raises(ConfigError, match="needs cycle_genes >= 5"):
        make_expression(**SMALL, cycle_programme="whitfield", cycle_genes=4)
    assert make_expression(**SMALL, cycle_programme="whitfield", cycle_genes=0).var["programme"].cat.categories[
        1] == "typeA"
