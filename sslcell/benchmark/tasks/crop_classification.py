"""Task kind ``crop_classification``: cell type or fate from crops, sslcell pretraining + probe / fine-tuning against
baselines, every setting chosen on a validation split, every entry scored once on one fixed test split.

Protocol (seed: the suite's):

* crops: ``data`` (``.npz``, zarr or a crop folder), ``channels`` kept, classes from ``obs[label_key]`` (crops
  without a label dropped); ``max_cells`` subsamples first (stratified, at least 2 per class);
* test split: ``test_size`` of the crops by group (``GroupShuffleSplit`` on ``obs[group_key]``: no group on both
  sides) or stratified (``train_test_split``), ``random_state=seed``; the rest is the training part;
* per label fraction (1.0, 0.1): the labelled crops are a stratified fraction of the training part
  (``label_fraction_split``). A validation split inside them (``val_size``, by group or stratified) scores every
  candidate setting of every entry; the one with the best validation macro-F1 is trained again on all labelled
  crops and scored on the test split, plainly and, for trained classifiers, with test-time augmentation (the 8
  flips and 90-degree turns, rows "+ TTA"). The test split chooses nothing;
* recipes: pretrained once on the training part's crops without labels (``pretrain_crops: all`` adds the test
  crops, still without labels: transductive, and the notes say so), then a linear probe and fine-tuning
  (``classify.finetune`` with the recipe's ``finetune`` settings, any :class:`~sslcell.classify.FinetuneConfig`
  field: e.g. ``schedule: one_cycle``, ``balance: loss``, ``min_steps``; ``finetune_epochs`` and
  ``finetune_min_steps`` override every recipe's; grid: ``finetune_lrs`` (the peak rate, as the CNN's
  ``cnn_lrs``) x ``encoder_lr_factors`` x ``layer_decays`` (a ViT's layer-wise rate decay) x
  ``finetune_init_heads`` (the head's start: the linear probe, LP-FT, or random weights as the CNN from scratch) x
  ``finetune_epoch_grid``);
* baselines: ``pixel_pca`` (raw pixels z-scored, PCA-50, logistic regression; grid: class-weight power),
  ``random_encoder`` (each recipe's encoder with random weights, the same linear probe), ``supervised_cnn`` (the
  plain CNN of :mod:`._supervised_cnn` from scratch, trained by the fine-tuning loop; grid: ``cnn_lrs`` x
  ``cnn_epochs``). Its budget is at least the recipes' fine-tuning budget: the largest of ``cnn_epochs`` must be
  at least their largest epochs, and ``cnn_min_steps`` (default: the largest of their ``min_steps``) at least their
  minimum number of optimiser steps, which decides the budget when labels are few.

Every training's scores (each candidate on validation, the chosen one on test) are kept in ``<workdir>/fits``;
``--resume`` reads back those an earlier run of the same data, rows, setting, pretrained weights, seed and device
finished (:mod:`sslcell.benchmark.fit_store`), and a pretraining killed before its end goes on from its last
checkpoint.

Targets (issue 14, item 7), ratios within the run: the sslcell entry with the best validation macro-F1 against the
supervised CNN's best on validation, test accuracy and test macro-F1, per label fraction (goal 1: match with all
labels; with 10% the issue asks to beat it).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from sslcell.benchmark.fit_store import FitStore
from sslcell.benchmark.registry import Context, Table, Target, TaskKind, TaskResult, register
from sslcell.benchmark.tasks._preflight import check_crops
from sslcell.benchmark.tasks._supervised_cnn import CNNSettings, train_cnn
from sslcell.classify.finetune import INIT_HEADS
from sslcell.errors import ConfigError, InputError
from sslcell.evaluate.metrics import ClassificationReport

BASELINES = ("pixel_pca", "random_encoder", "supervised_cnn")


@dataclass
class CropClassificationParams:
    label_key: str = "label"
    channels: list[int | str] | None = None  # None: all channels
    group_key: str | None = None  # split test and validation by this obs column (no group on both sides)
    test_size: float = 0.2
    val_size: float = 0.2  # share of the labelled training crops that scores the candidate settings
    label_fractions: list[float] = field(default_factory=lambda: [1.0, 0.1])
    max_cells: int | None = None  # subsample first (stratified); None: all crops
    pretrain_crops: Literal["train", "all"] = "train"  # "all": also the test crops, unlabelled (transductive)
    pretrain_epochs: int | None = None  # overrides every recipe's train.max_epochs
    reuse_pretrained: bool = False  # reuse a model pretrained in --workdir by an earlier run: same recipe, data, crops
    finetune_epochs: int | None = None  # overrides every recipe's fine-tuning epochs
    finetune_min_steps: int | None = None  # overrides every recipe's fine-tuning min_steps
    finetune_lrs: list[float] = field(default_factory=list)  # fine-tuning grid (peak rate); empty: the recipe's own
    encoder_lr_factors: list[float] = field(default_factory=list)  # fine-tuning grid; empty: the recipe's own
    finetune_init_heads: list[str] = field(default_factory=list)  # fine-tuning grid ("linear_probe", "random"); empty:
    # the recipe's own
    finetune_epoch_grid: list[int] = field(default_factory=list)  # fine-tuning grid; empty: the recipe's own epochs
    # (or finetune_epochs)
    layer_decays: list[float] = field(default_factory=list)  # fine-tuning grid (ViT encoders); empty: the recipe's own
    probe_only: list[str] = field(default_factory=list)  # recipes scored with the linear probe only
    pca_components: int = 50  # at most one fewer than the crops it is fitted on
    pca_class_weights: list[float] = field(default_factory=lambda: [0.0, 1.0])  # powers of the balanced weights
    cnn_lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-3])
    cnn_epochs: list[int] = field(default_factory=lambda: [30])
    cnn_widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    cnn_batch_size: int = 128
    cnn_min_steps: int | None = None  # None: the largest fine-tuning min_steps of the recipes (0 without recipes)
    tta: bool = True  # also score trained classifiers with test-time augmentation
    # each entry's chosen setting trained again on all labelled crops this many more times, with training seeds
    # seed + 1, seed + 2, ... (the split stays the suite seed's), and scored on test: a table of the mean and spread
    # over training seeds beside the first seed's rows (which the targets use)
    repeat_seeds: int = 0

    def check_entries(self, recipes: list[str], baselines: list[str], *, task: str, params: str) -> None:
        """Refuse a task with nothing to score, and ``probe_only`` names that are not among its ``recipes`` (a typo
        would fine-tune the recipe). ``task``, ``params``: where the task and these settings sit in the suite file."""
        if not recipes and not baselines:
            raise ConfigError(f"{task}: recipes, baselines: the task lists neither, so it has nothing to score")
        unknown = [n for n in self.probe_only if n not in recipes]
        if unknown:
            raise ConfigError(f"{params}.probe_only: no recipe named {unknown[0]!r} in this task; its recipes are "
                              f"{recipes}")

    def check(self) -> None:
        for name in ("test_size", "val_size"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"{name}: must be in (0, 1), got {getattr(self, name)}")
        if not self.label_fractions or not all(0.0 < f <= 1.0 for f in self.label_fractions):
            raise ConfigError(f"label_fractions: give fractions in (0, 1], got {self.label_fractions}")
        if len(set(self.label_fractions)) != len(self.label_fractions):
            raise ConfigError(f"label_fractions: each fraction once, got {self.label_fractions}")
        if self.max_cells is not None and self.max_cells < 20:
            raise ConfigError(f"max_cells: must be >= 20 or null, got {self.max_cells}")
        for name in ("pretrain_epochs", "finetune_epochs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1 or null, got {getattr(self, name)}")
        for name in ("finetune_min_steps", "cnn_min_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0 or null, got {getattr(self, name)}")
        if not all(lr > 0 for lr in self.finetune_lrs):
            raise ConfigError(f"finetune_lrs: give learning rates > 0, got {self.finetune_lrs}")
        if any(f < 0 for f in self.encoder_lr_factors):
            raise ConfigError(f"encoder_lr_factors: must be >= 0, got {self.encoder_lr_factors}")
        if not all(0.0 < d <= 1.0 for d in self.layer_decays):
            raise ConfigError(f"layer_decays: give decays in (0, 1], got {self.layer_decays}")
        if not all(isinstance(e, int) and e >= 1 for e in self.finetune_epoch_grid):
            raise ConfigError(f"finetune_epoch_grid: give epoch counts >= 1, got {self.finetune_epoch_grid}")
        if not set(self.finetune_init_heads) <= set(INIT_HEADS):
            raise ConfigError(f"finetune_init_heads: give some of {INIT_HEADS}, got {self.finetune_init_heads}")
        if self.pca_components < 1:
            raise ConfigError(f"pca_components: must be >= 1, got {self.pca_components}")
        if not self.pca_class_weights or not all(0.0 <= w <= 1.0 for w in self.pca_class_weights):
            raise ConfigError(f"pca_class_weights: give powers in [0, 1], got {self.pca_class_weights}")
        if not self.cnn_lrs or not all(lr > 0 for lr in self.cnn_lrs):
            raise ConfigError(f"cnn_lrs: give learning rates > 0, got {self.cnn_lrs}")
        if not self.cnn_epochs or not all(e >= 1 for e in self.cnn_epochs):
            raise ConfigError(f"cnn_epochs: give epoch counts >= 1, got {self.cnn_epochs}")
        if not self.cnn_widths or not all(w >= 1 for w in self.cnn_widths) or self.cnn_batch_size < 1:
            raise ConfigError("cnn_widths and cnn_batch_size: must be >= 1")
        if self.repeat_seeds < 0:
            raise ConfigError(f"repeat_seeds: must be >= 0, got {self.repeat_seeds}")


@dataclass
class Labelled:
    """The labelled training crops of one label fraction (positions into the crops), split for validation."""

    fraction: float
    rows: np.ndarray
    fit: np.ndarray  # trains each candidate setting
    val: np.ndarray  # scores it

    @property
    def name(self) -> str:
        return f"{self.fraction * 100:g}%"


@dataclass
class Entry:
    """A row family of the table: candidate settings, how to train one on some crops, how to score the result."""

    name: str
    sslcell: bool
    candidates: list[tuple[str, Any]]  # (label, setting)
    fit: Callable[[Any, np.ndarray], Any]  # (setting, rows) -> model
    score: Callable[[Any, np.ndarray, bool], Any]  # (model, rows, tta) -> ClassificationReport
    tta: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)  # what else decides a training (pretrained weights)


def check_task(task: Any) -> None:
    """The crops open, with the channels and obs columns the parameters name (when the suite loads)."""
    p: CropClassificationParams = task.params
    check_crops(task.path, {"label_key": p.label_key, "group_key": p.group_key}, p.channels)


def run(task: Any, ctx: Context) -> TaskResult:
    from sslcell.data.images import CellImages

    p: CropClassificationParams = task.params
    device = _torch_device(ctx.device)
    cells = _labelled_cells(CellImages.read(task.path, channels=p.channels), p.label_key)
    y = cells.obs[p.label_key].astype(str).to_numpy()
    if p.max_cells is not None and p.max_cells < len(cells):
        cells = cells[_subsample(y, p.max_cells, ctx.seed)]
        y = cells.obs[p.label_key].astype(str).to_numpy()
    groups = _groups(cells, p.group_key)
    train, test = _test_split(y, groups, p.test_size, ctx.seed)
    fractions = [_labelled_split(y, groups, train, f, p.val_size, ctx.seed) for f in p.label_fractions]
    ctx.log(f"{task.name}: {len(cells)} crops, train {len(train)}, test {len(test)}")

    content = _data_identity(task.path)  # hashed once: fits and reused models are keyed by the bytes, not the path
    entries = (_baselines(task, ctx, cells, y, train, device, min(len(f.fit) for f in fractions))
               + _recipes(task, ctx, cells, train, test, device, content))
    store = FitStore(ctx.workdir / "fits", resume=ctx.resume)
    run_of = {"data": content, "channels": cells.channel_names, "labels": _digest(y),
              "seed": ctx.seed, "device": device.type}
    rows, grid, reports = [], [], {}
    for labelled, entry in ctx.steps([(f, e) for f in fractions for e in entries], desc=f"{task.name} entries"):
        ctx.log(f"{task.name}: {entry.name}, {labelled.name} labels")
        entry_rows, entry_grid, entry_reports = _evaluate(entry, labelled, test, p.tta, store, run_of,
                                                          repeat_seeds=p.repeat_seeds)
        rows += entry_rows
        grid += entry_grid
        reports |= entry_reports
    result = _result(task, ctx, cells, y, groups, train, test, fractions, rows, grid, reports)
    note = store.note()
    if note is not None:
        result.notes.append(note)
    result.raw["resumed"] = store.resumed
    return result


# ------------------------------------------------------------------------------------------------------- data
def _labelled_cells(cells: Any, label_key: str) -> Any:
    """Crops with a label in ``obs[label_key]``, that column made categorical over the labels present."""
    if label_key not in cells.obs.columns:
        raise InputError(f"{cells.source}: no obs column {label_key!r} (params.label_key); columns are "
                         f"{list(cells.obs.columns)}")
    keep = cells.obs[label_key].notna().to_numpy()
    cells = cells if keep.all() else cells[np.flatnonzero(keep)]
    cells.obs = cells.obs.copy()
    cells.obs[label_key] = cells.obs[label_key].astype(str).astype("category")
    return cells


def _subsample(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted positions of about ``n`` of ``y (N,)``: per class its share, at least 2 (a stratified split needs 2)."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        k = min(len(members), max(2, int(round(n * len(members) / len(y)))))
        keep.append(rng.choice(members, k, replace=False))
    return np.sort(np.concatenate(keep))


def _groups(cells: Any, group_key: str | None) -> np.ndarray | None:
    if group_key is None:
        return None
    if group_key not in cells.obs.columns:
        raise InputError(f"{cells.source}: no obs column {group_key!r} (params.group_key); columns are "
                         f"{list(cells.obs.columns)}")
    return cells.obs[group_key].astype(str).to_numpy()


def _test_split(y: np.ndarray, groups: np.ndarray | None, test_size: float, seed: int) -> tuple[np.ndarray, ...]:
    """``(train, test)`` sorted positions: by group (``GroupShuffleSplit``) or stratified (``train_test_split``)."""
    from sklearn.model_selection import GroupShuffleSplit, train_test_split

    index = np.arange(len(y))
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise InputError(f"the labelled crops hold one class ({classes.tolist()}): classification needs at least 2")
    if groups is None and (counts < 2).any():
        raise InputError(f"classes {classes[counts < 2].tolist()} have a single labelled crop: a stratified test split "
                         "needs at least 2 of each class (drop or relabel those crops, or split by params.group_key)")
    if groups is not None:
        train, test = next(GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed).split(index, y,
                                                                                                        groups))
    else:
        train, test = train_test_split(index, test_size=test_size, stratify=y, random_state=seed)
    return np.sort(train), np.sort(test)


def _labelled_split(y: np.ndarray, groups: np.ndarray | None, train: np.ndarray, fraction: float, val_size: float,
                    seed: int) -> Labelled:
    """A stratified ``fraction`` of ``train``, and its validation split: ``val_size`` of its groups
    (``GroupShuffleSplit``), or per class a ``val_size`` share keeping one crop to train on (``label_fraction_split``
    with ``keep_one``)."""
    from sklearn.model_selection import GroupShuffleSplit

    from sslcell.evaluate.protocols import label_fraction_split

    rows = train if fraction == 1.0 else train[label_fraction_split(y[train], fraction, seed)]
    if groups is not None and len(np.unique(groups[rows])) >= 2:
        fit, val = next(GroupShuffleSplit(n_splits=1, test_size=val_size, random_state=seed).split(rows, y[rows],
                                                                                                    groups[rows]))
    else:
        val = label_fraction_split(y[rows], val_size, seed, keep_one=True)
        fit = np.setdiff1d(np.arange(len(rows)), val)
    if len(val) == 0 or len(np.unique(y[rows[fit]])) < 2:
        raise InputError(f"{fraction:g} of the training labels ({len(rows)} crops) leaves no validation split with "
                         "2 classes to train on; use more crops or a larger label fraction")
    return Labelled(fraction, rows, np.sort(rows[fit]), np.sort(rows[val]))


def _digest(values: np.ndarray) -> str:
    """SHA-256 of ``values (N,)``: labels as text, positions as int64."""
    if values.dtype.kind in "OUS":
        return hashlib.sha256("\n".join(values.astype(str)).encode()).hexdigest()
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.int64).tobytes()).hexdigest()


def _data_identity(path: Path) -> list[Any]:
    """The data as a fit depends on it: per file (a folder: every file under it, by relative name), its size and the
    SHA-256 of its bytes. Content, not path or mtime: the same file copied elsewhere, or copied again, is the same."""
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    return [(str(f.relative_to(path)) if f != path else "", f.stat().st_size, _file_sha256(f)) for f in files]


def _file_sha256(*files: Path) -> str:
    """SHA-256 of the files' bytes, in order, read in 1 MiB blocks."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as stream:
            while block := stream.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def _torch_device(device: str) -> torch.device:
    from sslcell.inference import default_device

    return default_device(None if device == "auto" else device)


