"""Task kind ``cell_cycle``: cell-cycle reconstruction quality (issue 12), on crops with phase labels (Jurkat) and on
simulated expression with a known continuous phase (formerly ``benchmarks/bench_cell_cycle.py``).

**Crops** (``source: crops``; Jurkat, ``jurkat_cellcycle_ifc_mlcp.npz``): a stratified split on ``obs[phase_key]``
(``test_size``, ``random_state=seed``; the phase labels are used for the split and for scoring only). Every network
sees ``channels`` (Jurkat: 0 and 2, brightfield and darkfield); ``marker_channel`` (1, the DNA stain) only makes
pseudo-labels: ``n_bins`` quantile bins of its integrated intensity, edges from the training crops. Entries, all
fitted on the training crops and scored on the held-out ones:

* baselines: ``random_angle``; ``pixel_pca`` (the angle of the circle fitted in the first two PCs of z-scored
  pixels, PCA fitted on the training crops);
* per recipe ``<r>``: the self-supervised embedding alone (pretrained on the training crops without labels, a circle
  fitted in its principal plane, anchored by the pseudo-phases; no pseudo-label trains anything), and
  ``<r>+deepcycle``, the DeepCycle recipe (:func:`sslcell.cellcycle.recipe.fit_recipe`): the encoder fine-tuned on
  the pseudo-phases with the recipe's ``finetune`` settings, θ on the phase wheel of its class log-probabilities;
* baseline ``random_encoder+deepcycle``: the same recipe from the first recipe's architecture with random weights
  (a supervised CNN from scratch, same budget and settings).

Scores: the Spearman correlation of θ with the true phase ``order`` (G1→S→G2→prophase→metaphase→anaphase→telophase)
after choosing origin and direction optimally on the scored cells (:func:`~sslcell.evaluate.cyclic_spearman`; said
wherever reported), the recipe classifier's pseudo-phase accuracy, the pseudo-phase arc accuracy and the closure.

*Single-phase acquisitions.* Each DeepCycle recipe is saved and loaded back (``CycleRecipe.save`` / ``load``), and the
held-out crops of one acquisition group of true phases (``acquisitions``: G1, S, G2, M = prophase to telophase), and
only those, are placed by it as an acquisition of their own (``CycleRecipe.apply``). The groups' arcs on the recipe's
circle come from the *training* crops and their labels (``CycleFit.reanchored``: same circle, arcs as wide as the
groups' shares); reported: the share of each acquisition's θ in its group's arc (chance: the arc's share of the
circle), the arcs holding its circular mean θ and most of its crops, whether θ is the same as when those crops are
placed among all held-out crops, and what a circle fitted to the acquisition alone gives.

**Synthetic expression** (``source: synthetic_expression``; ``make_expression``, ``n_cells`` x ``n_genes``,
``n_cell_types``, seed): θ against the simulated continuous phase, per cycle programme (``programmes``):
``whitfield`` (opt-in in the generator: five phase gene groups, MG1 / G1S / S / G2 / G2M, with cosine profiles, so
the phase is identifiable all round) and ``s_g2m`` (the generator's default: S and G2M genes only, nothing marks
mid-G1). Entries, each anchored by its own pseudo-phases (no true label):

* baselines: ``cycle_gene_pca``, the cycle-gene PCA on the S and G2M genes (as ``tl.cell_cycle_pca``) and, for
  ``whitfield``, ``cycle_gene_pca_all`` on all cycle genes; ``phase_set_scores`` (``whitfield``): the five phase-set
  z-scores of ``score_phase_sets`` themselves (Revelio-style, no network);
* per recipe ``<r>`` (pretrained on all genes without labels): its embedding alone; ``<r>+deepcycle_s_g2m``, the
  DeepCycle recipe for expression (a head on the frozen encoder, the recipe's ``finetune`` settings, learns
  pseudo-phases; θ on the phase wheel of its class log-probabilities) on the S / G2M gene-score calls (3 phases);
  ``<r>+deepcycle_phase_sets`` (``whitfield``) on the five phase-set calls; ``<r>_cycle_genes``, the recipe pretrained
  on the cycle genes only (as tricycle restricts its PCA), its embedding alone, and (``whitfield``)
  ``<r>_cycle_genes+deepcycle_phase_sets``.

Scores: :func:`sslcell.evaluate.circular_correlation` (Jammalamadaka and SenGupta's coefficient around each angle's
sample mean direction) and the same coefficient in its form for uniformly distributed angles (``uniform=True``); the
simulated phase is uniform, so its sample mean direction is noise and the first can swing between -1 and 1 for the
same θ: the uniform form is the one to read.

**Targets** (issue 12, item 6): crops, the aligned Spearman of ``target_entry`` (default: the first recipe's
DeepCycle entry) >= 0.85; expression, the uniform-form circular correlation of ``target_entry`` (default: the first
recipe's cycle-gene embedding) on ``target_programme`` (default: the first programme) >= 0.9. The suite fixes the
entry before the run.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from sslcell.benchmark.registry import Context, Table, Target, TaskKind, TaskResult, register
from sslcell.benchmark.tasks._preflight import check_crops
from sslcell.benchmark.tasks.expression_celltype import (
    embed_device,
    pretrain_recipe,
    random_encoder,
    stratified_subsample,
)
from sslcell.errors import ConfigError, InputError

JURKAT_ORDER = ["G1", "S", "G2", "Prophase", "Metaphase", "Anaphase", "Telophase"]
WHITFIELD = ["MG1", "G1S", "S", "G2", "G2M"]
PROGRAMMES = ("whitfield", "s_g2m")
CROP_BASELINES = ("random_angle", "pixel_pca", "random_encoder")
EXPRESSION_BASELINES = ("cycle_gene_pca", "phase_set_scores")
# the recipes' fine-tuning when the suite gives none: bench_cell_cycle's settings
FINETUNE = {"crops": {"head": "full", "epochs": 30, "encoder_lr_factor": 1.0},
            "synthetic_expression": {"head": "mlp", "epochs": 100}}
GOALS = {"crops": 0.85, "synthetic_expression": 0.9}  # issue 12, item 6
MODALITY = {"crops": "image", "synthetic_expression": "expression"}


@dataclass
class CellCycleParams:
    source: Literal["crops", "synthetic_expression"] = "crops"
    pretrain_epochs: int | None = None  # overrides every recipe's train.max_epochs
    finetune_epochs: int | None = None  # overrides the epochs of every recipe's classifier (``finetune``)
    target_entry: str | None = None  # the entry checked against the goal (None: module doc)
    # crops
    phase_key: str = "label"  # obs column of the true phases (split and scoring only)
    order: list[str] = field(default_factory=lambda: list(JURKAT_ORDER))  # the true phases in cycle order
    acquisitions: dict[str, list[str]] = field(default_factory=lambda: {
        "G1": ["G1"], "S": ["S"], "G2": ["G2"], "M": JURKAT_ORDER[3:]})  # single-phase groups of true phases
    channels: list[int | str] = field(default_factory=lambda: [0, 2])  # what every network sees
    marker_channel: int | str = 1  # makes the pseudo-phases only
    n_bins: int = 4  # quantile bins of the marker's integrated intensity
    test_size: float = 0.2
    max_cells: int | None = None  # a stratified subsample first (smoke runs); None: all crops
    # synthetic expression
    programmes: list[str] = field(default_factory=lambda: list(PROGRAMMES))
    target_programme: str | None = None  # None: the first of programmes
    n_cells: int = 3000
    n_genes: int = 1000
    n_cell_types: int = 6

    def check(self) -> None:
        for name in ("pretrain_epochs", "finetune_epochs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1 or null, got {getattr(self, name)}")
        if len(set(self.order)) != len(self.order) or len(self.order) < 2:
            raise ConfigError(f"order: give at least two distinct phases, got {self.order}")
        grouped = [p for phases in self.acquisitions.values() for p in phases]
        if not all(isinstance(p, str) for p in grouped) or len(set(grouped)) != len(grouped):
            raise ConfigError(f"acquisitions: each true phase may be in one group only, got {self.acquisitions}")
        if set(grouped) - set(self.order):
            raise ConfigError(f"acquisitions: phases {sorted(set(grouped) - set(self.order))} are not in order")
        if not self.channels:
            raise ConfigError("channels: name the label-free channels every network sees")
        if self.marker_channel in self.channels:
            raise ConfigError(f"marker_channel: {self.marker_channel!r} is among channels; the marker must not be "
                              "seen by the networks")
        if self.n_bins < 2:
            raise ConfigError(f"n_bins: must be >= 2, got {self.n_bins}")
        if not 0.0 < self.test_size < 1.0:
            raise ConfigError(f"test_size: must be in (0, 1), got {self.test_size}")
        if self.max_cells is not None and self.max_cells < 50:
            raise ConfigError(f"max_cells: must be >= 50 or null, got {self.max_cells}")
        if not self.programmes or set(self.programmes) - set(PROGRAMMES):
            raise ConfigError(f"programmes: choose from {list(PROGRAMMES)}, got {self.programmes}")
        if self.target_programme is not None and self.target_programme not in self.programmes:
            raise ConfigError(f"target_programme: {self.target_programme!r} is not among programmes "
                              f"{self.programmes}")
        if self.n_cells < 100 or self.n_genes < 100 or self.n_cell_types < 1:
            raise ConfigError("n_cells: must be >= 100 (n_genes >= 100, n_cell_types >= 1)")


def planned_entries(source: str, recipes: list[str], baselines: list[str], programme: str = "s_g2m") -> list[str]:
    """The entries a task makes, in the order it makes them (per ``programme`` for expression): the names that
    ``target_entry`` may take."""
    if source == "crops":
        out = [b for b in ("random_angle", "pixel_pca") if b in baselines]
        out += [e for r in recipes for e in (r, f"{r}+deepcycle")]
        return out + (["random_encoder+deepcycle"] if "random_encoder" in baselines and recipes else [])
    whitfield = programme == "whitfield"
    out = []
    if "cycle_gene_pca" in baselines:
        out += ["cycle_gene_pca", "cycle_gene_pca_all"] if whitfield else ["cycle_gene_pca"]
    if whitfield and "phase_set_scores" in baselines:
        out.append("phase_set_scores")
    for r in recipes:
        out += [r, f"{r}+deepcycle_s_g2m"] + ([f"{r}+deepcycle_phase_sets"] if whitfield else [])
        out += [f"{r}_cycle_genes"] + ([f"{r}_cycle_genes+deepcycle_phase_sets"] if whitfield else [])
    return out


def check_task(task: Any) -> None:
    """What a cell-cycle task's fields must agree on (run at load time, and again by :func:`run`)."""
    p: CellCycleParams = task.params
    allowed = CROP_BASELINES if p.source == "crops" else EXPRESSION_BASELINES
    for i, name in enumerate(task.baselines):
        if name not in allowed:
            raise ConfigError(f"baselines[{i}]: {name!r} is not a baseline of source {p.source}; known: {allowed}")
    for i, recipe in enumerate(task.recipes):
        if recipe.config.modality != MODALITY[p.source]:
            raise ConfigError(f"recipes[{i}]: {recipe.name!r} is a recipe for {recipe.config.modality} data; source "
                              f"{p.source} takes {MODALITY[p.source]} recipes")
    if p.source == "crops" and "data" not in task.data:
        raise ConfigError("data: source crops reads crops with phase labels (data: <file.npz>)")
    for programme in ("s_g2m", "whitfield"):  # entries key the rows and scores: two of one name would merge
        planned = planned_entries(p.source, [r.name for r in task.recipes], task.baselines, programme)
        twice = sorted({e for e in planned if planned.count(e) > 1})
        if twice:
            raise ConfigError(f"recipes: the entry {twice[0]!r} would be made twice (a recipe's name is another "
                              f"entry's); rename the recipe. This task's entries: {planned}")
    _target_entry(task, "" if p.source == "crops" else p.target_programme or p.programmes[0])
    if p.source == "crops":
        check_crops(task.path, {"phase_key": p.phase_key}, p.channels, marker_channel=p.marker_channel)


