"""fit_cycle: recovers known angles on a noisy ring, anchors direction and origin, warns on a blob; metrics."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.stats import spearmanr

from sslcell.cellcycle import CycleFit, closure, fit_cycle
from sslcell.cellcycle.fit import default_phase_order
from sslcell.errors import FileFormatError, InputError, SSLCellWarning
from sslcell.evaluate import circular_correlation, cyclic_spearman, phase_arc_accuracy

PHASES = ["G1", "S", "G2M"]
STARTS = [0.0, np.pi, 1.5 * np.pi]


def ring(n: int = 600, seed: int = 0, noise: float = 0.05, dim: int = 10, skew: bool = True):
    """Cells on a tilted ellipse in ``dim`` dimensions, plus noise and a stronger unrelated direction; known θ
    (G1 crowded: half the cells) and phases."""
    rng = np.random.default_rng(seed)
    theta = np.mod(rng.uniform(0, 2 * np.pi, n) ** (1.3 if skew else 1.0) / (2 * np.pi) ** (0.3 if skew else 0),
                   2 * np.pi)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    x = np.column_stack([3 * np.cos(theta), 1.5 * np.sin(theta)]) @ q[:, :2].T
    x += noise * rng.normal(size=(n, dim)) * 1.5 + 5.0
    phase = np.array(PHASES, dtype=object)[np.searchsorted(STARTS, theta, side="right") - 1]
    return x, theta, phase


def angular_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(np.angle(np.exp(1j * (a - b))))


@pytest.mark.parametrize("n,noise,skew,max_error", [(3000, 0.01, False, 0.03), (600, 0.05, False, 0.25),
                                                     (600, 0.05, True, 0.25)])
def test_anchored_theta_recovers_the_known_angles(n, noise, skew, max_error):
    x, theta, phase = ring(n=n, noise=noise, skew=skew)
    fit = fit_cycle(x, phase, PHASES)
    estimate = fit.theta(x)
    assert circular_correlation(estimate, theta) > 0.97
    # radians. Phase arcs are as wide as the phases' shares of the labelled cells, so with 600 cells the sampling
    # error of those shares (about 0.02 x 2π) shifts the origin; crowded cells (skew) also bend the scaled ellipse
    assert np.median(angular_error(estimate, theta)) < max_error
    assert fit.direction in (1, -1) and fit.anchored and fit.anchor_accuracy > 0.9
    assert fit.residual < 0.15 and fit.closure > 0.95 and fit.explained_variance > 0.8
    assert phase_arc_accuracy(estimate, phase, fit.phases, fit.phase_starts) > 0.9
    assert set(fit.phase(estimate)) == set(PHASES)


def test_a_mirrored_and_rotated_ring_gets_the_same_anchored_theta():
    x, theta, phase = ring(seed=1)
    mirrored = x * np.r_[-1.0, np.ones(x.shape[1] - 1)]  # flip one axis: the ring runs the other way round
    a, b = fit_cycle(x, phase, PHASES).theta(x), fit_cycle(mirrored, phase, PHASES).theta(mirrored)
    assert np.median(angular_error(a, b)) < 0.05


def test_a_few_labelled_cells_anchor_the_cycle():
    x, theta, phase = ring(seed=2)
    few = np.full(len(phase), None, dtype=object)
    rows = np.random.default_rng(0).choice(len(phase), 30, replace=False)
    few[rows] = phase[rows]
    estimate = fit_cycle(x, few, PHASES).theta(x)
    assert np.median(angular_error(estimate, theta)) < 0.3


def test_a_blob_warns_and_an_arc_has_low_closure():
    rng = np.random.default_rng(0)
    with pytest.warns(UserWarning, match="closed trajectory"):
        fit = fit_cycle(rng.normal(size=(500, 5)))
    assert fit.residual > 0.25
    t = rng.uniform(0, np.pi, 400)
    assert closure(t) < 0.55
    arc = np.column_stack([np.cos(t), np.sin(t)]) + 0.01 * rng.normal(size=(400, 2))
    with pytest.warns(UserWarning, match=r"trajectory: closure 0\.\d+ without axis scaling < 0\.75 \(an arc") as got:
        fit_cycle(arc)  # says which check failed: not the residual, which is fine on an arc
    assert "residual" not in str(got[0].message).split(";")[0]
    assert closure(rng.uniform(0, 2 * np.pi, 2000)) > 0.98


def test_fit_round_trips_through_a_dict():
    x, _, phase = ring(seed=3)
    fit = fit_cycle(x, phase, PHASES)
    again = CycleFit.from_dict({k: np.asarray(v) if isinstance(v, list) else v for k, v in fit.to_dict().items()})
    np.testing.assert_allclose(again.theta(x), fit.theta(x))


def test_bad_input_is_refused():
    x, _, phase = ring(n=50)
    with pytest.raises(InputError, match="N >= 3 cells, D >= 2"):
        fit_cycle(x[:, :1])
    with pytest.raises(InputError, match="NaN"):
        fit_cycle(np.where(np.eye(50, 10) == 1, np.nan, x))
    with pytest.raises(InputError, match="not in the phase order"):
        fit_cycle(x, phase, ["G1", "S"])
    with pytest.raises(InputError, match="one label per cell"):
        fit_cycle(x, phase[:10], PHASES)
    with pytest.raises(InputError, match="two directions"):
        fit_cycle(np.column_stack([np.arange(50.0), np.zeros(50)]))
    with pytest.raises(InputError, match="dimensions"):
        fit_cycle(x).theta(x[:, :5])


def test_circular_correlation_known_values():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 2 * np.pi, 500)
    assert circular_correlation(a, a) == pytest.approx(1.0)
    assert circular_correlation(a, -a) == pytest.approx(-1.0)
    assert circular_correlation(a, a + 1.0) == pytest.approx(1.0)  # a rotation does not change it
    assert abs(circular_correlation(a, rng.uniform(0, 2 * np.pi, 500))) < 0.15
    with pytest.raises(InputError, match="same shape"):
        circular_correlation(a, a[:10])


def test_circular_correlation_for_uniform_angles_ignores_the_noisy_mean_direction():
    rng = np.random.default_rng(0)
    truth = rng.uniform(0, 2 * np.pi, 2000)
    warped = truth + 0.6 * np.sin(truth) + 2.0 + rng.normal(0, 0.2, truth.size)  # right order, uneven speed
    assert circular_correlation(warped, truth, uniform=True) > 0.8
    assert circular_correlation(-warped, truth, uniform=True) < -0.8
    assert abs(circular_correlation(rng.uniform(0, 2 * np.pi, truth.size), truth, uniform=True)) < 0.1
    assert circular_correlation(truth + 1.0, truth, uniform=True) == pytest.approx(1.0, abs=0.05)


def test_cyclic_spearman_finds_the_cut_and_the_direction():
    rng = np.random.default_rng(0)
    theta = rng.uniform(0, 2 * np.pi, 300)
    phase = np.array(PHASES, dtype=object)[np.searchsorted(STARTS, theta, side="right") - 1]
    rotated_reversed = np.mod(2.0 - theta, 2 * np.pi)
    result = cyclic_spearman(rotated_reversed, phase, PHASES)
    assert result["spearman"] > 0.9 and result["direction"] == -1.0  # ties in 3 phases cap it near 0.93
    at_true_cut = spearmanr(theta, np.searchsorted(STARTS, theta, side="right")).statistic
    assert cyclic_spearman(theta, phase, PHASES)["spearman"] == pytest.approx(at_true_cut, abs=1e-9)
    shuffled = cyclic_spearman(theta, rng.permutation(phase), PHASES)["spearman"]
    assert shuffled < 0.3


def test_phase_arc_accuracy_by_hand():
    theta = np.array([0.1, 3.5, 5.0, 0.2])
    phase = np.array(["G1", "S", "G2M", "S"])
    assert phase_arc_accuracy(theta, phase, PHASES, STARTS) == pytest.approx(0.75)
    with pytest.raises(InputError, match="phase_starts"):
        phase_arc_accuracy(theta, phase, PHASES, [0.0, 3.0, 2.0])


def test_anchors_that_contradict_the_path_warn():
    x, _, phase = ring(seed=5)
    shuffled = np.random.default_rng(0).permutation(phase)
    with pytest.warns(UserWarning, match="anchors contradict"):
        fit = fit_cycle(x, shuffled, PHASES)
    assert fit.anchor_accuracy < (1 + fit.anchor_chance) / 2


def test_cells_of_one_phase_projected_onto_a_fit_of_all_phases_fall_in_their_arc():
    """A second acquisition of cells all in one phase: fitted alone, they would spread round the whole circle;
    placed on the reference fit (all phases), their θ falls in their phase's arc."""
    x, theta, phase = ring(n=1200, seed=6, skew=False)  # skew=True: crowding bends the arcs (see above)
    reference, new = np.arange(600), np.arange(600, 1200)
    fit = fit_cycle(x[reference], phase[reference], PHASES)
    for p in PHASES:
        cells = new[phase[new] == p]
        placed = fit.theta(x[cells])
        assert np.mean(fit.phase(placed) == p) > 0.85, p
        assert phase_arc_accuracy(placed, phase[cells], fit.phases, fit.phase_starts) > 0.85
        assert fit.residual_of(x[cells]) < 0.15  # they lie on the reference circle
        with pytest.warns(UserWarning, match="closed trajectory"):  # a fit of their own: an arc, warned
            alone = fit_cycle(x[cells])
        assert alone.closure_unscaled < 0.5 < alone.closure  # the axis scaling bends the arc into a horseshoe