def _accelerator(device: torch.device) -> str:
    return "gpu" if device.type == "cuda" else "cpu"


# ------------------------------------------------------------------------------------------------- entries
def _classifier_score(cells: Any, label_key: str, device: torch.device) -> Callable[[Any, np.ndarray, bool], Any]:
    """Scores of a :class:`CellClassifier` on crops ``rows``, through ``tl.predict`` / ``tl.score``."""
    from sslcell import tl

    def score(classifier: Any, rows: np.ndarray, tta: bool) -> Any:
        part = cells[rows]
        adata = part.to_anndata()
        with warnings.catch_warnings():  # the table scores both ways: tl.predict's TTA caveat says nothing new
            warnings.filterwarnings("ignore", message="tta: ")
            tl.predict(adata, classifier, crops=part, tta=tta, device=device)
        return tl.score(adata, label_key)

    return score


def _baselines(task: Any, ctx: Context, cells: Any, y: np.ndarray, train: np.ndarray,
               device: torch.device, fewest_fit: int) -> list[Entry]:
    p: CropClassificationParams = task.params
    score = _classifier_score(cells, p.label_key, device)
    classes = [str(c) for c in cells.obs[p.label_key].cat.categories]
    codes = cells.obs[p.label_key].cat.codes.to_numpy()
    entries = []
    if "pixel_pca" in task.baselines:
        entries.append(_pixel_pca_entry(cells, y, classes, p, ctx.seed, fewest_fit))
    if "random_encoder" in task.baselines:
        if not task.recipes:
            raise ConfigError(f"task {task.name}: the random_encoder baseline takes its architecture from a recipe; "
                              "list at least one recipe")
        from sslcell.train import image_contract

        contract = image_contract(cells[train], seed=ctx.seed)
        seen = set()
        for recipe in task.recipes:
            key = repr((recipe.config.encoder.name, sorted(recipe.config.encoder.options.items())))
            if key in seen:
                continue
            seen.add(key)
            entries.append(_random_encoder_entry(recipe, contract, cells, p, ctx.seed, device, score))
    if "supervised_cnn" in task.baselines:
        finetuned = [c for r in task.recipes if r.name not in p.probe_only for _, c in _finetune_grid(r, p, device)]
        budget = max((c.epochs for c in finetuned), default=0)
        if max(p.cnn_epochs) < budget:
            raise ConfigError(f"task {task.name}: params.cnn_epochs {p.cnn_epochs}: the supervised CNN must be offered "
                              f"at least the recipes' fine-tuning budget ({budget} epochs)")
        min_steps = max((c.min_steps for c in finetuned), default=0)
        if p.cnn_min_steps is not None and p.cnn_min_steps < min_steps:
            raise ConfigError(f"task {task.name}: params.cnn_min_steps {p.cnn_min_steps}: the supervised CNN must be "
                              f"offered at least the recipes' fine-tuning budget ({min_steps} steps)")
        min_steps = min_steps if p.cnn_min_steps is None else p.cnn_min_steps
        candidates = [CNNSettings(lr=lr, epochs=e, widths=list(p.cnn_widths), batch_size=p.cnn_batch_size,
                                  min_steps=min_steps, seed=ctx.seed) for e in p.cnn_epochs for lr in p.cnn_lrs]
        entries.append(Entry(
            name=f"supervised CNN from scratch ({'-'.join(map(str, p.cnn_widths))})", sslcell=False,
            candidates=[(s.label(), s) for s in candidates],
            fit=lambda s, rows: train_cnn(cells[rows], codes[rows], classes, s, device), score=score,
            extra={"min_steps": min_steps}))
    return entries


