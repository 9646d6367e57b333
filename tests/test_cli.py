import json

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import yaml

from sslcell.cli import main
from tests.conftest import tiny_recipe


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe("mae", train={"max_epochs": 3}).to_dict()))
    return path


def test_pretrain_embed_evaluate(recipe_file, small_counts_file, tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "embedded.h5ad"
    assert main(["pretrain", "--config", str(recipe_file), "--data", str(small_counts_file), "--out", str(run)]) == 0
    assert main(["embed", "--model", str(run), "--data", str(small_counts_file), "--out", str(out)]) == 0
    adata = ad.read_h5ad(out)
    source = ad.read_h5ad(small_counts_file)
    assert adata.obsm["X_sslcell"].shape == (400, 8)
    assert (adata.X != source.X).nnz == 0  # counts copied untouched
    assert main(["evaluate", "--data", str(out), "--label-key", "cell_type", "--out", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out
    assert "X_sslcell" in printed and "pca" in printed.lower()
    report = json.loads((tmp_path / "rep.json").read_text())
    assert report  # machine-readable copy written
    (tmp_path / "rep.md").write_text("my notes")  # a second report into the same --out is refused, files kept
    assert main(["evaluate", "--data", str(out), "--label-key", "cell_type", "--out", str(tmp_path / "rep")]) == 2
    assert "rep.json: exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "rep.md").read_text() == "my notes"
    assert main(["evaluate", "--data", str(out), "--label-key", "cell_type", "--out", str(tmp_path / "rep"),
                 "--overwrite"]) == 0
    assert "X_sslcell" in (tmp_path / "rep.md").read_text()
    # a second embed into the same file is refused, and the file is kept
    before = out.read_bytes()
    assert main(["embed", "--model", str(run), "--data", str(small_counts_file), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert out.read_bytes() == before
    # re-embedding a file with a UMAP of its earlier embedding: that UMAP and its neighbours are not carried over
    import scanpy as sc

    umapped = ad.read_h5ad(out)
    sc.pp.neighbors(umapped, use_rep="X_sslcell", key_added="X_sslcell_neighbors", n_neighbors=5)
    umapped.obsm["X_sslcell_umap"] = np.zeros((umapped.n_obs, 2))
    umapped.write_h5ad(tmp_path / "umapped.h5ad")
    again = tmp_path / "again.h5ad"
    assert main(["embed", "--model", str(run), "--data", str(tmp_path / "umapped.h5ad"), "--out", str(again)]) == 2
    assert main(["embed", "--model", str(run), "--data", str(tmp_path / "umapped.h5ad"), "--out", str(again),
                 "--overwrite"]) == 0
    redone = ad.read_h5ad(again)
    assert "X_sslcell" in redone.obsm and "X_sslcell_umap" not in redone.obsm
    assert "X_sslcell_neighbors" not in redone.uns and not list(redone.obsp)


def test_bad_inputs_exit_2_with_a_message(recipe_file, tmp_path, capsys):
    bogus = tmp_path / "notes.h5ad"
    bogus.write_text("this is not an AnnData")
    assert main(["pretrain", "--config", str(recipe_file), "--data", str(bogus), "--out", str(tmp_path / "r")]) == 2
    assert "notes.h5ad" in capsys.readouterr().err
    assert (
        main(["pretrain", "--config", str(tmp_path / "nope.yaml"), "--data", str(bogus), "--out", str(tmp_path / "r")])
        == 2
    )
    assert "nope.yaml" in capsys.readouterr().err


def test_nan_counts_are_refused(recipe_file, small_counts, tmp_path, capsys):
    adata = small_counts.copy()
    adata.X = adata.X.astype(np.float32)
    adata.X.data[5] = np.nan
    path = tmp_path / "nan.h5ad"
    adata.write_h5ad(path)
    assert main(["pretrain", "--config", str(recipe_file), "--data", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "nan.h5ad" in err and "NaN" in err


@pytest.fixture(scope="module")
def small_run(recipe_file, small_counts_file, tmp_path_factory):
    run = tmp_path_factory.mktemp("cli_run") / "run"
    assert main(["pretrain", "--config", str(recipe_file), "--data", str(small_counts_file), "--out", str(run),
                 "--max-epochs", "1"]) == 0
    return run


def test_environment_faults_are_one_line_errors_and_leave_nothing(small_run, small_counts, small_counts_file,
                                                                  recipe_file, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "outdir"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep")
    assert main(["embed", "--model", str(small_run), "--data", str(small_counts_file), "--out", str(folder),
                 "--overwrite"]) == 2
    assert "outdir: is a folder" in capsys.readouterr().err
    a_file = tmp_path / "afile"
    a_file.write_text("keep")
    assert main(["pretrain", "--config", str(recipe_file), "--data", str(small_counts_file), "--out",
                 str(a_file)]) == 2
    assert "afile: is a file, not a run directory" in capsys.readouterr().err
    f16 = small_counts.copy()
    f16.X = f16.X.toarray().astype(np.float16)
    f16.write_h5ad(tmp_path / "f16.h5ad")
    assert main(["pretrain", "--config", str(recipe_file), "--data", str(tmp_path / "f16.h5ad"), "--out",
                 str(tmp_path / "r16")]) == 2
    assert "values of dtype float16 are not supported" in capsys.readouterr().err

    def full_disk(self, path, *args, **kwargs):  # the disk fills up half-way through the write
        path.write_bytes(b"\0" * 1000)
        raise OSError(28, "No space left on device")

    clf = tmp_path / "clf"
    assert main(["finetune", "--model", str(small_run), "--data", str(small_counts_file), "--label-key", "cell_type",
                 "--out", str(clf), "--head", "linear"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(ad.AnnData, "write_h5ad", full_disk)
    pred = tmp_path / "pred"
    assert main(["predict", "--model", str(clf), "--data", str(small_counts_file), "--out", str(pred)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0, err  # one line
    assert "pred/predictions.h5ad: could not be written (No space left on device)" in err
    assert (folder / "mine.txt").read_text() == "keep" and a_file.read_text() == "keep"
    assert not list(tmp_path.rglob(".*.tmp"))  # no temporary file left behind


def test_expression_finetune_and_predict_read_a_layer_and_name_the_file(small_run, small_counts, tmp_path, capsys):
    """The common layout: log-normalised X, raw counts in layers['counts']; --layer was missing (and argparse read
    'finetune --layer counts' as --layer-decay). Errors about the file name it, not '<AnnData>'."""
    adata = small_counts.copy()
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    adata.write_h5ad(tmp_path / "logged.h5ad")
    clf, pred = tmp_path / "clf", tmp_path / "pred"
    base = ["--data", str(tmp_path / "logged.h5ad")]
    assert main(["finetune", "--model", str(small_run), *base, "--label-key", "cell_type", "--out", str(clf),
                 "--head", "linear", "--layer", "counts"]) == 0
    assert main(["predict", "--model", str(clf), *base, "--out", str(pred), "--label-key", "cell_type",
                 "--layer", "counts"]) == 0
    assert main(["predict", "--model", str(clf), *base, "--out", str(pred), "--overwrite"]) == 2  # X: log values
    err = capsys.readouterr().err
    assert "logged.h5ad" in err and "<AnnData>" not in err
    assert "open with --counts-are-log-normalized (or the raw counts: --layer)" in err
    assert main(["predict", "--model", str(clf), *base, "--out", str(pred), "--overwrite",
                 "--counts-are-log-normalized"]) == 0  # the same probabilities as from the counts layer
    assert main(["transfer", "--reference", str(tmp_path / "logged.h5ad"), "--query", str(tmp_path / "logged.h5ad"),
                 "--label-key", "cell_type", "--out", str(tmp_path / "t.h5ad"), "--model", str(small_run)]) == 2
    assert "open with sslcell embed (--counts-are-log-normalized or --layer) first" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no abbreviations: '--lay' is no flag, not a guess between two
        main(["finetune", "--model", str(small_run), *base, "--out", str(clf), "--lay", "counts"])
    assert "unrecognized arguments: --lay counts" in capsys.readouterr().err


def test_transfer_with_model_names_the_side_that_holds_an_embedding(small_run, small_counts, tmp_path, capsys):
    adata = small_counts.copy()
    adata.write_h5ad(tmp_path / "q.h5ad")
    adata.obsm["X_sslcell"] = np.zeros((adata.n_obs, 4), np.float32)
    adata.write_h5ad(tmp_path / "ref.h5ad")
    argv = ["transfer", "--reference", str(tmp_path / "ref.h5ad"), "--query", str(tmp_path / "q.h5ad"),
            "--label-key", "cell_type", "--out", str(tmp_path / "out.h5ad"), "--model", str(small_run)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--reference" in err and "ref.h5ad: obsm['X_sslcell'] holds an embedding already" in err
    assert "--key-added" not in err  # nothing --key-added would solve
    assert main([*argv, "--overwrite"]) == 0
    embedded = ["--reference", str(tmp_path / "out.h5ad"), "--label-key", "cell_type"]  # embedded by the model
    assert main(["transfer", *embedded, "--query", str(tmp_path / "out.h5ad"), "--out", str(tmp_path / "o2.h5ad")]) == 2
    assert "choose another --key-added" in capsys.readouterr().err  # the query holds cell_type_pred already
    assert main(["transfer", *embedded, "--query", str(tmp_path / "out.h5ad"), "--out", str(tmp_path / "o2.h5ad"),
                 "--key-added", "again"]) == 0
    assert "obs['again_pred']" in capsys.readouterr().out
    assert {"again_pred", "again_confidence", "cell_type_pred"} <= set(ad.read_h5ad(tmp_path / "o2.h5ad").obs)


def test_version(capsys):
    import sslcell

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"sslcell {sslcell.__version__}"


def test_cell_cycle_messages_name_the_flags(tmp_path, capsys):
    """Library messages named anchor_order, anchor_key and reference= on the command line."""
    angle = np.linspace(0, 2 * np.pi, 60, endpoint=False)
    adata = ad.AnnData(np.zeros((60, 2), np.float32))
    adata.obsm["X_sslcell"] = np.c_[np.cos(angle), np.sin(angle)].astype(np.float32)
    adata.write_h5ad(tmp_path / "ring.h5ad")
    argv = ["cell-cycle", "--data", str(tmp_path / "ring.h5ad"), "--out", str(tmp_path / "o.h5ad")]
    assert main([*argv, "--anchor-order", "G1,S,G2M"]) == 2
    assert "--anchor-order needs --anchor-key (the obs column" in capsys.readouterr().err
    crops = ["cell-cycle", "--data", str(tmp_path / "c.npz"), "--out", str(tmp_path / "cc")]
    assert main([*crops, "--model", str(tmp_path / "m"), "--recipe", str(tmp_path / "r")]) == 2  # --recipe was ignored
    assert "give one of them" in capsys.readouterr().err and not (tmp_path / "cc").exists()


def test_a_stopped_command_that_cannot_resume_says_nothing_was_written(capsys):
    import argparse

    from sslcell.cli import _run
    from sslcell.errors import RunInterrupted

    def stopped(args):
        raise RunInterrupted("stopped by SIGTERM at step 13 (epoch 4) of training, before its end")

    assert _run(argparse.Namespace(command="finetune", run=stopped)) == 143
    assert "of training, before its end; nothing was written (it does not resume): run it again" in \
        capsys.readouterr().err
    assert _run(argparse.Namespace(command="pretrain", run=stopped)) == 143
    assert "nothing was written" not in capsys.readouterr().err  # its checkpoint was: --resume goes on
