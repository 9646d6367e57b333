"""Score embeddings in ``adata.obsm`` (and baselines computed on the spot) against cell labels.

Protocols, each run on every representation and the same cells:

- ``knn_cv``: kNN (``k`` neighbours, euclidean, uniform votes), stratified ``n_splits``-fold CV;
- ``logistic_cv``: standardised multinomial logistic regression, the same folds;
- ``logistic_few_label``: logistic regression trained on ``n_per_class`` labelled cells per class,
  tested on all other cells, repeated over ``seeds`` (rule: :func:`sslcell.transfer.probes.few_label_split`),
  features standardised on the few labelled cells;
- ``logistic_few_label_raw``: the same without standardisation (standardising on so few cells gives
  low-variance components as much weight as strong ones, which can favour or hurt either side; both are shown).

Cells without a label are dropped, and so are classes with fewer than ``n_splits`` cells (they
cannot appear in every fold); both are counted in the report. Baselines are computed from the counts
of all cells of ``adata`` (unsupervised, like the embedding itself) and scored on the kept cells.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import anndata as ad
import faiss
import numpy as np
import pandas as pd
from scipy import sparse

from sslcell.errors import ConfigError, InputError
from sslcell.transfer.baselines import pca_baseline
from sslcell.transfer.probes import cross_validated_scores, few_label_scores

BASELINES = {"pca": pca_baseline}
ROW_FIELDS = (
    "representation", "dims", "protocol", "macro_f1", "macro_f1_std", "accuracy", "accuracy_std", "n_cells", "n_classes"
)  # fmt: skip


@dataclasses.dataclass
class EvaluationReport:
    """Scores of every (representation, protocol) pair, and how they were obtained.

    ``rows``: one dict per pair with the keys in ``ROW_FIELDS`` (``dims``: embedding width).
    ``n_cells``: cells scored; ``n_missing_labels``: cells dropped for lack of a label;
    ``dropped_classes``: classes dropped for having fewer than ``n_splits`` cells, with their sizes.
    """

    rows: list[dict]
    label_key: str
    k: int
    n_splits: int
    n_per_class: int
    seeds: list[int]
    seed: int
    n_cells: int
    n_classes: int
    n_missing_labels: int
    dropped_classes: dict[str, int]
    layer: str | None
    versions: dict[str, str]

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=list(ROW_FIELDS))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path) -> None:
        """Write the report (rows and metadata) as JSON; an existing file is replaced."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> EvaluationReport:
        return cls(**json.loads(Path(path).read_text()))

    def to_markdown(self) -> str:
        """A readable Markdown table: ``mean ± std`` over folds (CV) or seeds (few-label)."""
        titles = {
            "knn_cv": f"kNN-{self.k}, {self.n_splits}-fold CV",
            "logistic_cv": f"logistic, {self.n_splits}-fold CV",
            "logistic_few_label": f"logistic, {self.n_per_class} labels/class, {len(self.seeds)} draws",
            "logistic_few_label_raw": f"logistic (unscaled), {self.n_per_class} labels/class, {len(self.seeds)} draws",
        }
        dropped = ", ".join(f"`{name}` ({n})" for name, n in self.dropped_classes.items()) or "none"
        lines = [
            f"## Evaluation against `obs['{self.label_key}']`",
            "",
            f"{self.n_cells} cells, {self.n_classes} classes. Dropped: {self.n_missing_labels} cells without a label; "
            f"classes with fewer than {self.n_splits} cells: {dropped}.",
            f"CV folds: StratifiedKFold(shuffle, seed {self.seed}); few-label draws: seeds {list(self.seeds)}. "
            "Values: mean ± std.",
            "",
            "| representation | dims | protocol | macro-F1 | accuracy |",
            "|---|---:|---|---:|---:|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r['representation']} | {r['dims']} | {titles.get(r['protocol'], r['protocol'])} "
                f"| {r['macro_f1']:.3f} ± {r['macro_f1_std']:.3f} | {r['accuracy']:.3f} ± {r['accuracy_std']:.3f} |"
            )
        lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in self.versions.items()), ""]
        return "\n".join(lines)


