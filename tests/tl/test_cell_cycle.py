"""tl.cell_cycle and pl.cell_cycle on AnnData: keys, anchors from an obs column, refusals, the figure, the CLI."""

from __future__ import annotations

import re
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from sslcell import pl, tl
from sslcell.cli import main
from sslcell.errors import InputError, OverwriteError
from sslcell.evaluate import circular_correlation
from tests.cellcycle.test_fit import PHASES, ring


@pytest.fixture
def cells() -> ad.AnnData:
    x, theta, phase = ring(n=400, seed=4)
    adata = ad.AnnData(obs=pd.DataFrame({"phase": pd.Categorical(phase, categories=PHASES), "theta_true": theta},
                                        index=[f"c{i}" for i in range(len(theta))]),
                       obsm={"X_sslcell": x.astype(np.float32)})
    return adata


def test_writes_theta_phase_plane_and_the_fit(cells):
    tl.cell_cycle(cells, anchor_key="phase")
    assert {"cell_cycle_theta", "cell_cycle_phase"} <= set(cells.obs)
    assert cells.obsm["cell_cycle_plane"].shape == (400, 2)
    theta = cells.obs["cell_cycle_theta"].to_numpy()
    assert ((theta >= 0) & (theta < 2 * np.pi)).all()
    assert circular_correlation(theta, cells.obs["theta_true"]) > 0.95
    info = cells.uns["sslcell"]["cell_cycle"]
    assert {"method", "direction", "origin", "closure", "residual", "explained_variance"} <= set(info)
    assert list(info["phases"]) == PHASES and info["use_rep"] == "X_sslcell"
    assert (cells.obs["cell_cycle_phase"] == cells.obs["phase"]).mean() > 0.85


def test_order_can_be_given_and_unlabelled_cells_are_placed(cells):
    few = cells.obs["phase"].astype(object)
    few[np.arange(400) % 10 != 0] = np.nan
    cells.obs["few"] = few
    tl.cell_cycle(cells, anchor_key="few", anchor_order=PHASES, key_added="cc")
    assert cells.obs["cc_theta"].notna().all() and cells.obs["cc_phase"].notna().all()
    assert (cells.obs["cc_phase"] == cells.obs["phase"]).mean() > 0.8


def test_a_string_phase_column_runs_theta_forwards_also_after_h5ad(cells, tmp_path):
    cells.obs["phase"] = cells.obs["phase"].astype(str)  # as scanpy's score_genes_cell_cycle writes it
    cells.write_h5ad(tmp_path / "cells.h5ad")  # .h5ad makes it a categorical sorted by name: G1, G2M, S
    for adata in (cells, ad.read_h5ad(tmp_path / "cells.h5ad")):
        tl.cell_cycle(adata, anchor_key="phase")
        assert circular_correlation(adata.obs["cell_cycle_theta"], adata.obs["theta_true"]) > 0.95
        assert list(adata.uns["sslcell"]["cell_cycle"]["phases"]) == PHASES
    cells.obs["stage"] = np.where(cells.obs["phase"] == "G1", "early", np.where(cells.obs["phase"] == "S", "mid",
                                                                                 "late"))
    with pytest.raises(InputError, match=r"obs\['stage'\]: the cycle order .* anchor_order"):
        tl.cell_cycle(cells, anchor_key="stage", key_added="stage")
    tl.cell_cycle(cells, anchor_key="stage", anchor_order=["early", "mid", "late"], key_added="stage")


def test_without_anchors_there_is_no_phase_and_the_result_writes_to_h5ad(cells, tmp_path):
    out = tl.cell_cycle(cells, copy=True)
    assert "cell_cycle_phase" not in out.obs and "cell_cycle_theta" not in cells.obs
    assert out.uns["sslcell"]["cell_cycle"]["anchored"] is False
    out.write_h5ad(tmp_path / "out.h5ad")
    assert ad.read_h5ad(tmp_path / "out.h5ad").uns["sslcell"]["cell_cycle"]["radius"] > 0