def _pixel_pca_entry(cells: Any, y: np.ndarray, classes: list[str], p: CropClassificationParams, seed: int,
                     fewest_fit: int) -> Entry:
    """Raw pixels z-scored, PCA (fitted on the training crops), logistic regression on the scores as they are.
    A PCA keeps at most one component fewer than the crops it is fitted on; where ``fewest_fit`` (the smallest
    candidate training set) clips ``pca_components``, the name says so."""
    from sslcell.evaluate import class_weight, classification_report, logistic_probe, pixel_pca_baseline

    cache: dict[bytes, np.ndarray] = {}

    def components(rows: np.ndarray) -> np.ndarray:
        key = rows.tobytes()
        if key not in cache:
            cache.clear()
            n = min(p.pca_components, len(rows) - 1)
            cache[key] = pixel_pca_baseline(cells, n, seed, fit_rows=rows)  # (N, n): every crop projected
        return cache[key]

    def fit(power: float, rows: np.ndarray) -> tuple[np.ndarray, Any]:
        x = components(rows)
        probe = logistic_probe(class_weight=class_weight(y[rows], power), standardize=False)
        return x, probe.fit(x[rows], y[rows])

    def score(model: tuple[np.ndarray, Any], rows: np.ndarray, tta: bool) -> Any:
        x, probe = model
        proba = probe.predict_proba(x[rows])
        full = np.zeros((len(rows), len(classes)))
        full[:, [classes.index(str(c)) for c in probe.classes_]] = proba
        return classification_report(y[rows], np.asarray(classes)[full.argmax(1)], full, classes=classes)

    candidates = [("no class weights" if w == 0 else f"balanced class weights ^ {w:g}", w) for w in p.pca_class_weights]
    pca = (f"PCA-{p.pca_components}" if fewest_fit - 1 >= p.pca_components
           else f"PCA (up to {p.pca_components} components, one fewer than the training crops)")
    return Entry(name=f"raw pixels {pca} + logistic", sslcell=False, candidates=candidates, fit=fit,
                 score=score, tta=False)