def test_residual_of_other_cells_and_reanchoring_keep_the_circle():
    x, theta, phase = ring(n=800, seed=7)
    anchored = fit_cycle(x, phase, PHASES)
    bare = fit_cycle(x)
    assert not bare.anchored and bare.closure_unscaled > 0.9
    again = bare.reanchored(x, phase, PHASES)
    assert again.anchored and not bare.anchored  # a new fit; the old one is left as it was
    assert np.median(angular_error(again.theta(x), anchored.theta(x))) < 0.02
    assert again.phase_starts == pytest.approx(anchored.phase_starts)
    assert bare.residual_of(x) == pytest.approx(bare.residual)
    blob = np.random.default_rng(0).normal(size=(300, x.shape[1])) + x.mean(axis=0)
    assert bare.residual_of(blob) > 0.4
    with pytest.warns(UserWarning, match="anchors contradict"):
        bare.reanchored(x, np.random.default_rng(1).permutation(phase), PHASES)


def test_the_default_phase_order_follows_the_cycle_not_the_alphabet():
    assert default_phase_order(["S", "G2M", "G1", "S"]) == ["G1", "S", "G2M"]
    assert default_phase_order(["S", "G1", "G2M"], ["G1", "G2M", "S"]) == ["G1", "S", "G2M"]  # sorted: by name
    assert default_phase_order([], ["S", "G2M", "G1"]) == ["S", "G2M", "G1"]  # set on purpose: kept
    assert default_phase_order([], ["G1", "G2M", "S"], ordered=True) == ["G1", "G2M", "S"]
    assert default_phase_order(["telophase", "G1", "Prophase", "S", "G2", "metaphase", "anaphase"]) == [
        "G1", "S", "G2", "Prophase", "metaphase", "anaphase", "telophase"]
    assert default_phase_order(["b", "a"]) == ["a", "b"]  # two arcs: the order sets only the origin
    # a sorted categorical's categories without cells (set to NaN, e.g. 'unassigned') are not phases
    assert default_phase_order(["G1", "S", "G2M"], ["G1", "G2M", "S", "unassigned"]) == ["G1", "S", "G2M"]
    with pytest.raises(InputError, match=r"cycle order of the phases \['early', 'late', 'mid'\] is not known"):
        default_phase_order(["early", "mid", "late"])