def test_refusals(cells):
    with pytest.raises(InputError, match="no 'X_pca'"):
        tl.cell_cycle(cells, use_rep="X_pca")
    with pytest.raises(InputError, match="no obs column 'stage'"):
        tl.cell_cycle(cells, anchor_key="stage")
    with pytest.raises(InputError, match="needs anchor_key"):
        tl.cell_cycle(cells, anchor_order=PHASES)
    with pytest.raises(InputError, match="anchor_order: the phases as a list"):
        tl.cell_cycle(cells, anchor_key="phase", anchor_order="G1,S,G2M")
    cells.obs["unlabelled"] = np.nan
    with pytest.raises(InputError, match=r"obs\['unlabelled'\] labels no cell"):
        tl.cell_cycle(cells, anchor_key="unlabelled")
    tl.cell_cycle(cells)
    with pytest.raises(OverwriteError, match="cell_cycle_theta"):
        tl.cell_cycle(cells)
    tl.cell_cycle(cells, anchor_key="phase", overwrite=True)
    tl.cell_cycle(cells, overwrite=True)  # unanchored again: the anchored fit's phases go with it
    assert "cell_cycle_phase" not in cells.obs and not cells.uns["sslcell"]["cell_cycle"]["anchored"]
    cells.obs["cc_phase"] = "mine"  # a column no fit under "cc" wrote: an anchored fit does not replace it unasked
    with pytest.raises(OverwriteError, match="cc_phase"):
        tl.cell_cycle(cells, anchor_key="phase", key_added="cc")
    assert (cells.obs["cc_phase"] == "mine").all() and "cc_theta" not in cells.obs
    cells.uns["sslcell"]["X_sslcell"] = {"model_id": "weights_a"}  # the embedding's record, as tl.embed keeps it
    with pytest.raises(OverwriteError, match=r"uns\['sslcell'\]\['X_sslcell'\] holds the record"):
        tl.cell_cycle(cells, key_added="X_sslcell")
    assert cells.uns["sslcell"]["X_sslcell"] == {"model_id": "weights_a"} and "X_sslcell_theta" not in cells.obs


def test_plot_shows_the_plane_and_theta_by_phase(cells, tmp_path):
    tl.cell_cycle(cells, anchor_key="phase")
    fig = pl.cell_cycle(cells, color="phase", path=tmp_path / "cycle.png")
    assert len(fig.axes) >= 3 and (tmp_path / "cycle.png").stat().st_size > 10_000
    with pytest.raises(InputError, match="no cell-cycle fit under 'other'"):
        pl.cell_cycle(cells, key="other")
    (tmp_path / "cells.h5ad").write_bytes(b"data")
    with pytest.raises(InputError, match="ending in .png"):  # a figure never replaces a data file
        pl.cell_cycle(cells, path=tmp_path / "cells.h5ad")
    assert (tmp_path / "cells.h5ad").read_bytes() == b"data"


def test_cli_cell_cycle(cells, tmp_path, capsys):
    cells.write_h5ad(tmp_path / "emb.h5ad")
    assert main(["cell-cycle", "--data", str(tmp_path / "emb.h5ad"), "--use-rep", "X_sslcell",
                 "--anchor-key", "phase", "--anchor-order", "G1,S,G2M", "--out", str(tmp_path / "out.h5ad"),
                 "--plot", str(tmp_path / "cycle.png")]) == 0
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert "cell_cycle_theta" in out.obs and (tmp_path / "cycle.png").is_file()
    assert re.search(r"closure \d\.\d\d \(\d\.\d\d without axis scaling\)", capsys.readouterr().out)
    assert main(["cell-cycle", "--data", str(tmp_path / "emb.h5ad"), "--out", str(tmp_path / "out.h5ad")]) == 2
    assert main(["cell-cycle", "--data", str(tmp_path / "emb.h5ad"), "--out", str(tmp_path / "new.h5ad"),
                 "--marker-channels", "0"]) == 2  # a crops flag, without --model: refused, not ignored
    assert "--marker-channels: these fit the DeepCycle recipe" in capsys.readouterr().err