def _random_encoder_entry(recipe: Any, contract: Any, cells: Any, p: CropClassificationParams, seed: int,
                          device: torch.device, score: Callable) -> Entry:
    from sslcell.classify import finetune
    from sslcell.methods import build_method

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_method(copy.deepcopy(recipe.config), contract)
    config = _finetune_config(recipe, p, "linear", device, seed)
    return Entry(name=f"random-weight {recipe.config.encoder.name} ({recipe.name}'s encoder) + linear probe",
                 sslcell=False, candidates=[("linear probe", config)],
                 fit=lambda cfg, rows: finetune(cells[rows], model, p.label_key, cfg, device=device), score=score,
                 identity={"recipe": recipe.config.to_dict()})


def _recipes(task: Any, ctx: Context, cells: Any, train: np.ndarray, test: np.ndarray,
             device: torch.device, content: list[Any]) -> list[Entry]:
    """Pretrain every recipe (on the training crops, or all crops), then its probe and fine-tuning entries; a model
    pretrained earlier is reused only for the same data ``content`` (:func:`_data_identity`), not the same path."""
    from sslcell.checkpoint import load
    from sslcell.classify import finetune

    p: CropClassificationParams = task.params
    score = _classifier_score(cells, p.label_key, device)
    unlabelled = train if p.pretrain_crops == "train" else np.sort(np.concatenate([train, test]))
    entries = []
    for recipe in ctx.steps(task.recipes, desc=f"{task.name} pretraining"):
        out = ctx.workdir / recipe.name
        config = copy.deepcopy(recipe.config)
        config.train.progress_bar = False
        config.train.accelerator = _accelerator(device)
        if p.pretrain_epochs is not None:
            config.train.max_epochs = p.pretrain_epochs
        what = _pretraining(config, task.path, cells.channel_names, unlabelled)
        marker = json.loads(json.dumps({**what, "data_content": content}))  # as read back from its file
        # a model this recipe finished on these crops: reused when asked, and by --resume (a killed run goes on)
        if ((p.reuse_pretrained or ctx.resume) and _pretrained_as(out) == marker
                and (out / "model" / "config.json").is_file()):
            model, seconds = load(out / "model"), "reused"
            ctx.log(f"{task.name}: reusing {out / 'model'}")
        else:
            model, seconds = _pretrain(ctx, task.name, config, cells[unlabelled], out, marker)
        extra = {"pretrain_s": seconds, "pretrain_epochs": config.train.max_epochs}
        identity = {"pretrained": what, "weights": _weights_digest(out / "model")}
        linear = _finetune_config(recipe, p, "linear", device, ctx.seed)
        entries.append(Entry(
            name=f"sslcell {recipe.name} + linear probe", sslcell=True, candidates=[("linear probe", linear)],
            fit=lambda cfg, rows, model=model: finetune(cells[rows], model, p.label_key, cfg, device=device),
            score=score, extra=extra, identity=identity))
        if recipe.name in p.probe_only:
            continue
        candidates = _finetune_grid(recipe, p, device, ctx.seed)
        entries.append(Entry(
            name=f"sslcell {recipe.name} + fine-tune", sslcell=True, candidates=candidates,
            fit=lambda cfg, rows, model=model: finetune(cells[rows], model, p.label_key, cfg, device=device),
            score=score, extra={**extra, "min_steps": candidates[0][1].min_steps}, identity=identity))
    return entries


