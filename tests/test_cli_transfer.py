"""``sslcell transfer``'s saved references (--save-reference, then --reference DIR), --leave-one-out and --weights,
each checked against the Python API they stand for."""

from __future__ import annotations

import re

import anndata as ad
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from sslcell import tl
from sslcell.cli import main
from sslcell.transfer.reference import ReferenceIndex
from tests.tl.test_transfer import _cells


@pytest.fixture()
def files(tmp_path):
    _cells(300, 0).write_h5ad(tmp_path / "ref.h5ad")
    _cells(100, 1).write_h5ad(tmp_path / "q.h5ad")
    return tmp_path


def _calls(path) -> np.ndarray:
    return ad.read_h5ad(path).obs["cell_type_pred"].astype(str).to_numpy()


def test_a_saved_reference_labels_later_queries_as_the_h5ad_did(files, capsys):
    ref, q, saved = str(files / "ref.h5ad"), str(files / "q.h5ad"), files / "saved"
    assert main(["transfer", "--reference", ref, "--query", q, "--label-key", "cell_type", "--index", "hnsw",
                 "--out", str(files / "a.h5ad"), "--save-reference", str(saved)]) == 0
    assert f"label later queries with --reference {saved}" in capsys.readouterr().out
    loaded = ReferenceIndex.load(saved)
    assert (loaded.kind, loaded.label_key, loaded.n) == ("hnsw", "cell_type", 300)
    # no --label-key, --use-rep or --index: the saved reference knows them; the same calls as from the .h5ad
    assert main(["transfer", "--reference", str(saved), "--query", q, "--out", str(files / "b.h5ad")]) == 0
    np.testing.assert_array_equal(_calls(files / "b.h5ad"), _calls(files / "a.h5ad"))
    expected = tl.transfer_labels(ad.read_h5ad(q), loaded, "cell_type", copy=True)
    np.testing.assert_array_equal(_calls(files / "b.h5ad"), expected.obs["cell_type_pred"].astype(str))
    assert ad.read_h5ad(files / "b.h5ad").uns["sslcell"]["cell_type_pred"]["index"] == "hnsw"


def test_a_saved_reference_is_replaced_only_with_overwrite_checked_before_any_work(files, capsys):
    ref, q, saved = str(files / "ref.h5ad"), str(files / "q.h5ad"), files / "saved"
    argv = ["transfer", "--reference", ref, "--query", q, "--label-key", "cell_type", "--save-reference", str(saved)]
    assert main([*argv, "--index", "hnsw", "--out", str(files / "a.h5ad")]) == 0
    kept = (saved / "vectors.npy").read_bytes()
    assert main([*argv, "--out", str(files / "b.h5ad")]) == 2
    assert "saved: already holds reference.json" in capsys.readouterr().err
    assert not (files / "b.h5ad").exists() and (saved / "vectors.npy").read_bytes() == kept
    assert main([*argv, "--out", str(files / "b.h5ad"), "--overwrite"]) == 0  # now an exact reference
    assert ReferenceIndex.load(saved).kind == "exact" and not (saved / "index.faiss").exists()


@pytest.mark.parametrize("extra,message", [
    (["--save-reference", "{tmp}/again"], "--save-reference: --reference {tmp}/saved is a saved reference already"),
    (["--index", "ivf"], "--index ivf: the saved reference {tmp}/saved was built as 'exact'"),
    (["--label-key", "other"], "--label-key 'other': the reference index holds the labels of obs['cell_type']; pass "
                                    "--label-key 'cell_type'"),
    (["--use-rep", "X_pca"], "query.obsm has no 'X_pca'"),
])
def test_flags_a_saved_reference_cannot_honour_are_refused(files, capsys, extra, message):
    saved = files / "saved"
    tl.build_reference(ad.read_h5ad(files / "ref.h5ad"), "cell_type").save(saved)
    argv = ["transfer", "--reference", str(saved), "--query", str(files / "q.h5ad"), "--out", str(files / "o.h5ad")]
    extra = [e.format(tmp=files) for e in extra]
    assert main([*argv, *extra]) == 2
    assert message.format(tmp=files) in capsys.readouterr().err
    assert not (files / "o.h5ad").exists() and not (files / "again").exists()