def test_cli_cell_cycle_plot_never_replaces_a_file_without_asking(cells, tmp_path, capsys):
    cells.write_h5ad(tmp_path / "emb.h5ad")
    before = (tmp_path / "emb.h5ad").read_bytes()
    (tmp_path / "mine.png").write_bytes(b"my figure")
    args = ["cell-cycle", "--data", str(tmp_path / "emb.h5ad"), "--anchor-key", "phase", "--out",
            str(tmp_path / "out.h5ad")]
    assert main([*args, "--plot", str(tmp_path / "emb.h5ad")]) == 2  # the input itself: not a .png
    assert "ending in .png" in capsys.readouterr().err
    assert main([*args, "--plot", str(tmp_path / "mine.png")]) == 2
    assert "mine.png: exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "emb.h5ad").read_bytes() == before and (tmp_path / "mine.png").read_bytes() == b"my figure"
    assert not (tmp_path / "out.h5ad").exists()  # refused before any work
    assert main([*args, "--plot", str(tmp_path / "mine.png"), "--overwrite"]) == 0
    assert (tmp_path / "mine.png").read_bytes()[:4] == b"\x89PNG"


def _one_phase(phase: str, n: int = 800, seed: int = 9) -> tuple[ad.AnnData, ad.AnnData]:
    """A reference of all phases and, in the same embedding space, a second acquisition of one phase only."""
    x, theta, labels = ring(n=n, seed=seed, skew=False)
    half = n // 2
    obs = pd.DataFrame({"phase": pd.Categorical(labels, categories=PHASES), "theta_true": theta},
                       index=[f"c{i}" for i in range(n)])
    reference = ad.AnnData(obs=obs.iloc[:half].copy(), obsm={"X_sslcell": x[:half].astype(np.float32)})
    keep = np.flatnonzero(labels[half:] == phase) + half
    new = ad.AnnData(obs=obs.iloc[keep].copy(), obsm={"X_sslcell": x[keep].astype(np.float32)})
    return reference, new


@pytest.mark.parametrize("phase", PHASES)
def test_an_embedding_of_one_phase_warns_instead_of_a_confident_theta(phase):
    _, new = _one_phase(phase)
    with pytest.warns(UserWarning, match="closed trajectory"):
        tl.cell_cycle(new)
    info = new.uns["sslcell"]["cell_cycle"]
    assert info["closure_unscaled"] < 0.5  # the warning's reason is recorded with the fit


@pytest.mark.parametrize("phase", PHASES)
def test_one_phase_projected_onto_a_reference_fit_falls_in_its_arc(phase, tmp_path):
    from sslcell.cellcycle import project_cycle

    reference, new = _one_phase(phase)
    tl.cell_cycle(reference, anchor_key="phase")
    reference.write_h5ad(tmp_path / "reference.h5ad")  # the reference as a user keeps it: a file
    stored = ad.read_h5ad(tmp_path / "reference.h5ad")
    for ref in (reference, stored.uns["sslcell"]["cell_cycle"]):
        out = project_cycle(new, ref, copy=True)
        assert (out.obs["cell_cycle_phase"] == phase).mean() > 0.85
        info = out.uns["sslcell"]["cell_cycle"]
        assert info["projected"] and info["projected_residual"] < 0.15 and info["projected_closure"] < 0.6
    np.testing.assert_allclose(project_cycle(new, stored, copy=True).obs["cell_cycle_theta"],
                               project_cycle(new, reference, copy=True).obs["cell_cycle_theta"], atol=1e-5)
    assert len(pl.cell_cycle(out, color="phase").axes) >= 3  # pl.cell_cycle shows a projection as it shows a fit
    # projecting the reference's own cells gives the θ tl.cell_cycle wrote
    again = project_cycle(reference, reference, key_added="again", copy=True)
    np.testing.assert_allclose(again.obs["again_theta"], reference.obs["cell_cycle_theta"], atol=1e-5)


def test_cells_embedded_by_another_model_are_not_placed_on_a_fit():
    reference, new = _one_phase("S")
    reference.uns["sslcell"] = {"X_sslcell": {"model_id": "weights_a"}}  # what tl.embed records
    tl.cell_cycle(reference, anchor_key="phase")
    assert reference.uns["sslcell"]["cell_cycle"]["rep_id"] == "weights_a"
    new.uns["sslcell"] = {"X_sslcell": {"model_id": "weights_b"}}
    with pytest.raises(InputError, match=r"another space \(weights_b\) than .*\(weights_a\): embed these cells"):
        tl.cell_cycle(new, reference=reference)
    new.uns["sslcell"]["X_sslcell"]["model_id"] = "weights_a"
    tl.cell_cycle(new, reference=reference)