def run(task: Any, ctx: Context) -> TaskResult:
    check_task(task)
    p: CellCycleParams = task.params
    return (_run_crops if p.source == "crops" else _run_expression)(task, ctx)


def _target_entry(task: Any, programme: str) -> str | None:
    """The entry checked against the goal, validated against what the task makes (before anything trains)."""
    p: CellCycleParams = task.params
    names = [r.name for r in task.recipes]
    planned = planned_entries(p.source, names, task.baselines, programme)
    if p.target_entry is None:
        if not names:
            return None
        return f"{names[0]}+deepcycle" if p.source == "crops" else f"{names[0]}_cycle_genes"
    if p.target_entry not in planned:
        raise ConfigError(f"params.target_entry: {p.target_entry!r} is not an entry of this task"
                          f"{f' (programme {programme})' if p.source != 'crops' else ''}; its entries: {planned}")
    return p.target_entry


def _finetune_config(recipe: Any, p: CellCycleParams, ctx: Context) -> Any:
    """The recipe's classifier settings (its ``finetune``, else :data:`FINETUNE`), seeded, quiet, on the device."""
    from sslcell.classify import FinetuneConfig

    values = dict(recipe.finetune if recipe.finetune is not None else FINETUNE[p.source])
    values = {"seed": ctx.seed, **values, "progress_bar": False, "accelerator": ctx.device}
    if p.finetune_epochs is not None:
        values["epochs"] = p.finetune_epochs
    return FinetuneConfig.from_dict(values)