def test_leave_one_out_scores_the_reference_against_its_own_labels(files, capsys):
    ref = ad.read_h5ad(files / "ref.h5ad")
    ref.obs.loc[ref.obs_names[::9], "cell_type"] = None  # unlabelled cells get calls but are not scored
    ref.write_h5ad(files / "ref.h5ad")
    argv = ["transfer", "--reference", str(files / "ref.h5ad"), "--label-key", "cell_type", "--leave-one-out",
            "--n-neighbors", "3", "--weights", "uniform"]
    assert main([*argv, "--out", str(files / "loo.h5ad"), "--save-reference", str(files / "saved")]) == 0
    printed = capsys.readouterr().out
    assert ReferenceIndex.load(files / "saved").n == ref.obs["cell_type"].notna().sum()  # the labelled cells
    tl.transfer_labels(ref, ref, "cell_type", n_neighbors=3, weights="uniform", leave_one_out=True)
    np.testing.assert_array_equal(_calls(files / "loo.h5ad"), ref.obs["cell_type_pred"].astype(str))
    labelled = ref.obs["cell_type"].notna().to_numpy()
    truth, pred = ref.obs["cell_type"][labelled].astype(str), ref.obs["cell_type_pred"][labelled].astype(str)
    assert f"leave-one-out on {labelled.sum()} labelled cells: accuracy {accuracy_score(truth, pred):.3f}, " \
           f"macro-F1 {f1_score(truth, pred, average='macro'):.3f}" in printed
    assert accuracy_score(truth, pred) < 1  # each cell was left out of its own vote (with it: 1.0)
    info = ad.read_h5ad(files / "loo.h5ad").uns["sslcell"]["cell_type_pred"]
    assert info["leave_one_out"] and info["weights"] == "uniform"


def test_low_confidence_calls_count_as_misses_not_as_a_class(files, capsys):
    argv = ["transfer", "--reference", str(files / "ref.h5ad"), "--label-key", "cell_type", "--leave-one-out",
            "--min-confidence", "0.99", "--out", str(files / "loo.h5ad")]
    assert main(argv) == 0
    calls, truth = _calls(files / "loo.h5ad"), ad.read_h5ad(files / "ref.h5ad").obs["cell_type"].to_numpy()
    assert (calls == "unknown").any()
    f1 = float(re.search(r"macro-F1 (\d\.\d+)", capsys.readouterr().out).group(1))
    assert f1 == pytest.approx(f1_score(truth, calls, labels=np.unique(truth), average="macro"), abs=5e-4)


@pytest.mark.parametrize("argv,message", [
    (["--reference", "{tmp}/ref.h5ad", "--label-key", "cell_type"], "--query: required (or --leave-one-out"),
    (["--reference", "{tmp}/ref.h5ad", "--query", "{tmp}/q.h5ad"], "--label-key: required with an .h5ad --reference"),
    (["--reference", "{tmp}/ref.h5ad", "--label-key", "cell_type", "--leave-one-out", "--query", "{tmp}/q.h5ad"],
     "--query: --leave-one-out labels the reference's own cells; leave out --query"),
    (["--reference", "{tmp}", "--leave-one-out"], "--leave-one-out labels the cells of a labelled .h5ad"),
])
def test_missing_or_clashing_flags_are_named(files, capsys, argv, message):
    assert main(["transfer", *[a.format(tmp=files) for a in argv], "--out", str(files / "o.h5ad")]) == 2
    assert message in capsys.readouterr().err and not (files / "o.h5ad").exists()


def test_save_reference_naming_a_file_is_refused_before_any_work(files, capsys):
    (files / "taken.txt").write_text("mine")
    assert main(["transfer", "--reference", str(files / "ref.h5ad"), "--query", str(files / "q.h5ad"), "--label-key",
                 "cell_type", "--save-reference", str(files / "taken.txt"), "--out", str(files / "o.h5ad")]) == 2
    assert "taken.txt: is a file" in capsys.readouterr().err
    assert not (files / "o.h5ad").exists() and (files / "taken.txt").read_text() == "mine"