def test_phase_labels_without_an_order_run_theta_forwards():
    x, theta, phase = ring(seed=3)
    estimate = fit_cycle(x, phase).theta(x)  # plain strings: sorted by name they would read G1, G2M, S
    assert circular_correlation(estimate, theta) > 0.95


def test_every_phase_of_the_order_needs_anchored_cells():
    """A phase of the order without anchored cells got an arc of zero width and its cells were called other phases,
    silently (the old check counted labels, not phases)."""
    x, _, phase = ring(seed=8)
    partial = np.where(phase == "G2M", None, phase)
    counts = {p: int((phase == p).sum()) for p in ("G1", "S")}
    with pytest.raises(InputError, match=rf"no cell is anchored in the phase\(s\) \['G2M'\] of the anchor order "
                       rf"\['G1', 'S', 'G2M'\] \(anchored cells per phase: G1 {counts['G1']}, S {counts['S']}\)"):
        fit_cycle(x, partial, PHASES)
    with pytest.raises(InputError, match=r"\['S', 'G2M'\] .*G1 \d+\)"):
        fit_cycle(x, np.where(phase == "G1", phase, None), PHASES)
    with pytest.raises(InputError, match=r"\['G2M'\]"):
        fit_cycle(x, warn=False).reanchored(x, partial, PHASES)