# ---------------------------------------------------------------------------------------------------------- crops
def _run_crops(task: Any, ctx: Context) -> TaskResult:
    import pandas as pd
    from sklearn.model_selection import train_test_split

    import sslcell
    from sslcell.cellcycle import fit_cycle
    from sslcell.cellcycle.recipe import CycleRecipe, fit_recipe, marker_intensity
    from sslcell.data.images import CellImages
    from sslcell.evaluate import cyclic_spearman, phase_arc_accuracy
    from sslcell.evaluate.baselines import pixel_pca_baseline

    p: CellCycleParams = task.params
    target = _target_entry(task, "")
    cells = CellImages.read(task.path)
    if p.phase_key not in cells.obs.columns:
        raise InputError(f"{task.path.name}: no obs column {p.phase_key!r} (params.phase_key); columns are "
                         f"{list(cells.obs.columns)}")
    cells = cells[np.flatnonzero(cells.obs[p.phase_key].notna().to_numpy())]
    n_all = len(cells)
    truth = cells.obs[p.phase_key].astype(str).to_numpy()
    if set(truth) - set(p.order):
        raise InputError(f"{task.path.name}: phases {sorted(set(truth) - set(p.order))} of obs[{p.phase_key!r}] "
                         f"are not in params.order {p.order}")
    if p.max_cells is not None and p.max_cells < len(cells):  # smoke runs: at least 2 crops of every phase
        cells = cells[stratified_subsample(truth, p.max_cells, ctx.seed, min_per_class=2)]
        truth = cells.obs[p.phase_key].astype(str).to_numpy()
    train, test = train_test_split(np.arange(len(cells)), test_size=p.test_size, stratify=truth,
                                   random_state=ctx.seed)
    train, test = np.sort(train), np.sort(test)
    marker = marker_intensity(cells, p.marker_channel)
    bins = [f"bin{i + 1}" for i in range(p.n_bins)]  # fit_recipe's quantile bins, edges from the training crops
    edges = np.quantile(marker[train], np.linspace(0, 1, p.n_bins + 1)[1:-1])
    pseudo = np.asarray(bins, dtype=object)[np.searchsorted(edges, marker, side="right")]
    free = cells.select_channels(p.channels)
    ctx.log(f"{task.name}: {len(cells)} crops, train {len(train)}, test {len(test)}")
    rows: list[dict[str, Any]] = []

    def add(entry: str, what: str, theta: np.ndarray, fit: Any = None, **extra: Any) -> None:
        rows.append({"entry": entry, "what": what,
                     "aligned Spearman": cyclic_spearman(theta, truth[test], p.order)["spearman"],
                     "closure": fit.closure if fit is not None else None, **extra})

    if "random_angle" in task.baselines:
        add("random_angle", "random angle", np.random.default_rng(ctx.seed).uniform(0, 2 * np.pi, len(test)))
    if "pixel_pca" in task.baselines:
        pixels = pixel_pca_baseline(free, n_comps=2, seed=ctx.seed, fit_rows=train)
        fit = fit_cycle(pixels[train], warn=False)
        add("pixel_pca", "raw-pixel PCA (2 PCs), circle fit", fit.theta(pixels[test]), fit)

    encoders: list[tuple[str, str, Any, Any]] = []  # (entry, what, encoder, recipe spec)
    for recipe in ctx.steps(task.recipes, desc="pretraining"):
        model, seconds = pretrain_recipe(recipe, free[train], ctx, p.pretrain_epochs)
        embedding = sslcell.tl.embed_crops(free, model, device=embed_device(ctx)).obsm["X_sslcell"]
        fit = fit_cycle(embedding[train], pseudo[train], bins, warn=False)
        theta = fit.theta(embedding[test])
        add(recipe.name, f"sslcell {recipe.name} embedding alone, circle fit (no pseudo-label trains anything)",
            theta, fit, **{"pseudo-phase arc accuracy": phase_arc_accuracy(theta, pseudo[test], bins,
                                                                            fit.phase_starts), "seconds": seconds})
        encoders.append((f"{recipe.name}+deepcycle", f"sslcell {recipe.name} + DeepCycle recipe", model, recipe))
    if "random_encoder" in task.baselines and encoders:
        first = task.recipes[0]
        encoders.append(("random_encoder+deepcycle", f"DeepCycle recipe from a random encoder ({first.name}'s "
                         "architecture; supervised from scratch)", random_encoder(encoders[0][2], ctx.seed), first))

    single: list[dict[str, Any]] = []
    plots: list[str] = []
    settings: dict[str, Any] = {}
    for entry, what, encoder, recipe in ctx.steps(encoders, desc="DeepCycle recipes"):
        config = _finetune_config(recipe, p, ctx)
        settings[entry] = config.__dict__
        start = time.perf_counter()
        cycle, _ = fit_recipe(cells[train], encoder, [p.marker_channel], p.channels, config, n_bins=p.n_bins,
                              device=embed_device(ctx))
        seconds = time.perf_counter() - start
        placed = cycle.to_anndata(free[test], device=embed_device(ctx))
        theta, descriptor = placed.obs["cell_cycle_theta"].to_numpy(), placed.obsm["cell_cycle_descriptor"]
        predicted = np.asarray(cycle.classifier.classes)[descriptor.argmax(1)]
        add(entry, what, theta, cycle.fit, **{
            "pseudo-phase accuracy": float(np.mean(predicted == pseudo[test])),
            "pseudo-phase arc accuracy": phase_arc_accuracy(theta, pseudo[test], bins, cycle.fit.phase_starts),
            "seconds": seconds})
        slug = entry.replace("+", "_")
        saved = CycleRecipe.load(cycle.save(ctx.workdir / f"recipe_{slug}", overwrite=True))  # scratch
        single += single_phase(saved, entry, free, train, test, truth, theta, p.acquisitions)
        placed.obs["phase"] = pd.Categorical(truth[test], categories=p.order)
        plots.append(f"{ctx.prefix}_{slug}.png")
        sslcell.pl.cell_cycle(placed, color="phase", path=ctx.out_dir / plots[-1])

    rows.sort(key=lambda r: -r["aligned Spearman"])
    targets = [Target(f"{target}: aligned Spearman (held-out crops; origin and direction chosen on them)",
                      next(r["aligned Spearman"] for r in rows if r["entry"] == target), GOALS["crops"])] \
        if target is not None else []
    subsample = (f", a stratified subsample of {len(cells):,} of {n_all:,} (seed {ctx.seed})"
                 if len(cells) < n_all else "")
    order = "→".join(p.order)
    return TaskResult(
        tables=[
            Table(f"{task.path.name}: held-out {len(test):,} crops (trained on {len(train):,}); inputs: channels "
                  f"{p.channels}", ["entry", "what", "aligned Spearman", "pseudo-phase accuracy",
                                    "pseudo-phase arc accuracy", "closure", "seconds"], rows,
                  note=f"Aligned Spearman: θ against {order}, origin and direction chosen optimally on the scored "
                       "cells. Pseudo-phases: quantile bins of the marker's integrated intensity, edges from the "
                       "training crops. Seconds: pretraining (embedding rows) or the DeepCycle recipe's fine-tuning "
                       "and fit (recipe rows) on this run's hardware."),
            Table("Single-phase acquisitions: held-out crops of one phase group, placed by the saved and loaded "
                  "recipe", ["recipe", "phase", "crops", "θ in the phase's arc", "chance", "mean θ's arc",
                             "most crops' arc", "θ as among all held-out crops", "own fit: closure",
                             "own fit: closure unscaled", "own fit: residual"], single,
                  note="Arcs of the groups on each recipe's circle from the training crops' labels; chance = the "
                       "arc's share of the circle. \"Mean θ's arc\": the arc holding the acquisition's circular "
                       "mean θ; \"most crops' arc\": the arc holding the most of its crops. \"Own fit\": a circle "
                       "fitted to the acquisition alone (`fit_cycle` warns below 0.75 closure / above 0.25 "
                       "residual)."),
        ],
        targets=targets,
        plots=plots,
        notes=[f"Data: `{task.path.name}`, {len(cells):,} crops{subsample}; stratified split on obs['{p.phase_key}'] "
               f"(test {p.test_size:g}, seed {ctx.seed}); phase labels used for the split and scoring only. Networks "
               f"see channels {p.channels}; channel {p.marker_channel!r} makes {p.n_bins} pseudo-phases only. "
               "Recipes pretrained on the training crops without labels (epochs "
               + (f"overridden to {p.pretrain_epochs}" if p.pretrain_epochs else "as in each recipe")
               + "). Plots: each DeepCycle recipe's plane and θ per true phase on the held-out crops."],
        raw={"rows": rows, "single_phase": single, "finetune": settings, "train": int(len(train)),
             "test": int(len(test)), "n_cells_total": n_all},
    )