def _pretrain(ctx: Context, task: str, config: Any, crops: Any, out: Path, what: dict) -> tuple[Any, int | str]:
    """Pretrain ``config`` on ``crops`` into ``out``, marked unfinished (``what``: :func:`_pretraining` and the data's
    content, in PRETRAINING_AS) until its model is saved: with ``--resume`` an unfinished pretraining of the same
    recipe and crops goes on from its last checkpoint. Returns the model and its seconds (in this run: "N s after
    resuming" when resumed)."""
    from sslcell.train import LAST, _clear_run, pretrain

    t0 = time.perf_counter()
    unfinished = out / PRETRAINING_AS
    if ctx.resume and _pretrained_as(out, PRETRAINING_AS) == what and (out / "checkpoints" / LAST).is_file():
        ctx.log(f"{task}: resuming the unfinished pretraining in {out}")
        model = pretrain(config, crops, out, resume=True)
        seconds: int | str = f"{round(time.perf_counter() - t0)} s after resuming"
    else:
        ctx.log(f"{task}: pretraining {out.name} on {len(crops)} crops")
        (out / PRETRAINED_AS).unlink(missing_ok=True)  # the model there is about to be replaced: never reuse it
        _clear_run(out)  # nor resume another run's checkpoint under this run's marker
        out.mkdir(parents=True, exist_ok=True)
        unfinished.write_text(json.dumps(what))
        model = pretrain(config, crops, out, overwrite=True)
        seconds = round(time.perf_counter() - t0)
    (out / PRETRAINED_AS).write_text(json.dumps(what))
    unfinished.unlink()
    return model, seconds


def _weights_digest(model_dir: Path) -> str:
    """SHA-256 of a saved model's weights files: the pretrained weights every fit of a recipe starts from."""
    return _file_sha256(*sorted(model_dir.glob("*.safetensors")))


PRETRAINED_AS = "pretrained_as.json"  # beside a recipe's model in --workdir: what it was pretrained on, and how
PRETRAINING_AS = "pretraining_as.json"  # the same, while the pretraining has not finished


def _pretraining(config: Any, data: Any, channels: list[str], rows: np.ndarray) -> dict[str, Any]:
    """What decides a pretrained model: the recipe (overrides applied), the data file, its channels and the crops'
    rows (``(n,)`` indices into the labelled crops)."""
    return {"recipe": config.to_dict(), "data": str(Path(data).resolve()), "channels": list(channels),
            "rows": len(rows), "rows_sha256": _digest(rows)}


