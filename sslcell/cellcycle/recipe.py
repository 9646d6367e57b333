"""The DeepCycle recipe on crops (Rappez et al. 2020): markers teach, label-free channels tell the time.

1. **Pseudo-phases from marker channels** (:func:`marker_phases`): each crop's integrated marker intensity
   (pixel sum above the crop's own background, its 10th percentile). ``"quantiles"``: the quantile bins of one
   marker (a DNA stain: DNA content rises from G1 to G2/M, so bin 1 < bin 2 < ... follows the cycle).
   ``"grid"``: DeepCycle's 2 x 2 median grid of two markers (FUCCI: a G1 marker first, an S/G2/M marker second),
   in cycle order ``lo/lo`` (early G1), ``hi/lo`` (G1), ``hi/hi`` (G1/S), ``lo/hi`` (S/G2/M).
2. **A classifier on the label-free channels** (``classify.finetune``, any head) learns to predict them.
3. **The descriptor** is the classifier's class log-probabilities ``(N, K)``, as in DeepCycle. Their principal plane
   does not show the cycle: a confident classifier's log-probabilities vary most along one direction (on the
   tests' synthetic crops, θ fitted there reached a circular correlation of 0.16 with the truth). So the cycle is
   fitted (:func:`~sslcell.cellcycle.fit.fit_cycle`, anchored by the pseudo-phases) on the **phase wheel**
   :func:`wheel`: each class is a direction ``φ_k = 2π (k + ½) / K`` in the pseudo-phases' cycle order and a cell
   sits at ``Σ_k p_k (cos φ_k, sin φ_k)``, so a cell between two phases lies between their directions
   (circular correlation 0.69 on the same crops).

The fitted :class:`CycleRecipe` (classifier + fit) is saved as a folder (safetensors and JSON) and placed on new
crops that lack the markers (:meth:`CycleRecipe.apply`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sslcell.cellcycle.fit import CycleFit, fit_cycle
from sslcell.checkpoint import atomic_write, check_free_files
from sslcell.classify.classifier import CellClassifier, load_classifier, save_classifier
from sslcell.data.images import CellImages
from sslcell.errors import ConfigError, FileFormatError, InputError
from sslcell.inference import default_device, run_batched

RECIPE_JSON = "cycle.json"
GRID_ORDER = ["lo/lo", "hi/lo", "hi/hi", "lo/hi"]


def marker_intensity(cells: CellImages, channel: int | str, batch_size: int = 1024) -> np.ndarray:
    """Integrated intensity ``(N,)`` of one channel: per crop, the sum of pixels above its 10th percentile."""
    (index,) = cells.channel_index([channel])
    out = np.empty(len(cells), dtype=np.float64)
    for start in range(0, len(cells), batch_size):
        rows = np.arange(start, min(start + batch_size, len(cells)))
        x = cells.batch(rows)[:, index].reshape(len(rows), -1).astype(np.float64)
        out[rows] = np.clip(x - np.percentile(x, 10, axis=1, keepdims=True), 0, None).sum(axis=1)
    return out


def marker_phases(cells: CellImages, markers: Sequence[int | str], scheme: str = "quantiles",
                  n_bins: int = 4) -> tuple[np.ndarray, list[str]]:
    """Pseudo-phase labels ``(N,)`` from marker channels and their cycle order (module doc)."""
    markers = list(markers)
    if scheme == "quantiles":
        if len(markers) != 1 or n_bins < 2:
            raise ConfigError(f"scheme='quantiles' takes one marker channel and n_bins >= 2; got {markers}, {n_bins}")
        value = marker_intensity(cells, markers[0])
        edges = np.quantile(value, np.linspace(0, 1, n_bins + 1)[1:-1])
        order = [f"bin{i + 1}" for i in range(n_bins)]
        bins = np.searchsorted(edges, value, side="right")
        empty = [order[i] for i in range(n_bins) if not (bins == i).any()]
        if empty or len(np.unique(edges)) < len(edges):  # tied edges: crops of one intensity land in a higher bin
            values, counts = np.unique(value, return_counts=True)
            raise InputError(
                f"marker {markers[0]!r}: {counts.max() / len(value):.0%} of the crops share one intensity "
                f"({values[counts.argmax()]:.4g}), so {n_bins} quantile bins cannot be cut (tied edges; empty: "
                f"{empty}); use fewer bins (n_bins), or the grid scheme with a G1 and an S/G2/M marker"
            )
        return np.asarray(order, dtype=object)[bins], order
    if scheme == "grid":
        if len(markers) != 2:
            raise ConfigError(f"scheme='grid' takes two marker channels (G1 marker, S/G2/M marker); got {markers}")
        a, b = (marker_intensity(cells, m) for m in markers)
        high_a, high_b = a > np.median(a), b > np.median(b)
        labels = np.where(high_a, np.where(high_b, "hi/hi", "hi/lo"), np.where(high_b, "lo/hi", "lo/lo"))
        return labels.astype(object), list(GRID_ORDER)
    raise ConfigError(f"scheme must be 'quantiles' or 'grid'; got {scheme!r}")


def descriptor_of(classifier: CellClassifier, cells: CellImages, channels: Sequence[int | str] | None = None,
                  device: Any = None, batch_size: int = 512) -> np.ndarray:
    """DeepCycle's descriptor: the classifier's class log-probabilities ``(N, K)`` of crops."""
    cells = classifier.inputs.align(cells, channels)
    device = default_device(device)
    classifier = classifier.to(device).eval()
    with torch.no_grad():
        return run_batched(lambda x: torch.log_softmax(classifier(classifier.inputs.normalize(x)).float(), dim=1),
                           cells, len(classifier.classes), batch_size=batch_size, device=device)


def wheel(log_proba: np.ndarray, classes: Sequence[str], order: Sequence[str]) -> np.ndarray:
    """The phase wheel ``(N, 2)`` of class log-probabilities ``(N, K)`` (columns in ``classes`` order), with the
    classes placed round the circle in cycle ``order`` (module doc)."""
    columns = [list(classes).index(name) for name in order]
    phi = 2 * np.pi * (np.arange(len(order)) + 0.5) / len(order)
    p = np.exp(log_proba[:, columns])
    return np.column_stack([p @ np.cos(phi), p @ np.sin(phi)])


@dataclass
class CycleRecipe:
    """A classifier on label-free channels and the cycle fitted through its class log-probabilities."""

    classifier: CellClassifier
    fit: CycleFit
    info: dict[str, Any]

    def apply(self, cells: CellImages, channels: Sequence[int | str] | None = None,
              device: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """θ ``(N,)``, phase ``(N,)`` and descriptor ``(N, K)`` of crops, which need not hold the markers
        (``channels``: the label-free channels, default: the classifier's, by name). Each crop is placed by itself on
        the fitted cycle (nothing is refitted), so an acquisition of cells all in one phase gets the θ those cells
        would get among cells of every phase: θ in that phase's arc."""
        descriptor = descriptor_of(self.classifier, cells, channels, device)
        theta = self.fit.theta(wheel(descriptor, self.classifier.classes, self.info["order"]))
        return theta, self.fit.phase(theta), descriptor

    def to_anndata(self, cells: CellImages, channels: Sequence[int | str] | None = None, device: Any = None):
        """:meth:`apply` written into the crops' AnnData (``cells.to_anndata()``): ``obs["cell_cycle_theta"]``,
        ``obs["cell_cycle_phase"]``, ``obsm["cell_cycle_descriptor"]``, ``obsm["cell_cycle_plane"]`` and the fit in
        ``uns["sslcell"]["cell_cycle"]``, as ``tl.cell_cycle`` writes them, so ``pl.cell_cycle`` shows it; with
        ``projected_residual``, how far these crops lie from the fitted circle (:meth:`CycleFit.residual_of`)."""
        from sslcell.cellcycle.project import write_cycle

        theta, _, descriptor = self.apply(cells, channels, device)
        representation = wheel(descriptor, self.classifier.classes, self.info["order"])
        adata = cells.to_anndata()
        write_cycle(adata, self.fit, theta, self.fit.plane(representation),
                    ("cell_cycle_theta", "cell_cycle_phase", "cell_cycle_plane"))
        adata.obsm["cell_cycle_descriptor"] = descriptor
        adata.uns.setdefault("sslcell", {})["cell_cycle"] = {
            **self.fit.to_dict(), "projected_residual": self.fit.residual_of(representation)}
        return adata

    def plane(self, descriptor: np.ndarray) -> np.ndarray:
        """Descriptor ``(N, K)`` -> the scaled plane ``(N, 2)`` the cycle was fitted in (for ``pl.cell_cycle``)."""
        return self.fit.plane(wheel(descriptor, self.classifier.classes, self.info["order"]))

    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """``classifier/`` (safetensors + JSON) and ``cycle.json`` (the fit and the recipe's settings); a recipe
        already saved there is replaced only with ``overwrite=True``."""
        directory = Path(directory)
        check_free_files(directory, (RECIPE_JSON,), overwrite)
        save_classifier(self.classifier, directory / "classifier", overwrite=overwrite)
        text = json.dumps({"kind": "cycle_recipe", "fit": self.fit.to_dict(), "info": self.info}, indent=1)
        atomic_write(directory / RECIPE_JSON, lambda p: Path(p).write_text(text))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> CycleRecipe:
        """Restore a saved recipe; nothing in it executes code. ``cycle.json`` is checked against the classifier: a
        valid 2-D fit (:meth:`CycleFit.from_record`) and ``info.order`` naming each of the classifier's classes once;
        a damaged or mismatched file raises :class:`FileFormatError` naming it and the field."""
        directory = Path(directory)
        path = directory / RECIPE_JSON
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileFormatError(f"{directory}: no {RECIPE_JSON}; not a saved cell-cycle recipe") from None
        except (ValueError, UnicodeDecodeError) as err:
            raise FileFormatError(f"{path}: not a valid cell-cycle recipe ({err})") from None
        if not isinstance(meta, dict) or meta.get("kind") != "cycle_recipe":
            raise FileFormatError(f"{path}: not a valid cell-cycle recipe (no \"kind\": \"cycle_recipe\")")
        values = meta.get("fit")
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(CycleFit)}) if isinstance(values, dict) \
            else []
        if unknown:
            raise FileFormatError(f"{path}: field 'fit' holds unknown field(s) {unknown}; not a cell-cycle fit")
        fit = CycleFit.from_record(values, f"{path} (field 'fit')", FileFormatError)
        if len(fit.mean) != 2:
            raise FileFormatError(f"{path}: field 'fit' was made on {len(fit.mean)} dimensions; a recipe's cycle is "
                                  "fitted on its 2-D phase wheel (damaged or edited)")
        info = meta.get("info")
        order = info.get("order") if isinstance(info, dict) else None
        if not isinstance(order, list) or not all(isinstance(p, str) for p in order):
            raise FileFormatError(f"{path}: field 'info' lacks 'order', the pseudo-phases in cycle order (a list of "
                                  f"names); got {order!r}: damaged or edited")
        classifier = load_classifier(directory / "classifier")
        if sorted(order) != sorted(classifier.classes):
            raise FileFormatError(f"{path}: field 'info.order' {order} does not name each of the classifier's classes "
                                  f"{classifier.classes} once: damaged, edited, or another recipe's classifier")
        if fit.phases and fit.phases != order:
            raise FileFormatError(f"{path}: the fit's phases {fit.phases} are not field 'info.order' {order}: "
                                  "damaged or edited")
        return cls(classifier, fit, info)