def single_phase(recipe: Any, entry: str, free: Any, train: np.ndarray, test: np.ndarray, truth: np.ndarray,
                 theta_all: np.ndarray, acquisitions: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Held-out crops of one group of true phases placed by a (loaded) recipe as their own acquisition (module doc);
    ``truth (N,)`` the true phases of all crops, ``theta_all (N_test,)`` θ of the held-out crops placed together.
    Returns a row per group with held-out crops."""
    from sslcell.cellcycle import fit_cycle
    from sslcell.cellcycle.recipe import descriptor_of, wheel

    group_of = {phase: group for group, phases in acquisitions.items() for phase in phases}
    groups = np.asarray([group_of.get(t, "") for t in truth], dtype=object)  # "": in no group
    classes, order = recipe.classifier.classes, recipe.info["order"]
    grouped = train[groups[train] != ""]
    reference = wheel(descriptor_of(recipe.classifier, free[grouped]), classes, order)
    arcs = recipe.fit.reanchored(reference, groups[grouped], list(acquisitions), warn=False)
    widths = np.diff(np.r_[arcs.phase_starts, 2 * np.pi])
    rows = []
    for group, width in zip(acquisitions, widths, strict=True):
        mask = groups[test] == group
        if not mask.any():
            continue
        theta, _, descriptor = recipe.apply(free[test[mask]])
        plane = wheel(descriptor, classes, order)
        placed = arcs.theta(plane)
        mean = float(np.angle(np.mean(np.exp(1j * placed))) % (2 * np.pi))  # the acquisition's circular mean θ
        named, counts = np.unique(arcs.phase(placed), return_counts=True)
        row = {"recipe": entry, "phase": group, "crops": int(mask.sum()),
               "θ in the phase's arc": float(np.mean(arcs.phase(placed) == group)),
               "chance": float(width / (2 * np.pi)),
               "mean θ's arc": str(arcs.phase(np.array([mean]))[0]), "most crops' arc": str(named[counts.argmax()]),
               "θ as among all held-out crops": "same" if np.allclose(theta, theta_all[mask], atol=1e-4)
               else "DIFFERENT"}
        try:
            own = fit_cycle(plane, warn=False)
            row |= {"own fit: closure": own.closure, "own fit: closure unscaled": own.closure_unscaled,
                    "own fit: residual": own.residual}
        except InputError:  # too few crops, or all at one point of the wheel: no circle to fit
            pass
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------- expression
def _run_expression(task: Any, ctx: Context) -> TaskResult:
    p: CellCycleParams = task.params
    programme = p.target_programme or p.programmes[0]
    target = _target_entry(task, programme)
    tables, raw, seconds = [], {}, {}
    for name in ctx.steps(p.programmes, desc="cycle programmes"):
        start = time.perf_counter()
        rows = expression_programme(task, ctx, name)
        seconds[name] = time.perf_counter() - start
        rows.sort(key=lambda r: -r["circular correlation, uniform form"])
        raw[name] = rows
        tables.append(Table(PROGRAMME_TITLES[name], ["entry", "what", "pseudo-phases",
                                                     "circular correlation, uniform form", "circular correlation",
                                                     "closure", "closure unscaled", "residual", "seconds"], rows))
    targets = []
    if target is not None:
        value = next(r["circular correlation, uniform form"] for r in raw[programme] if r["entry"] == target)
        targets.append(Target(f"{programme}: {target}: circular correlation, uniform form", value,
                              GOALS["synthetic_expression"]))
    epochs = f"overridden to {p.pretrain_epochs}" if p.pretrain_epochs else "as in each recipe"
    return TaskResult(
        tables=tables,
        targets=targets,
        notes=[f"Data: `make_expression(n_cells={p.n_cells}, n_genes={p.n_genes}, n_cell_types={p.n_cell_types}, "
               f"seed={ctx.seed}, cycle_programme=...)`; θ against the simulated continuous phase. Every entry is "
               f"anchored by its own pseudo-phases (no true label). Recipes pretrained without labels (epochs "
               f"{epochs}); seconds: pretraining, or fitting the head, on this run's hardware.",
               "Circular correlation: `sslcell.evaluate.circular_correlation` (Jammalamadaka-SenGupta around the "
               "sample mean directions). Uniform form: the same coefficient for a uniformly distributed angle, "
               "R(θ − truth) − R(θ + truth) (`circular_correlation(..., uniform=True)`). The simulated phase is "
               "uniform, so its sample mean direction is noise and the first form can take any sign for a θ that "
               "follows the truth; the uniform form is the one to read."],
        raw={"rows": raw, "seconds": seconds},
    )


PROGRAMME_TITLES = {
    "whitfield": "Cycle programme `whitfield` (five phase gene groups, cosine profiles: the phase is identifiable all "
                 "round)",
    "s_g2m": "Cycle programme `s_g2m` (the generator's default: S and G2M genes only, nothing marks mid-G1)",
}


def expression_programme(task: Any, ctx: Context, programme: str) -> list[dict[str, Any]]:
    """Every entry on data simulated with ``programme`` -> a row per entry (module doc)."""
    import sslcell
    from sslcell.cellcycle import fit_cycle
    from sslcell.cellcycle.expression import PHASE_ORDER, score_phase_sets
    from sslcell.data.synthetic import make_expression, programmes_of
    from sslcell.evaluate import circular_correlation

    p: CellCycleParams = task.params
    adata = make_expression(n_cells=p.n_cells, n_genes=p.n_genes, n_cell_types=p.n_cell_types, seed=ctx.seed,
                            cycle_programme=programme)
    programmes = programmes_of(adata)
    s, g2m = programmes["S"], programmes["G2M"]
    truth = adata.obs["cycle_theta"].to_numpy()
    sslcell.tl.score_cell_cycle(adata, s_genes=s, g2m_genes=g2m)
    anchors = adata.obs["cycle_score_phase"].astype(object).to_numpy()
    rows: list[dict[str, Any]] = []

    def add(entry: str, what: str, x: np.ndarray, labels: np.ndarray, phases: list[str], seconds: float | None = None,
            ) -> None:
        fit = fit_cycle(x, labels, phases, warn=False)
        theta = fit.theta(x)
        rows.append({"entry": entry, "what": what, "pseudo-phases": "S/G2M scores" if phases == PHASE_ORDER
                     else f"{len(phases)} phase sets", "circular correlation": circular_correlation(theta, truth),
                     "circular correlation, uniform form": circular_correlation(theta, truth, uniform=True),
                     "closure": fit.closure, "closure unscaled": fit.closure_unscaled, "residual": fit.residual,
                     "seconds": seconds})

    if "cycle_gene_pca" in task.baselines:
        sslcell.tl.cell_cycle_pca(adata, s_genes=s, g2m_genes=g2m)
        add("cycle_gene_pca", "cycle-gene PCA, S and G2M genes (tricycle-style baseline)",
            adata.obsm["X_cell_cycle_pca"], anchors, PHASE_ORDER)
    sets = set_anchors = None
    if programme == "whitfield":
        sets = {name: programmes[name] for name in WHITFIELD}
        if "cycle_gene_pca" in task.baselines:
            early, late = sets["MG1"] + sets["G1S"] + sets["S"], sets["G2"] + sets["G2M"]  # all cycle genes
            sslcell.tl.cell_cycle_pca(adata, s_genes=early, g2m_genes=late, key_added="X_all_cycle_pca")
            add("cycle_gene_pca_all", "cycle-gene PCA, all cycle genes (tricycle-style baseline)",
                adata.obsm["X_all_cycle_pca"], anchors, PHASE_ORDER)
        calls = score_phase_sets(adata, sets, seed=ctx.seed)
        set_anchors = calls["phase"].astype(object).to_numpy()
        if "phase_set_scores" in task.baselines:
            add("phase_set_scores", "phase-set z-scores, circle fit (Revelio-style, no network)",
                calls[[f"{name}_score" for name in WHITFIELD]].to_numpy(), set_anchors, WHITFIELD)

    genes = [g for name in (WHITFIELD if sets is not None else ["S", "G2M"]) for g in programmes[name]]
    for recipe in task.recipes:
        config = _finetune_config(recipe, p, ctx)
        for data, suffix, what in ((adata, "", f"on all {adata.n_vars:,} genes"),
                                   (adata[:, genes].copy(), "_cycle_genes", f"on the {len(genes)} cycle genes")):
            entry = f"{recipe.name}{suffix}"
            spec = dataclasses.replace(recipe, name=f"{entry}_{programme}")  # its own folder in the workdir
            model, seconds = pretrain_recipe(spec, data, ctx, p.pretrain_epochs)
            embedding = sslcell.tl.embed(data, model, copy=True, device=embed_device(ctx)).obsm["X_sslcell"]
            add(entry, f"sslcell {recipe.name} {what}, embedding alone", embedding, anchors, PHASE_ORDER, seconds)
            heads = [("s_g2m", anchors, PHASE_ORDER, "S/G2M gene-score phases")] if not suffix else []
            if set_anchors is not None:
                heads.append(("phase_sets", set_anchors, WHITFIELD, "5 phase-set calls"))
            for name, labels, phases, calls_what in heads:
                start = time.perf_counter()
                plane = _head_wheel(data, model, labels, phases, config, ctx)
                add(f"{entry}+deepcycle_{name}", f"sslcell {recipe.name} {what} + DeepCycle recipe ({config.head} "
                    f"head on {calls_what})", plane, labels, phases, time.perf_counter() - start)
    return rows


def _head_wheel(adata: Any, model: Any, labels: np.ndarray, phases: list[str], config: Any, ctx: Context) -> Any:
    """The DeepCycle recipe for expression: a head on the frozen encoder (``config``) learns the pseudo-phases
    ``labels (N,)``; -> the phase wheel ``(N, 2)`` of its class log-probabilities, phases in cycle order."""
    import sslcell
    from sslcell.cellcycle.recipe import wheel
    from sslcell.classify import finetune

    classifier = finetune(adata, model, labels, config)
    scored = sslcell.tl.predict(adata, classifier, copy=True)
    return wheel(np.log(np.clip(scored.obsm["sslcell_pred_proba"], 1e-6, None)), classifier.classes, phases)


register(TaskKind(
    name="cell_cycle",
    params=CellCycleParams,
    run=run,
    summary="cell-cycle reconstruction: θ on held-out crops (aligned Spearman vs true phases; DeepCycle recipe, "
            "embedding alone, raw-pixel PCA, random encoder, single-phase acquisitions) or on synthetic expression "
            "(circular correlation vs the simulated phase; cycle-gene PCA, phase-set scores)",
    baselines=CROP_BASELINES + EXPRESSION_BASELINES,
    takes_recipes=True,
    quick={"max_cells": 300, "pretrain_epochs": 1, "finetune_epochs": 1, "n_cells": 300},
    check_task=check_task,
))
