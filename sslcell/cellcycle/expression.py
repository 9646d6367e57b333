"""The cell cycle from expression: phase pseudo-labels from S and G2/M gene scores, and the cycle-gene PCA baseline.

* :func:`cycle_genes`: the S and G2/M genes of Tirosh et al. (2016) shipped with sslcell (human symbols, with the
  current names of renamed genes), found in a dataset's genes case-insensitively, so mouse symbols (``Mcm5``) match.
* :func:`score_phases`: scanpy's ``score_genes_cell_cycle`` on log-normalised counts -> S and G2/M scores and a
  G1 / S / G2M call per cell (pseudo-labels that anchor a fitted cycle).
* :func:`score_phase_sets`: Revelio's pseudo-labels (Schwabe et al. 2020): a score per phase gene set (for example
  Whitfield et al. 2002's G1/S, S, G2, G2/M and M/G1 genes), z-scored over the cells, and each cell called by its
  highest score. With sets that cover the whole cycle, the calls mark early and late G1 too, which S and G2/M
  scores cannot.
* :func:`cycle_gene_pca`: tricycle's idea (Zheng et al. 2022), fitted on the data itself: the first principal
  components of the log-normalised, scaled cycle genes; the cycle is a ring in their plane, and
  ``tl.cell_cycle(use_rep=...)`` on them gives the baseline θ an embedding's θ is compared with.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from sslcell.data.genesets import example_programmes
from sslcell.errors import InputError, SSLCellWarning

PHASE_ORDER = ["G1", "S", "G2M"]
S_SET, G2M_SET = "TIROSH2016_S_PHASE", "TIROSH2016_G2M_PHASE"


def cycle_genes(var_names: Sequence[str], s_genes: Sequence[str] | None = None,
                g2m_genes: Sequence[str] | None = None, min_genes: int = 5) -> tuple[list[str], list[str]]:
    """The S and G2/M genes present in ``var_names`` (as spelled there): the shipped Tirosh lists, or the given
    ones, matched case-insensitively. Fewer than ``min_genes`` of either present is an error."""
    shipped = example_programmes()
    sets = {"S": list(s_genes) if s_genes is not None else shipped[S_SET],
            "G2M": list(g2m_genes) if g2m_genes is not None else shipped[G2M_SET]}
    names = np.asarray(var_names).astype(str)
    position: dict[str, int] = {}
    for j, name in enumerate(names):
        position.setdefault(name.casefold(), j)
    found = {}
    for phase, genes in sets.items():
        index = sorted({position[g.casefold()] for g in genes if g.casefold() in position})
        if len(index) < min_genes:
            examples = [str(n) for n in names[:3]]
            raise InputError(f"only {len(index)} of {len(genes)} {phase} genes (e.g. {genes[:3]}) are among the "
                             f"data's genes (e.g. {examples}); need {min_genes}: check species, symbols vs IDs, or "
                             "pass s_genes / g2m_genes")
        found[phase] = names[index].tolist()
    return found["S"], found["G2M"]


def _log_normalised(adata: ad.AnnData, layer: str | None) -> ad.AnnData:
    from sslcell.evaluate.baselines import log_normalised  # here: it imports scanpy

    return log_normalised(adata, layer, "cell-cycle scoring")


def score_phases(adata: ad.AnnData, *, layer: str | None = None, s_genes: Sequence[str] | None = None,
                 g2m_genes: Sequence[str] | None = None, seed: int = 0) -> pd.DataFrame:
    """S and G2/M scores and a phase call per cell from raw counts (``X`` or ``layer``), as scanpy's
    ``score_genes_cell_cycle`` computes them on log-normalised counts. Returns a DataFrame indexed like
    ``adata.obs`` with columns ``S_score``, ``G2M_score`` and ``phase`` (categorical G1, S, G2M)."""
    import scanpy as sc

    s, g2m = cycle_genes(adata.var_names, s_genes, g2m_genes)
    work = _log_normalised(adata, layer)
    sc.tl.score_genes_cell_cycle(work, s_genes=s, g2m_genes=g2m, random_state=seed)
    phase = pd.Categorical(work.obs["phase"].astype(str), categories=PHASE_ORDER)
    silent = np.asarray((work[:, s + g2m].X != 0).sum(axis=1)).ravel() == 0
    if silent.any():  # scores of 0 - 0 would call them S: no evidence, so no phase (and no anchor)
        phase[silent] = np.nan
        warnings.warn(f"{int(silent.sum())} cell(s) express none of the {len(s + g2m)} cycle genes: their phase is "
                      "left missing, so they do not anchor a cycle fit", SSLCellWarning, stacklevel=3)
    return pd.DataFrame({"S_score": work.obs["S_score"].to_numpy(np.float32),
                         "G2M_score": work.obs["G2M_score"].to_numpy(np.float32), "phase": phase},
                        index=adata.obs_names)


def score_phase_sets(adata: ad.AnnData, sets: Mapping[str, Sequence[str]], *, layer: str | None = None,
                     min_genes: int = 3, seed: int = 0) -> pd.DataFrame:
    """Revelio-style phase calls (module doc) from raw counts (``X`` or ``layer``).

    ``sets``: phase name -> its genes, **in cycle order** (the order of the categories of the call). Each set is
    scored as scanpy's ``score_genes`` does on log-normalised counts (the mean of its genes minus that of control
    genes of similar expression), matched case-insensitively; every score is then z-scored over the cells, so sets
    of different sizes and strengths compete fairly, and each cell is called by its highest z-score.

    Returns a DataFrame indexed like ``adata.obs``: ``<phase>_score`` (the z-score) per set and ``phase``
    (categorical in the sets' order). Fewer than ``min_genes`` genes of a set present, or fewer than two sets, is an
    error."""
    import scanpy as sc

    if len(sets) < 2:
        raise InputError(f"score_phase_sets needs at least two phase gene sets; got {list(sets)}")
    work = _log_normalised(adata, layer)
    position: dict[str, str] = {}
    for name in np.asarray(adata.var_names).astype(str):
        position.setdefault(name.casefold(), name)
    out: dict[str, np.ndarray] = {}
    for phase, genes in sets.items():
        found = list(dict.fromkeys(position[g.casefold()] for g in genes if g.casefold() in position))
        if len(found) < min_genes:
            raise InputError(f"only {len(found)} of {len(genes)} genes of the {phase!r} set are among the data's "
                             f"genes; need {min_genes}")
        sc.tl.score_genes(work, found, ctrl_size=max(len(found), 50), score_name="_phase_score", random_state=seed)
        score = work.obs["_phase_score"].to_numpy(np.float64)
        std = score.std()
        out[f"{phase}_score"] = ((score - score.mean()) / (std if std > 0 else 1.0)).astype(np.float32)
    order = [str(p) for p in sets]
    z = np.column_stack(list(out.values()))
    phase = pd.Categorical.from_codes(z.argmax(axis=1), categories=order)
    return pd.DataFrame({**out, "phase": phase}, index=adata.obs_names)


def cycle_gene_pca(adata: ad.AnnData, *, layer: str | None = None, s_genes: Sequence[str] | None = None,
                   g2m_genes: Sequence[str] | None = None, n_comps: int = 2, seed: int = 0) -> np.ndarray:
    """PCA ``(N, n_comps)`` float32 of the S and G2/M genes of log-normalised counts, each gene scaled to unit
    variance (clipped at 10) first."""
    from sslcell.evaluate.baselines import scaled_pca

    s, g2m = cycle_genes(adata.var_names, s_genes, g2m_genes)
    work = _log_normalised(adata, layer)[:, s + g2m]
    return scaled_pca(work.X.toarray() if sparse.issparse(work.X) else np.asarray(work.X), None, n_comps, seed)
