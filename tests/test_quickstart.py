import anndata as ad
import pytest

from sslcell.errors import OverwriteError
from sslcell.quickstart import quickstart


def test_quickstart_end_to_end(tmp_path, capsys):
    out = tmp_path / "qs"
    quickstart(out, max_epochs=2, n_cells=600)
    for name in ("embedded.h5ad", "umap.png", "report.md", "report.json", "run/model/model.safetensors"):
        assert (out / name).is_file(), name
    adata = ad.read_h5ad(out / "embedded.h5ad")
    assert adata.obsm["X_sslcell"].shape == (600, 64)
    printed = capsys.readouterr().out
    assert "pca" in printed and "X_sslcell" in printed
    with pytest.raises(OverwriteError):
        quickstart(out, max_epochs=1, n_cells=600)
    (out / "my_notes.txt").write_text("keep me")
    (out / "run" / "my_analysis.csv").write_text("keep me too")
    quickstart(out, max_epochs=1, n_cells=300, overwrite=True)
    assert (out / "my_notes.txt").read_text() == "keep me"  # --overwrite replaces only the demo's own files
    assert (out / "run" / "my_analysis.csv").read_text() == "keep me too"
    assert ad.read_h5ad(out / "embedded.h5ad").n_obs == 300
