from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sslcell.data.genesets import example_programmes, programme_index, read_gmt
from sslcell.data.synthetic import make_expression, programmes_of
from sslcell.errors import ConfigError, FileFormatError, GeneMismatchError, SSLCellWarning

SHARED = Path(__file__).parents[2] / ".." / "shared" / "data"
GMT = Path(__file__).parents[2] / "sslcell" / "data" / "resources" / "example_programmes.gmt"


def _write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "sets.gmt"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_read_gmt_parses_dedupes_and_skips_blank_lines(tmp_path):
    path = _write(
        tmp_path,
        "A\tfirst set\tG1\tG2\tG1\t\tG3\t\n"
        "\n"
        "# a comment\n"
        "B\thttp://example.org/b\tX\r\n",
    )
    assert read_gmt(path) == {"A": ["G1", "G2", "G3"], "B": ["X"]}
    assert list(read_gmt(str(path))) == ["A", "B"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("A\tdesc\tG1\nB desc G2 G3\n", "line 2: expected 'name<TAB>description<TAB>genes...'"),
        ("A\tdesc\tG1\nB\tdesc\t\t\n", "line 2: gene set 'B' lists no genes"),
        ("A\tdesc\tG1\n\nA\tdesc\tG2\n", "line 3: gene set 'A' appears a second time"),
        ("\tdesc\tG1\n", "line 1: empty gene-set name"),
        ("\n\n", "no gene sets found"),
    ],
)
def test_read_gmt_malformed_lines_name_file_and_line(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(FileFormatError) as err:
        read_gmt(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_read_gmt_binary_file(tmp_path):
    with pytest.raises(FileFormatError, match="not UTF-8"):
        read_gmt(_write(tmp_path, b"\x89PNG\r\n\x1a\n\xff\xfe"))


def test_shipped_gmt_is_plain_standard_gmt():
    lines = GMT.read_text(encoding="utf-8").splitlines()
    assert lines and all(len(line.split("\t")) >= 3 and not line.startswith("#") for line in lines)
    assert all(line.split("\t")[1].strip() for line in lines)  # provenance in the description column


def test_example_programmes_content():
    progs = example_programmes()
    assert 10 <= len(progs) <= 40
    assert {"TIROSH2016_S_PHASE", "TIROSH2016_G2M_PHASE", "MITOCHONDRIAL_ENCODED", "T_CELL", "B_CELL"} <= set(progs)
    assert all(len(genes) >= 5 and len(set(genes)) == len(genes) for genes in progs.values())
    assert all(g.startswith("MT-") for g in progs["MITOCHONDRIAL_ENCODED"])
    assert all(g.startswith("RPL") for g in progs["RIBOSOMAL_LARGE_SUBUNIT"])
    assert {"CD3D", "CD3E", "CD3G"} <= set(progs["T_CELL"]) and {"CD79A", "MS4A1"} <= set(progs["B_CELL"])


def test_example_cycle_sets_match_tirosh_list():
    tsv = SHARED / "cell_cycle_genes_human_tirosh2016.tsv"
    if not tsv.exists():
        pytest.skip("shared data not available")
    rows = [line.split("\t") for line in tsv.read_text().splitlines()[1:] if line.strip()]
    progs = example_programmes()
    for phase, name in (("S", "TIROSH2016_S_PHASE"), ("G2M", "TIROSH2016_G2M_PHASE")):
        listed = [gene for gene, p in rows if p.strip() == phase]
        assert progs[name][: len(listed)] == listed
        assert len(progs[name]) - len(listed) <= 2  # only current symbols of renamed genes added


def test_programme_index_case_insensitive_mouse_symbols():
    genes = ["Cd3d", "Actb", "Cd3e", "Mki67", "Cd3g", "mt-Co1", "Cd2"]
    progs = {"T": ["CD3D", "CD3E", "CD3G", "CD2", "CD5"], "MT": ["MT-CO1", "MT-CO2"], "X": ["FOO", "BAR", "BAZ"]}
    names, index = programme_index(progs, genes, min_size=1)
    assert names == ["T", "MT"]
    np.testing.assert_array_equal(index[0], [0, 2, 4, 6])
    np.testing.assert_array_equal(index[1], [5])
    assert index[0].dtype == np.int64
    names, _ = programme_index(progs, genes, min_size=4)
    assert names == ["T"]
    with pytest.raises(GeneMismatchError, match="none of 3 gene programmes"):
        programme_index(progs, genes, case_sensitive=True)


def test_programme_index_reports_dropped():
    with pytest.warns(SSLCellWarning, match=r"dropped 1 of 2 programmes with < 3 genes present: B \(1/2\)"):
        names, _ = programme_index({"A": ["a", "b", "c"], "B": ["a", "z"]}, ["A", "B", "C", "A"])
    assert names == ["A"]
    with pytest.raises(ConfigError, match="min_size"):
        programme_index({"A": ["a"]}, ["a"], min_size=0)


def test_programme_index_duplicate_gene_names_map_to_first():
    names, index = programme_index({"P": ["a", "b", "c"]}, ["A", "b", "a", "C"])
    np.testing.assert_array_equal(index[0], [0, 1, 3])


def test_programme_index_recovers_synthetic_truth():
    adata = make_expression(n_cells=50, n_genes=400, seed=2)
    truth = programmes_of(adata)
    names, index = programme_index(truth, adata.var_names)
    assert names == list(truth)
    for name, idx in zip(names, index, strict=True):
        np.testing.assert_array_equal(idx, np.flatnonzero(adata.var[f"programme_{name}"].to_numpy()))