def fit_recipe(cells: CellImages, model: Any, markers: Sequence[int | str], channels: Sequence[int | str] | None,
               config: Any = None, *, scheme: str = "quantiles", n_bins: int = 4,
               device: Any = None) -> tuple[CycleRecipe, np.ndarray]:
    """The whole DeepCycle recipe (module doc) on labelled-by-marker crops: pseudo-phases from ``markers``, a
    classifier fine-tuned from ``model`` on ``channels`` (label-free; default: the model's, by name), the cycle fit.
    ``config``: a :class:`~sslcell.classify.FinetuneConfig`. Returns the recipe and the pseudo-phases ``(N,)``."""
    from sslcell.classify import FinetuneConfig, finetune

    modality = getattr(getattr(model, "inputs", None), "modality", None)
    if modality != "image":
        raise InputError(f"{getattr(model, 'source', None) or 'the model'}: the DeepCycle recipe fine-tunes a model of "
                         f"crops, and this model reads {modality or 'no crops'}, not crops; for expression use "
                         "tl.score_cell_cycle and tl.cell_cycle")
    used = cells.channel_index(list(channels) if channels is not None else list(model.inputs.channel_names))
    leaked = set(cells.channel_index(list(markers))) & set(used)
    if leaked:
        raise InputError(f"marker channel(s) {sorted(leaked)} are also among the classifier's input channels: the "
                         "markers teach, they must not be seen (choose label-free channels)")
    phases, order = marker_phases(cells, markers, scheme, n_bins)
    free = model.inputs.align(cells, channels)
    classifier = finetune(free, model, phases, config or FinetuneConfig(), device=device)
    fit = fit_cycle(wheel(descriptor_of(classifier, free, device=device), classifier.classes, order), phases, order)
    info = {"markers": [str(m) for m in markers], "scheme": scheme, "order": order, "n_cells": len(cells),
            "channels": [cells.channel_names[i] for i in used]}
    return CycleRecipe(classifier, fit, info), phases
