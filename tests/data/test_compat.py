"""Old import paths keep working after the data-module split, and genes.py no longer imports expression.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sslcell.data import expression, gene_stats, genes, image_readers, images, shards


def test_expression_reexports_the_reading_layer():
    from sslcell.data.expression import IN_MEMORY, Workspace, _ArrayReader, vstack_csr

    assert (Workspace, _ArrayReader, vstack_csr) == (shards.Workspace, shards._ArrayReader, shards.vstack_csr)
    assert IN_MEMORY == shards.IN_MEMORY


def test_genes_forwards_the_statistics_lazily():
    from sslcell.data.genes import _Moments, gene_statistics, select_highly_variable, seurat_dispersions

    assert gene_statistics is gene_stats.gene_statistics and _Moments is gene_stats._Moments
    assert select_highly_variable is gene_stats.select_highly_variable
    assert seurat_dispersions is gene_stats.seurat_dispersions
    assert {"gene_statistics", "select_highly_variable"} <= set(dir(genes))
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        genes.not_a_name  # noqa: B018


def test_images_reexports_crop_suffixes():
    assert images.CROP_SUFFIXES is image_readers.CROP_SUFFIXES
    assert expression.ExpressionDataset.__module__ == "sslcell.data.expression"


def test_no_import_cycle_between_genes_and_expression():
    code = (
        "import sys, sslcell.data.genes, sslcell.data.image_readers, sslcell.data.shards\n"
        "loaded = [m for m in ('sslcell.data.expression', 'sslcell.data.gene_stats', 'sslcell.data.images') "
        "if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