def test_two_anchored_phases_warn_that_they_set_the_origin_not_the_direction():
    x, _, phase = ring(seed=3)
    two = np.where(phase == "G1", "G1", "S")
    with pytest.warns(SSLCellWarning, match=r"two anchored phases \['G1', 'S'\] set θ's origin but not its direction"):
        fit_cycle(x, two, ["G1", "S"])
    with pytest.warns(SSLCellWarning, match="not its direction"):
        fit_cycle(x, warn=False).reanchored(x, two, ["G1", "S"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_cycle(x, phase, PHASES)  # three phases fix the direction
        fit_cycle(x, two, ["G1", "S"], warn=False)


@pytest.mark.parametrize("field,value,match", [
    ("basis", "truncated", r"'basis' has shape \(5, 2\), not \(10, 2\)"),
    ("phases", ["G1", "S"], r"'phase_starts' holds 3 starts for the 2 phases"),
    ("origin", "abc", r"'origin' is not numbers \('abc'\)"),
    ("mean", "nan", r"'mean' holds NaN or inf"),
    ("phase_starts", None, r"'phase_starts' is missing"),
    ("direction", 5, r"'direction' is 5, not 1 or -1"),
    ("radius", 0.0, r"'radius' is 0.0: radius and scale are > 0"),
    ("scale", [0.0, 1.0], r"'scale' is \[0.0, 1.0\]"),
    ("centre", [1.0], r"'centre' has shape \(1,\), not \(2,\)"),
    ("phase_starts", [0.0, 4.0, 3.0], r"'phase_starts' \[0.0, 4.0, 3.0\] do not rise from 0"),
    ("phases", ["G1", "S", "S"], r"'phases' repeats a phase"),
])
def test_a_damaged_record_is_refused_naming_the_field(field, value, match):
    x, _, phase = ring(seed=3)
    record = fit_cycle(x, phase, PHASES).to_dict()
    assert CycleFit.from_record(record, "here").theta(x) == pytest.approx(CycleFit.from_dict(record).theta(x))
    record = {**record, "use_rep": "X_sslcell"}  # other keys of a record are ignored
    if value is None:
        del record[field]
    else:
        record[field] = record[field][:5] if value == "truncated" else [np.nan] * 10 if value == "nan" else value
    with pytest.raises(InputError, match=rf"^here: the fit's {match}"):
        CycleFit.from_record(record, "here")
    with pytest.raises(FileFormatError, match=rf"^cycle.json: the fit's {match}"):
        CycleFit.from_record(record, "cycle.json", FileFormatError)


def test_bad_rows_of_the_representation_are_named():
    x, _, _ = ring(n=50)
    bad = x.copy()
    bad[[3, 7, 9, 11, 20, 30], 1] = np.inf
    with pytest.raises(InputError, match=r"^obsm\['X'\] holds NaN or inf values in 6 row\(s\) of 50 \(rows 3, 7, 9, "
                       r"11, 20, \.\.\.; 0-based\)"):
        fit_cycle(bad, what="obsm['X']")
    fit = fit_cycle(x)
    with pytest.raises(InputError, match=r"^the representation holds NaN or inf values in 6 row"):
        fit.theta(bad)


def test_a_fit_saved_with_an_empty_phase_before_the_check_still_loads_with_a_warning():
    """Fits made before unanchored phases were refused hold a phase whose start is 2π: they place cells still."""
    fit = fit_cycle(_ring_for_record(), np.array(["G1", "S"] * 30), ["G1", "S"], warn=False).to_dict()
    fit["phases"], fit["phase_starts"] = ["G1", "S", "G2M"], [*fit["phase_starts"], 2 * np.pi]
    with pytest.warns(UserWarning, match=r"phase\(s\) \['G2M'\] have an empty arc"):
        loaded = CycleFit.from_record(fit, "old.h5ad")
    assert loaded.phases == ["G1", "S", "G2M"]


def _ring_for_record() -> np.ndarray:
    angle = np.linspace(0, 2 * np.pi, 60, endpoint=False)
    return np.c_[np.cos(angle), np.sin(angle), np.zeros(60)]