def test_project_cycle_refusals_and_a_foreign_representation_warns():
    from sslcell.cellcycle import project_cycle

    reference, new = _one_phase("G1")
    with pytest.raises(InputError, match="no cell-cycle fit"):
        project_cycle(new, reference)
    tl.cell_cycle(reference, anchor_key="phase")
    with pytest.raises(InputError, match="lacks"):
        project_cycle(new, {"radius": 1.0})
    with pytest.raises(InputError, match="no 'X_pca'"):
        project_cycle(new, reference, use_rep="X_pca")
    new.obsm["narrow"] = new.obsm["X_sslcell"][:, :4]
    with pytest.raises(InputError, match="dimensions"):
        project_cycle(new, reference, use_rep="narrow")
    new.obsm["other"] = np.random.default_rng(0).normal(size=new.obsm["X_sslcell"].shape) * 3 + 5
    with pytest.warns(UserWarning, match="far from the reference cycle"):
        project_cycle(new, reference, use_rep="other")
    # cells as near the circle as the reference's own do not warn, even when a noisy reference's residual is > 0.25
    x, _, labels = ring(n=1200, seed=9, noise=0.8, skew=False)
    noisy = ad.AnnData(obs=pd.DataFrame({"phase": pd.Categorical(labels[:600], categories=PHASES)}),
                       obsm={"X_sslcell": x[:600]})
    with pytest.warns(UserWarning, match="closed trajectory: residual 0.29"):
        tl.cell_cycle(noisy, anchor_key="phase")
    more = ad.AnnData(obsm={"X_sslcell": x[600:]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        project_cycle(more, noisy)
    assert 0.25 < more.uns["sslcell"]["cell_cycle"]["projected_residual"] < 0.35
    with pytest.raises(OverwriteError):
        project_cycle(new, reference)


def test_tl_cell_cycle_with_a_reference_places_one_phase_in_its_arc_and_so_does_the_cli(tmp_path, capsys):
    reference, new = _one_phase("G2M")
    tl.cell_cycle(reference, anchor_key="phase")
    with pytest.raises(InputError, match="reference's anchors apply"):
        tl.cell_cycle(new, reference=reference, anchor_key="phase")
    out = tl.cell_cycle(new, reference=reference, copy=True)
    assert (out.obs["cell_cycle_phase"] == "G2M").mean() > 0.85 and out.uns["sslcell"]["cell_cycle"]["projected"]
    reference.write_h5ad(tmp_path / "ref.h5ad")
    new.write_h5ad(tmp_path / "new.h5ad")
    assert main(["cell-cycle", "--data", str(tmp_path / "new.h5ad"), "--reference", str(tmp_path / "ref.h5ad"),
                 "--out", str(tmp_path / "out.h5ad")]) == 0
    cli = ad.read_h5ad(tmp_path / "out.h5ad")
    np.testing.assert_allclose(cli.obs["cell_cycle_theta"], out.obs["cell_cycle_theta"], atol=1e-5)
    assert "placed on" in capsys.readouterr().out


def test_a_projection_keeps_the_space_so_a_chained_projection_is_checked_too():
    """A projected AnnData recorded no space: another model's cells placed on it were accepted."""
    reference, new = _one_phase("S")
    reference.uns["sslcell"] = {"X_sslcell": {"model_id": "weights_a"}}
    tl.cell_cycle(reference, anchor_key="phase")
    tl.cell_cycle(new, reference=reference)  # new holds no record of its own: the reference's space is kept
    assert new.uns["sslcell"]["cell_cycle"]["rep_id"] == "weights_a"
    third = new[:50].copy()
    third.uns["sslcell"] = {"X_sslcell": {"model_id": "weights_b"}}  # embedded by another model
    with pytest.raises(InputError, match=r"another space \(weights_b\)"):
        tl.cell_cycle(third, reference=new, overwrite=True)


def test_one_cell_is_placed_on_a_fit_and_float_phase_codes_anchor_it(cells):
    """Placing needed 3 cells; integer phase codes stored as floats beside NaN were '0.0' against the order '0'."""
    codes = cells.obs["phase"].cat.codes.astype(float).where(np.arange(400) % 3 == 0)  # NaN: unlabelled
    cells.obs["code"] = codes
    tl.cell_cycle(cells, anchor_key="code", anchor_order=[0, 1, 2])
    assert list(cells.uns["sslcell"]["cell_cycle"]["phases"]) == ["0", "1", "2"]
    one = cells[:1].copy()
    tl.cell_cycle(one, reference=cells, overwrite=True)
    assert one.obs["cell_cycle_theta"].iloc[0] == pytest.approx(cells.obs["cell_cycle_theta"].iloc[0], abs=1e-5)


def test_a_theta_just_below_two_pi_is_stored_below_it():
    from sslcell.cellcycle.fit import CycleFit
    from sslcell.cellcycle.project import write_cycle

    adata = ad.AnnData(obs=pd.DataFrame(index=["a", "b"]))
    fit = CycleFit(mean=[0, 0], basis=[[1, 0], [0, 1]], scale=[1, 1], centre=[0, 0], radius=1.0)
    write_cycle(adata, fit, np.array([0.0, np.nextafter(2 * np.pi, 0)]), np.zeros((2, 2)), ("t", "p", "q"))
    assert float(adata.obs["t"].iloc[1]) < 2 * np.pi  # float32(2π - ε) rounds up to 2π


def test_plot_colours_a_score_by_a_colour_map_not_one_class_per_cell(cells):
    from sslcell.pl._cellcycle import CLASSES_AT_MOST

    tl.cell_cycle(cells, anchor_key="phase")
    cells.obs["score"] = np.random.default_rng(0).normal(size=400)
    fig = pl.cell_cycle(cells, color="score")
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 3 and panels[1].get_legend() is None  # θ, the score, θ by the fitted phase
    assert len(panels[2].get_yticks()) == len(PHASES) and CLASSES_AT_MOST < 400


def test_a_view_of_a_backed_anndata_is_refused_in_place_with_or_without_a_reference(cells, tmp_path):
    ad.AnnData(np.zeros((cells.n_obs, 1), np.float32), obs=cells.obs, obsm=dict(cells.obsm)).write_h5ad(
        tmp_path / "c.h5ad")
    view = ad.read_h5ad(tmp_path / "c.h5ad", backed="r")[:50]
    fitted = tl.cell_cycle(cells, "X_sslcell", anchor_key="phase", copy=True)
    for reference in (None, fitted):
        with pytest.raises(InputError, match=r"c.h5ad: a view of a backed AnnData .* cannot take results in place"):
            tl.cell_cycle(view, "X_sslcell", reference=reference)
    assert "cell_cycle_theta" in tl.cell_cycle(view, "X_sslcell", reference=fitted, copy=True).obs


def test_a_category_without_anchored_cells_is_refused_and_all_three_score_phases_work(cells):
    """An unused category (G2M of a G1 / S / G2M column, as tl.score_cell_cycle writes it) got an arc of zero width:
    its cells were called other phases, silently."""
    cells.obs["scored"] = pd.Categorical(cells.obs["phase"].astype(str), categories=["G1", "S", "G2M"])
    tl.cell_cycle(cells, anchor_key="scored")  # all three present: fitted, in the categories' order
    assert list(cells.uns["sslcell"]["cell_cycle"]["phases"]) == PHASES
    assert set(cells.obs["cell_cycle_phase"]) == set(PHASES)
    cells.obs["scored"] = cells.obs["scored"].where(cells.obs["phase"] != "G2M")  # no cell labelled G2M
    with pytest.raises(InputError, match=r"obs\['scored'\]: no cell is anchored in the phase\(s\) \['G2M'\] .*"
                       r"remove_unused_categories"):
        tl.cell_cycle(cells, anchor_key="scored", key_added="cc")
    with pytest.raises(InputError, match=r"\['G2M'\] of the anchor order \['G1', 'S', 'G2M'\]"):
        tl.cell_cycle(cells, anchor_key="scored", anchor_order=PHASES, key_added="cc")
    assert "cc_theta" not in cells.obs


@pytest.mark.parametrize("field,value,match", [
    ("basis", "truncated", r"'basis' has shape"), ("phases", ["G1", "S"], r"'phase_starts' holds 3 starts"),
    ("origin", "abc", r"'origin' is not numbers"), ("mean", "nan", r"'mean' holds NaN"),
    ("phase_starts", None, r"'phase_starts' is missing"), ("direction", 5, r"'direction' is 5"),
    ("radius", 0.0, r"'radius' is 0.0"), ("scale", [0.0, 1.0], r"'scale' is \[0.0, 1.0\]"),
])
def test_a_damaged_reference_fit_in_an_h5ad_is_refused_naming_the_key_and_field(field, value, match, tmp_path):
    """An edited or damaged fit gave tracebacks, or silently NaN θ and phases of one kind."""
    reference, new = _one_phase("S")
    tl.cell_cycle(reference, anchor_key="phase")
    info = reference.uns["sslcell"]["cell_cycle"]
    if value is None:
        del info[field]
    else:
        info[field] = info[field][:5] if value == "truncated" else [np.nan] * 10 if value == "nan" else value
    reference.uns["sslcell"]["cycle"] = reference.uns["sslcell"].pop("cell_cycle")
    reference.write_h5ad(tmp_path / "ref.h5ad")
    with pytest.raises(InputError, match=rf"uns\['sslcell'\]\['cycle'\]: the fit's {match}"):
        tl.cell_cycle(new, reference=ad.read_h5ad(tmp_path / "ref.h5ad"), reference_key="cycle")
    assert "cell_cycle_theta" not in new.obs


def test_an_unanchored_fit_keeps_a_phase_column_no_fit_wrote_and_refusals_name_every_column(cells):
    """make_expression's true cycle_theta / cycle_phase: tl.cell_cycle(key_added="cycle", overwrite=True) without
    anchors deleted the user's cycle_phase though no fit had written it."""
    truth = pd.Categorical(cells.obs["phase"].astype(str), categories=PHASES)
    cells.obs["cycle_theta"], cells.obs["cycle_phase"] = cells.obs["theta_true"], truth
    with pytest.raises(OverwriteError, match=r"obs\['cycle_theta'\] exists: these would be replaced"):
        tl.cell_cycle(cells, key_added="cycle")
    tl.cell_cycle(cells, key_added="cycle", overwrite=True)
    assert (cells.obs["cycle_phase"] == truth).all()  # kept: the user's, not an earlier fit's
    # another tool's record under the key (tl.score_cell_cycle's writes {key}_phase): its column is kept too
    cells.obs["score_phase"], cells.uns["sslcell"]["score"] = truth, {"genes": "Tirosh et al. 2016"}
    tl.cell_cycle(cells, key_added="score", overwrite=True)
    assert (cells.obs["score_phase"] == truth).all()
    # an earlier anchored fit's phases are removed by an unanchored one, which names them when refused
    tl.cell_cycle(cells, anchor_key="phase", key_added="cc")
    with pytest.raises(OverwriteError) as refused:
        tl.cell_cycle(cells, key_added="cc")
    for named in ("obs['cc_theta']", "obs['cc_phase'] holds the earlier fit's phases (removed", "obsm['cc_plane']",
                  "uns['sslcell']['cc'] holds the record"):
        assert named in str(refused.value)
    tl.cell_cycle(cells, key_added="cc", overwrite=True)
    assert "cc_phase" not in cells.obs


def test_nan_rows_and_a_representation_of_another_width_are_named():
    reference, new = _one_phase("G1")
    tl.cell_cycle(reference, anchor_key="phase")
    bad = new.obsm["X_sslcell"].copy()
    bad[[2, 5]] = np.nan
    new.obsm["bad"] = bad
    for ref in (None, reference):
        with pytest.raises(InputError, match=rf"^obsm\['bad'\] holds NaN or inf values in 2 row\(s\) of "
                           rf"{new.n_obs} \(rows 2, 5; 0-based\)"):
            tl.cell_cycle(new, "bad", reference=ref)
    new.obsm["narrow"] = new.obsm["X_sslcell"][:, :4]
    with pytest.raises(InputError, match=r"^obsm\['narrow'\] has 4 dimensions; this fit was made on 10 \(the "
                       r"reference's obsm\['X_sslcell'\]\)"):
        tl.cell_cycle(new, "narrow", reference=reference)