def _pretrained_as(out: Any, name: str = PRETRAINED_AS) -> dict[str, Any] | None:
    """What the model in ``out`` was pretrained on (:func:`_pretraining`; ``name``: PRETRAINING_AS for an
    unfinished one), None if unknown: it is not reused."""
    try:
        what = json.loads((out / name).read_text())
        what["data"] = str(Path(what["data"]).resolve())  # the same file reached from another folder is the same
        return what
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _finetune_config(recipe: Any, p: CropClassificationParams, head: str, device: torch.device,
                     seed: int = 0) -> Any:
    """The recipe's ``finetune`` settings (FinetuneConfig's defaults where it has none) for ``head``, trained with
    the suite's ``seed`` unless they set their own; MixUp / CutMix only for ``head="full"``."""
    from sslcell.classify import FinetuneConfig

    values = {"seed": seed, **(recipe.finetune or {}), "head": head, "progress_bar": False,
              "accelerator": _accelerator(device)}
    if head != "full":  # the probe of a recipe that fine-tunes with blended crops: blending is for fine-tuning only
        values.update(mixup=0.0, cutmix=0.0)
    if p.finetune_epochs is not None:
        values["epochs"] = p.finetune_epochs
    if p.finetune_min_steps is not None:
        values["min_steps"] = p.finetune_min_steps
    return FinetuneConfig.from_dict(values)


def _finetune_grid(recipe: Any, p: CropClassificationParams, device: torch.device,
                   seed: int = 0) -> list[tuple[str, Any]]:
    """The recipe's fine-tuning candidates, ``(label, FinetuneConfig)``: ``finetune_epoch_grid`` x
    ``finetune_init_heads`` x ``finetune_lrs`` x ``encoder_lr_factors`` x ``layer_decays``, each the recipe's own
    where empty; the label names the grid's axes (the encoder rate always)."""
    from sslcell.classify import FinetuneConfig

    full = _finetune_config(recipe, p, "full", device, seed)
    lrs = p.finetune_lrs or [full.lr]
    factors = p.encoder_lr_factors or [full.encoder_lr_factor]
    heads = p.finetune_init_heads or [full.init_head]
    epochs = p.finetune_epoch_grid or [full.epochs]
    decays = p.layer_decays or [full.layer_decay]
    return [((f"lr {lr:g}, " if p.finetune_lrs else "") + f"encoder lr x{f:g}"
             + (f", layer decay {d:g}" if p.layer_decays else "") + f", {e} epochs"
             + (f", {h} head" if p.finetune_init_heads else ""),
             FinetuneConfig.from_dict({**_asdict(full), "lr": lr, "encoder_lr_factor": f, "layer_decay": d,
                                       "init_head": h, "epochs": e}))
            for e in epochs for h in heads for lr in lrs for f in factors for d in decays]


# FinetuneConfig fields added after trainings were stored in benchmarks/store: left out of a setting at their
# default (the value every stored training had), so adding a field keeps the stored trainings' keys
_LATER_FIELDS = {"mixup": 0.0, "cutmix": 0.0}


def _asdict(setting: Any) -> Any:
    """A dataclass's fields as a dict (a candidate setting as data, the fields of :data:`_LATER_FIELDS` left out at
    their default); anything else as it is."""
    if not dataclasses.is_dataclass(setting):
        return setting
    return {name: value for name, value in dataclasses.asdict(setting).items()
            if name not in _LATER_FIELDS or value != _LATER_FIELDS[name]}


# ---------------------------------------------------------------------------------------------- protocol
def _evaluate(entry: Entry, labelled: Labelled, test: np.ndarray, tta: bool, store: FitStore,
              run_of: dict[str, Any], repeat_seeds: int = 0) -> tuple[list, list, dict]:
    """Every candidate trained on ``labelled.fit`` and scored on ``labelled.val``; the best (validation macro-F1,
    plain or with TTA) trained on all labelled crops and scored on ``test``, and ``repeat_seeds`` more times with
    the training seeds after its own where the setting has one (rows gain ``seeds``, ``accuracy_seeds``,
    ``macro_f1_seeds``). Each training's scores go to ``store`` (read back instead of training when resuming;
    ``run_of``: what else decides them). Returns the table rows, the grid rows and the test reports keyed by
    ``(row entry, labels)``."""
    variants = (False, True) if tta and entry.tta else (False,)

    def trained(label: str, setting: Any, fit: np.ndarray, scored: np.ndarray, what: str) -> dict[str, Any]:
        """``{"seconds", "epochs", "reports": {variant: report dict}}`` of ``setting`` trained on ``fit``."""
        key = store.key(**run_of, entry=entry.name, identity=entry.identity, setting=_asdict(setting),
                        fit=_digest(fit), scored=_digest(scored), variants=variants)
        done = store.get(key, f"{entry.name}, {label}, {labelled.name} labels, {what}")
        if done is None:
            t0 = time.perf_counter()
            model = entry.fit(setting, fit)
            seconds = time.perf_counter() - t0
            done = {"seconds": seconds, "epochs": getattr(model, "info", {}).get("epochs"),  # raised to min_steps
                    "reports": {str(v): entry.score(model, scored, v).to_dict() for v in variants}}
            store.put(key, done)
        return done

    val: dict[tuple[str, bool], Any] = {}
    for label, setting in entry.candidates:
        done = trained(label, setting, labelled.fit, labelled.val, "validation")
        for v in variants:
            val[label, v] = ClassificationReport.from_dict(done["reports"][str(v)])
    best = {label: max(val[label, v].macro_f1 for v in variants) for label, _ in entry.candidates}
    chosen, setting = max(entry.candidates, key=lambda c: best[c[0]])  # the first of equals
    done = trained(chosen, setting, labelled.rows, test, "test")
    seconds, epochs = done["seconds"], done["epochs"]
    seeded = dataclasses.is_dataclass(setting) and "seed" in {f.name for f in dataclasses.fields(setting)}
    seeds = [setting.seed + i for i in range(repeat_seeds + 1)] if seeded and repeat_seeds else []
    again = [trained(chosen, dataclasses.replace(setting, seed=s), labelled.rows, test, f"test, training seed {s}")
             for s in seeds[1:]]
    rows, reports = [], {}
    for v in variants:
        report = ClassificationReport.from_dict(done["reports"][str(v)])
        repeated = {}
        if seeds:
            runs = [report, *(ClassificationReport.from_dict(d["reports"][str(v)]) for d in again)]
            repeated = {"seeds": seeds, "accuracy_seeds": [r.accuracy for r in runs],
                        "macro_f1_seeds": [r.macro_f1 for r in runs]}
        name = entry.name + (" + TTA" if v else "")
        reports[name, labelled.name] = report
        rows.append({"entry": name, "family": "sslcell" if entry.sslcell else "baseline", "labels": labelled.name,
                     "setting": chosen, "val_accuracy": val[chosen, v].accuracy,
                     "val_macro_f1": val[chosen, v].macro_f1, "accuracy": report.accuracy, "macro_f1": report.macro_f1,
                     "balanced_accuracy": report.balanced_accuracy, "macro_roc_auc": report.macro_roc_auc,
                     "train_s": round(seconds, 1), **({"epochs": epochs} if epochs is not None else {}),
                     **entry.extra, **repeated})
    grid = [{"entry": entry.name, "labels": labelled.name, "setting": label,
             "val_accuracy": val[label, False].accuracy, "val_macro_f1": val[label, False].macro_f1,
             "val_macro_f1_tta": val[label, True].macro_f1 if True in variants else math.nan,
             "chosen": "yes" if label == chosen else ""} for label, _ in entry.candidates]
    return rows, grid, reports