def _versions() -> dict[str, str]:
    out = {}
    for name in ("sslcell", "numpy", "scikit-learn", "scanpy", "anndata"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out | {"faiss": faiss.__version__}


def _labels(adata: ad.AnnData, label_key: str, n_splits: int) -> tuple[np.ndarray, np.ndarray, int, dict]:
    """-> kept-cell mask ``(n_obs,)``, integer labels of kept cells, cells without label, dropped classes."""
    if label_key not in adata.obs.columns:
        raise InputError(f"label_key {label_key!r} is not a column of adata.obs (available: {list(adata.obs.columns)})")
    labels = adata.obs[label_key]
    missing = labels.isna().to_numpy()
    codes, names = pd.factorize(labels.to_numpy()[~missing])
    counts = np.bincount(codes, minlength=len(names))
    rare = counts < n_splits
    dropped = {str(names[c]): int(counts[c]) for c in np.flatnonzero(rare)}
    if dropped:
        warnings.warn(
            f"dropping classes of obs['{label_key}'] with fewer than n_splits={n_splits} cells: {dropped}",
            UserWarning,
            stacklevel=3,
        )
    if (~rare).sum() < 2:
        raise InputError(
            f"obs['{label_key}'] has {int((~rare).sum())} classes with at least n_splits={n_splits} labelled cells; "
            "need at least 2"
        )
    keep = ~missing
    keep[keep] = ~rare[codes]
    return keep, codes[~rare[codes]], int(missing.sum()), dropped


def _embedding(adata: ad.AnnData, key: str, keep: np.ndarray) -> np.ndarray:
    """``adata.obsm[key]`` rows of the kept cells as a dense ``(n_kept, D)`` float32 array, checked finite."""
    emb = adata.obsm[key]
    emb = emb.toarray() if sparse.issparse(emb) else np.asarray(emb)
    emb = np.asarray(emb[keep], dtype=np.float32).reshape(int(keep.sum()), -1)
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        cells = adata.obs_names[keep][bad]
        raise InputError(f"adata.obsm['{key}'] has NaN or inf in {bad.sum()} cells (first: {cells[0]!r})")
    return emb


def evaluate(
    adata: ad.AnnData,
    label_key: str,
    use_rep: str | Sequence[str] = "X_sslcell",
    *,
    baselines: Sequence[str] = ("pca",),
    layer: str | None = None,
    k: int = 15,
    n_splits: int = 5,
    n_per_class: int = 5,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    seed: int = 0,
) -> EvaluationReport:
    """Score each ``adata.obsm[use_rep]`` embedding ``(N, D)`` and each baseline against ``obs[label_key]``.

    ``baselines``: names in ``BASELINES`` (``"pca"``: :func:`pca_baseline` of the raw counts in
    ``adata.X``, or ``adata.layers[layer]``). Labels may be categorical, strings or integers; missing
    ones (NaN/None) are dropped. ``seed`` shuffles the CV folds; ``seeds`` draw the few-label sets.
    """
    reps = [use_rep] if isinstance(use_rep, str) else list(dict.fromkeys(use_rep))
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ConfigError(f"unknown baselines {unknown}; available: {list(BASELINES)}")
    if not reps and not baselines:
        raise ConfigError("nothing to evaluate: use_rep and baselines are both empty")
    absent = [key for key in reps if key not in adata.obsm]
    if absent:
        raise InputError(f"adata.obsm has no key {absent[0]!r} (available: {list(adata.obsm.keys())})")
    if int(n_splits) < 2:
        raise ConfigError(f"n_splits must be >= 2; got {n_splits}")
    keep, y, n_missing, dropped = _labels(adata, label_key, n_splits)

    embeddings = {key: _embedding(adata, key, keep) for key in reps}
    for name in baselines:
        embeddings[name] = np.asarray(BASELINES[name](adata, seed=seed, layer=layer))[keep]

    rows = []
    for rep, x in embeddings.items():
        results = {
            "knn_cv": cross_validated_scores(x, y, "knn", n_splits=n_splits, seed=seed, k=k),
            "logistic_cv": cross_validated_scores(x, y, "logistic", n_splits=n_splits, seed=seed),
            "logistic_few_label": few_label_scores(x, y, n_per_class=n_per_class, seeds=tuple(seeds), probe="logistic"),
            "logistic_few_label_raw": few_label_scores(
                x, y, n_per_class=n_per_class, seeds=tuple(seeds), probe="logistic", standardize=False
            ),
        }
        for protocol, res in results.items():
            rows.append({"representation": rep, "dims": int(x.shape[1]), "protocol": protocol}
                        | {f: res[f] for f in ROW_FIELDS[3:]})  # fmt: skip
    return EvaluationReport(
        rows=rows,
        label_key=label_key,
        k=int(k),
        n_splits=int(n_splits),
        n_per_class=int(n_per_class),
        seeds=[int(s) for s in seeds],
        seed=int(seed),
        n_cells=int(keep.sum()),
        n_classes=int(np.unique(y).size),
        n_missing_labels=n_missing,
        dropped_classes=dropped,
        layer=layer,
        versions=_versions(),
    )
