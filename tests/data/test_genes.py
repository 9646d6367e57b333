"""Gene alignment: remapping CSR columns to a model's gene list, and its report."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sslcell.data.genes import GeneAligner
from sslcell.errors import GeneMismatchError


def test_aligner_matches_dense_reference():
    rng = np.random.default_rng(0)
    input_genes = np.array([f"g{j}" for j in rng.permutation(30)], dtype=object)
    model_genes = np.array([f"g{j}" for j in rng.permutation(40)[:25]], dtype=object)  # some absent from input
    x = sp.random(50, 30, density=0.3, format="csr", random_state=1, dtype=np.float32)
    aligner = GeneAligner(input_genes, model_genes, source="x.h5ad")
    reference = pd.DataFrame(x.toarray(), columns=input_genes).reindex(columns=model_genes, fill_value=0.0)
    out = aligner.apply(x)
    assert out.shape == (50, 25) and out.has_sorted_indices
    np.testing.assert_array_equal(out.toarray(), reference.to_numpy())
    missing = [g for g in model_genes if g not in set(input_genes)]
    report = aligner.report
    assert (report.n_model_genes, report.n_present, report.n_missing) == (25, 25 - len(missing), len(missing))
    assert report.examples == missing[:5] and report.n_unused == 30 - (25 - len(missing))
    assert "x.h5ad" in str(report) and "zero-filled" in str(report)


def test_aligner_identity_and_zero_overlap():
    genes = np.array(["a", "b", "c"], dtype=object)
    x = sp.csr_matrix(np.arange(6, dtype=np.float32).reshape(2, 3))
    identity = GeneAligner(genes, genes)
    assert identity.is_identity and identity.apply(x) is x and identity.report.n_missing == 0
    with pytest.raises(GeneMismatchError, match="none of its 3 genes"):
        GeneAligner(genes, np.array(["x", "y"], dtype=object), source="f.h5ad")