def _best(rows: list[dict], family: str, labels: str, prefix: str = "") -> dict | None:
    """The row of ``family`` at ``labels`` with the best validation macro-F1 (entries starting with ``prefix``)."""
    pool = [r for r in rows if r["family"] == family and r["labels"] == labels and r["entry"].startswith(prefix)]
    return max(pool, key=lambda r: r["val_macro_f1"], default=None)


# ------------------------------------------------------------------------------------------------- results
COLUMNS = ["entry", "labels", "setting", "val acc.", "val macro-F1", "accuracy", "macro-F1", "balanced acc.",
           "ROC-AUC", "train s"]


def _result(task: Any, ctx: Context, cells: Any, y: np.ndarray, groups: np.ndarray | None, train: np.ndarray,
            test: np.ndarray, fractions: list[Labelled], rows: list[dict], grid: list[dict],
            reports: dict) -> TaskResult:
    from sslcell import pl

    tables, targets, notes, plots = [], [], [], []
    for labelled in fractions:
        part = sorted((r for r in rows if r["labels"] == labelled.name), key=lambda r: -r["macro_f1"])
        tables.append(Table(
            f"{task.name}: {labelled.name} of the training labels ({len(labelled.rows)} crops), test split "
            f"({len(test)} crops)", COLUMNS,
            [{"entry": r["entry"], "labels": r["labels"], "setting": r["setting"], "val acc.": r["val_accuracy"],
              "val macro-F1": r["val_macro_f1"], "accuracy": r["accuracy"], "macro-F1": r["macro_f1"],
              "balanced acc.": r["balanced_accuracy"], "ROC-AUC": r["macro_roc_auc"], "train s": r["train_s"]}
             for r in part]))
        ours, cnn = _best(rows, "sslcell", labelled.name), _best(rows, "baseline", labelled.name, "supervised CNN")
        if ours is None or cnn is None:
            continue
        for metric, what in (("accuracy", "accuracy"), ("macro_f1", "macro-F1")):
            ratio = ours[metric] / cnn[metric] if cnn[metric] > 0 else math.inf if ours[metric] > 0 else math.nan
            targets.append(Target(f"{labelled.name} labels: best sslcell entry / supervised CNN, test {what}",
                                  ratio, 1.0, unit="x"))
        verdict = ("matches or beats" if ours["accuracy"] >= cnn["accuracy"] and ours["macro_f1"] >= cnn["macro_f1"]
                   else "loses to")
        notes.append(f"With {labelled.name} of the labels the sslcell entry chosen on validation ({ours['entry']}, "
                     f"{ours['setting']}) {verdict} the supervised CNN chosen the same way ({cnn['entry']}, "
                     f"{cnn['setting']}): test accuracy {ours['accuracy']:.3f} vs {cnn['accuracy']:.3f}, macro-F1 "
                     f"{ours['macro_f1']:.3f} vs {cnn['macro_f1']:.3f}.")
        if "seeds" in ours and "seeds" in cnn:
            notes.append(f"Over {len(ours['seeds'])} training seeds ({labelled.name} labels; the targets use the "
                         f"first): test accuracy {_spread(ours['accuracy_seeds'])} vs "
                         f"{_spread(cnn['accuracy_seeds'])}, macro-F1 {_spread(ours['macro_f1_seeds'])} vs "
                         f"{_spread(cnn['macro_f1_seeds'])} (mean ± sample std).")
    repeated = [r for r in rows if "seeds" in r]
    if repeated:
        tables.append(Table(
            f"{task.name}: test scores over training seeds (the chosen setting trained again on all labelled crops; "
            "the split stays the suite seed's)",
            ["entry", "labels", "seeds", "accuracy", "macro-F1", "accuracy per seed", "macro-F1 per seed"],
            [{"entry": r["entry"], "labels": r["labels"], "seeds": ", ".join(map(str, r["seeds"])),
              "accuracy": _spread(r["accuracy_seeds"]), "macro-F1": _spread(r["macro_f1_seeds"]),
              "accuracy per seed": " / ".join(f"{a:.3f}" for a in r["accuracy_seeds"]),
              "macro-F1 per seed": " / ".join(f"{f:.3f}" for f in r["macro_f1_seeds"])}
             for r in sorted(repeated, key=lambda r: (-float(r["labels"].rstrip("%")),
                                                      -float(np.mean(r["macro_f1_seeds"]))))],
            note="mean ± sample standard deviation over the training seeds; entries without a training seed (the "
                 "raw-pixel PCA's logistic regression is deterministic) are not repeated."))
    tables.append(Table(f"{task.name}: every candidate setting on the validation split", [
        "entry", "labels", "setting", "val acc.", "val macro-F1", "val macro-F1 + TTA", "chosen"],
        [{"entry": g["entry"], "labels": g["labels"], "setting": g["setting"], "val acc.": g["val_accuracy"],
          "val macro-F1": g["val_macro_f1"], "val macro-F1 + TTA": g["val_macro_f1_tta"], "chosen": g["chosen"]}
         for g in grid],
        note="Each candidate trained on the labelled crops outside the validation split; the chosen one was trained "
             "again on all labelled crops for the tables above."))
    full = fractions[0].name
    best = _best(rows, "sslcell", full) or max((r for r in rows if r["labels"] == full),
                                                key=lambda r: r["val_macro_f1"], default=None)
    if best is not None:
        report = reports[best["entry"], full]
        name = f"{ctx.prefix}_confusion.png"
        pl.confusion_matrix(report, path=ctx.out_dir / name, title=f"{task.name}: {best['entry']} (test split)")
        plots.append(name)
        per_class = "\n".join(line for line in report.to_markdown().splitlines() if not line.startswith("#"))
        notes.append(f"Per-class test scores of {best['entry']} ({full} labels, chosen on validation):\n{per_class}")
    notes.insert(0, _protocol_note(task, cells, y, groups, train, test, fractions, rows))
    raw = {"rows": rows, "grid": grid, "n_cells": len(cells), "n_train": len(train), "n_test": len(test),
           "labelled": {f.name: {"n": len(f.rows), "fit": len(f.fit), "val": len(f.val)} for f in fractions},
           "classes": {str(c): int(n) for c, n in zip(*np.unique(y, return_counts=True), strict=True)},
           "recipes": {r.name: {"source": r.source, "finetune": r.finetune} for r in task.recipes}}
    return TaskResult(tables=tables, targets=targets, plots=plots, notes=notes, raw=raw)


