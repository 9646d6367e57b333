"""The report of :func:`sslcell.tl.evaluate`: every (representation, protocol) pair's scores and how they were
obtained. The protocols, each run by ``tl.evaluate`` on every representation and the same cells:

- ``knn_cv``: kNN (``n_neighbors`` neighbours, euclidean, uniform votes), stratified ``n_splits``-fold CV;
- ``logistic_cv``: standardised multinomial logistic regression, the same folds;
- ``logistic_few_label``: logistic regression trained on ``n_per_class`` labelled cells per class,
  tested on all other cells, repeated over ``seeds`` (rule: :func:`sslcell.evaluate.protocols.few_label_split`),
  features standardised on the few labelled cells;
- ``logistic_few_label_raw``: the same without standardisation (standardising on so few cells gives
  low-variance components as much weight as strong ones, which can favour or hurt either side; both are shown).

Cells without a label are dropped, and so are classes with fewer than ``n_splits`` cells (they
cannot appear in every fold); both are counted in the report. Baselines are computed from the counts
(or pixels) of all cells (unsupervised, like the embedding itself) and scored on the kept cells.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd

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
    n_neighbors: int
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
        values = json.loads(Path(path).read_text())
        if "k" in values:  # reports written before the rename to n_neighbors
            values["n_neighbors"] = values.pop("k")
        return cls(**values)

    @property
    def k(self) -> int:
        """Deprecated name of :attr:`n_neighbors`."""
        return self.n_neighbors

    def to_markdown(self) -> str:
        """A readable Markdown table: ``mean ± std`` over folds (CV) or seeds (few-label)."""
        titles = {
            "knn_cv": f"kNN-{self.n_neighbors}, {self.n_splits}-fold CV",
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