def _spread(values: list[float]) -> str:
    """``mean ± sample std`` of ``values``, 3 decimals."""
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.3f}"


def _protocol_note(task: Any, cells: Any, y: np.ndarray, groups: np.ndarray | None, train: np.ndarray,
                   test: np.ndarray, fractions: list[Labelled], rows: list[dict]) -> str:
    p: CropClassificationParams = task.params
    split = (f"by {p.group_key} (GroupShuffleSplit, test_size {p.test_size}; {len(np.unique(groups[test]))} of "
             f"{len(np.unique(groups))} groups in test)" if groups is not None
             else f"stratified (train_test_split, test_size {p.test_size})")
    labelled = "; ".join(f"{f.name}: {len(f.rows)} crops, {len(f.fit)} fit + {len(f.val)} validation"
                         for f in fractions)
    pretrained = {r["entry"].split(" + ")[0]: (r.get("pretrain_s"), r.get("pretrain_epochs")) for r in rows
                  if r["family"] == "sslcell"}
    lines = [
        f"Data: `{task.path.name}`, channels {cells.channel_names}, {len(cells)} crops, {len(np.unique(y))} classes"
        f"{f' (subsampled to max_cells={p.max_cells})' if p.max_cells == len(cells) else ''}. Test split {split}, "
        "seed from the "
        f"suite: train {len(train)}, test {len(test)}. Labelled training crops per fraction ({labelled}); the "
        f"validation split is {'by group' if groups is not None else 'stratified'} inside the labelled crops.",
        "Every entry's setting was chosen on the validation split (best macro-F1, plain or with TTA), then trained "
        "again on all labelled crops; the test split was scored once per entry. `train s`: that last training, "
        "seconds. Rows \"+ TTA\": the same model, probabilities averaged over the 8 flips and 90-degree turns.",
    ]
    if pretrained:
        crops = "the training crops" if p.pretrain_crops == "train" else "all crops, test crops included (transductive)"
        lines.append("Pretraining on " + crops + ", without labels: " + ", ".join(
            f"{name} {epochs} epochs ({seconds if isinstance(seconds, str) else f'{seconds} s'})"
            for name, (seconds, epochs) in pretrained.items()) + ".")
    if "supervised_cnn" in task.baselines:
        steps = max((r["min_steps"] for r in rows if r["entry"].startswith("supervised CNN")), default=0)
        floor = f", at least {steps} optimiser steps (epochs raised where labels are few)" if steps else ""
        lines.append(f"Supervised CNN: 3 blocks of two 3x3 conv-BN-ReLU + max-pool, widths {p.cnn_widths}, AdamW "
                     f"(weight decay 0.01), one-cycle to the chosen lr, balanced class-weighted cross-entropy, flips "
                     f"and 90-degree turns, batch {p.cnn_batch_size}, dropout 0.2{floor}; grid lr {p.cnn_lrs} x "
                     f"epochs {p.cnn_epochs}; trained by the same loop as the sslcell fine-tuning "
                     f"(`classify.train_from_scratch`, batch-norm statistics re-estimated at the end). Issue 14's "
                     f"reference for this recipe (30 epochs, lr 3e-3): accuracy 0.840 / macro-F1 0.827 on Chula "
                     f"split by smear, 0.763 / 0.652 on Jurkat.")
    return "\n\n".join(lines)


register(TaskKind(
    name="crop_classification",
    params=CropClassificationParams,
    run=run,
    summary="cell type / fate from crops: sslcell pretraining + linear probe and fine-tuning vs raw-pixel PCA, a "
            "random encoder and a supervised CNN, settings chosen on a validation split, one fixed test split",
    baselines=BASELINES,
    needs_data=True,
    check_task=check_task,
    takes_recipes=True,
    modality="image",
    quick={"max_cells": 240, "pretrain_epochs": 1, "finetune_epochs": 1, "finetune_min_steps": 0,
           "finetune_lrs": [], "encoder_lr_factors": [], "finetune_epoch_grid": [], "pca_class_weights": [0.0],
           "cnn_lrs": [3e-3], "cnn_epochs": [1], "tta": False},
))
