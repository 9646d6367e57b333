"""Kinds ``train_step`` and ``embed_throughput``: the speed of a pretraining step and of embedding, against peers.

``train_step`` (issue 14's speed targets): images/s of a pretraining step on ``size`` px crops, augmentation, data
loading and the host-to-device copy included, for each recipe of the task:

* sslcell: ``sslcell.pretrain`` itself on :class:`~sslcell.data.images.CellImages` of the crops, i.e. its batch loader
  (uint8 batches from ``workers`` DataLoader workers, pinned on CUDA), the recipe's batched augmentation
  (:mod:`sslcell.augment`, run on the model's device: on a GPU the crops are augmented there), its method module and
  Lightning loop at ``precision``. A callback marks the end of every optimiser step.
* peer ``lightly``: lightly's reference loop for the same network and batch
  (:mod:`sslcell.benchmark.tasks._lightly_reference`): its transform on PIL images in ``workers`` DataLoader workers,
  its modules and loss, a plain torch loop with the same optimiser (AdamW, the recipe's rates) and precision.

Both sides train on the same synthetic uint8 RGB crops (:func:`synthetic_crops`), with the same batch, device,
workers and precision. A round builds each side afresh, runs ``warmup`` untimed steps (workers start, kernels load),
then times ``steps`` steps: from the end of step ``warmup`` to the end of step ``warmup + steps``, the device
synchronised at both ends, so every timed step includes its own batch's loading, augmentation and copy. Rounds are
interleaved (lightly, sslcell; then sslcell, lightly; ...) and the target is the median of the per-round ratios,
robust to a shared machine's load. On CUDA, after the timed steps of the last round, ``profile_steps`` more steps
run under ``torch.profiler`` (CUDA activity only): the *GPU busy share* is the union of the intervals in which a
kernel or copy ran on the GPU over those steps' wall time. *Model FLOPs utilisation* is the FLOPs of one training
step (forward and backward, counted by ``torch.utils.flop_counter.FlopCounterMode`` on one batch) times steps/s,
over the GPU's dense bf16 peak (:data:`PEAK_BF16_DENSE`).

``embed_throughput`` (reported, no target): cells/s of ``sslcell.tl.embed`` for each recipe's model (untrained
weights: the speed does not depend on them), crops in memory or an expression ``.h5ad`` in memory and backed,
against a plain torch loop over the same data: a ``DataLoader`` of batches, ``torch.no_grad()``, the model's own
normalisation and encoder, the embeddings copied to the host. Same batch and device, interleaved rounds.

Both kinds measure in a fresh Python process whose environment has ``OMP_WAIT_POLICY=PASSIVE`` (unless the caller
set it), as ``crop_augmentation`` does: on a shared machine OpenMP threads spinning at barriers made a 2-thread
ResNet step 5 to 10 times slower, and the variable only takes effect before torch loads.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import shutil
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sslcell._warn import warn_user
from sslcell.benchmark.registry import Context, Table, Target, TaskKind, TaskResult, register
from sslcell.errors import ConfigError

PRECISIONS = ("auto", "32", "bf16")
SOURCES = ("memory", "backed")
# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s); the first name contained in
# torch.cuda.get_device_name() wins, so more specific names come first.
PEAK_BF16_DENSE = (
    ("H200", 989.4e12), ("H100 NVL", 835.5e12), ("H100 PCIe", 756.5e12), ("H100", 989.4e12),
    ("A100", 312.0e12), ("L40S", 362.05e12), ("L4", 121.0e12),
)
METHOD_NAMES = {"mae": "MAE", "simclr": "SimCLR", "byol": "BYOL", "dino": "DINO", "vicreg": "VICReg",
                "barlow_twins": "Barlow Twins"}
ENCODER_NAMES = {"vit_tiny": "ViT-Tiny", "vit_small": "ViT-Small", "resnet_tiny": "ResNet-tiny",
                 "resnet18": "ResNet-18", "resnet34": "ResNet-34", "resnet50": "ResNet-50", "mlp": "MLP"}


# ------------------------------------------------------------------------------------------------ parameters
@dataclass
class TrainStepParams:
    """Settings of a ``train_step`` task; ``None`` / ``"auto"`` pick by device (see :func:`_train_settings`)."""

    batch_size: int | None = None  # images per step on both sides; None: 256 on CUDA, 32 on CPU
    steps: int = 20  # timed optimiser steps per side and round
    warmup: int = 5  # untimed steps before them
    rounds: int = 3  # interleaved rounds; the target is the median per-round ratio
    workers: int | None = None  # DataLoader workers of both sides; None: 2 on CPU, min(8, cores // 2) on CUDA
    n_images: int = 0  # synthetic crops; 0: enough for one epoch of every step (no epoch restart in a round)
    precision: str = "auto"  # "auto" (bf16 on CUDA, 32 on CPU), "32" or "bf16", on both sides
    profile_steps: int = 5  # CUDA: steps after the timed ones, under torch.profiler, for the GPU busy share
    size: int = 64  # crop side in pixels

    def check(self) -> None:
        for name in ("steps", "warmup", "rounds", "size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.batch_size is not None and self.batch_size < 2:
            raise ConfigError(f"batch_size: must be >= 2 (contrastive losses need two images), got {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"workers: must be >= 0, got {self.workers}")
        if self.n_images < 0 or self.profile_steps < 0:
            raise ConfigError("n_images: must be >= 0" if self.n_images < 0 else "profile_steps: must be >= 0")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision: {self.precision!r} is not one of {list(PRECISIONS)}")


@dataclass
class EmbedThroughputParams:
    """Settings of an ``embed_throughput`` task."""

    n_crops: int = 8192  # synthetic crops embedded per call (image recipes)
    size: int = 64  # crop side in pixels
    n_cells: int = 20000  # synthetic cells of the expression .h5ad (expression recipes)
    n_genes: int = 3000  # its genes; the model keeps the recipe's n_top_genes of them
    image_batch_size: int = 512  # tl.embed's default for crops
    expression_batch_size: int = 4096  # tl.embed's default for expression
    rounds: int = 3
    sources: list[str] = field(default_factory=lambda: list(SOURCES))  # where the .h5ad is read from

    def check(self) -> None:
        for name in ("n_crops", "size", "n_cells", "n_genes", "image_batch_size", "expression_batch_size", "rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        unknown = sorted(set(self.sources) - set(SOURCES))
        if unknown or not self.sources:
            raise ConfigError(f"sources: expected some of {list(SOURCES)}, got {self.sources}")


# ------------------------------------------------------------------------------------------------ shared pieces
def synthetic_crops(n: int, size: int, seed: int) -> np.ndarray:
    """``(n, 3, size, size)`` uint8 cell-like crops: a dark noisy background, an elliptical cell body and an
    off-centre nucleus, soft-edged, each with its own per-channel intensities."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    grid = np.mgrid[0:size, 0:size].astype(np.float32) / size  # (2, S, S): y, x in [0, 1)
    for start in range(0, n, 512):
        k = min(512, n - start)
        u = rng.uniform(size=(k, 12)).astype(np.float32)  # per crop: centre, axes, angle, nucleus offset and axes
        cy, cx, angle = 0.35 + 0.3 * u[:, 0], 0.35 + 0.3 * u[:, 1], np.pi * u[:, 2]
        cell = _soft_ellipse(grid, cy, cx, 0.18 + 0.16 * u[:, 3], 0.15 + 0.15 * u[:, 4], angle)
        nucleus = _soft_ellipse(grid, cy + 0.12 * (u[:, 5] - 0.5), cx + 0.12 * (u[:, 6] - 0.5),
                                0.07 + 0.06 * u[:, 7], 0.06 + 0.06 * u[:, 8], angle)
        level = rng.uniform([5, 40, 0], [40, 140, 100], size=(k, 3, 3)).astype(np.float32)  # (k, C, [bg, cell, nuc])
        image = (level[:, :, 0, None, None] + level[:, :, 1, None, None] * cell[:, None]
                 + level[:, :, 2, None, None] * nucleus[:, None])  # (k, 3, S, S)
        image += 6.0 * rng.standard_normal(image.shape, dtype=np.float32)
        out[start : start + k] = np.clip(image, 0, 255).astype(np.uint8)
    return out


def _soft_ellipse(grid: np.ndarray, cy: np.ndarray, cx: np.ndarray, a: np.ndarray, b: np.ndarray,
                  angle: np.ndarray) -> np.ndarray:
    """``(k,)`` centres, semi-axes and angles on ``grid (2, S, S)`` -> ``(k, S, S)`` masks in [0, 1], edge ~0.1 px."""
    dy, dx = grid[0] - cy[:, None, None], grid[1] - cx[:, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    r = ((dx * cos + dy * sin) / a[:, None, None]) ** 2 + ((dy * cos - dx * sin) / b[:, None, None]) ** 2
    return 0.5 - 0.5 * np.tanh(6.0 * (r - 1.0))  # sigmoid(-12 (r - 1)), without overflow


def _device(ctx: Context) -> torch.device:
    from sslcell.inference import default_device

    device = default_device(None if ctx.device == "auto" else ctx.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {ctx.device!r}: torch sees no CUDA device")
    return device


def _label(config: Any, encoder: torch.nn.Module | None = None) -> str:
    """``MAE ViT-Tiny (patch 8)``, ``SimCLR ResNet-18``, ``MAE MLP``."""
    method = METHOD_NAMES.get(config.method.name, config.method.name)
    name = f"{method} {ENCODER_NAMES.get(config.encoder.name, config.encoder.name)}"
    patch = getattr(encoder, "patch_size", None)
    return f"{name} (patch {patch})" if patch is not None else name


def _median_ratio(numerator: list[float], denominator: list[float]) -> tuple[float, list[float]]:
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return statistics.median(ratios), ratios


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def peak_bf16_flops(device_name: str) -> float:
    """The dense bf16 peak (FLOP/s) of a GPU named ``device_name``; NaN if it is not in :data:`PEAK_BF16_DENSE`."""
    return next((peak for key, peak in PEAK_BF16_DENSE if key in device_name), math.nan)


def union_seconds(intervals: list[tuple[int, int]]) -> float:
    """Length in seconds of the union of ``[start_ns, end_ns)`` intervals (overlaps counted once)."""
    total, end = 0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total, end = total + (b - a), b
        elif b > end:
            total, end = total + (b - end), b
    return total / 1e9


def step_flops(step: Callable[[], torch.Tensor]) -> int:
    """FLOPs of one training step: ``step()`` returns the loss, which is back-propagated under the counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step().backward()
    return int(counter.get_total_flops())


def _spec(task: Any, ctx: Context) -> dict[str, Any]:
    """What the child process needs: parameters, recipes (as mappings), peers, seed, device, scratch folder."""
    return {"params": dataclasses.asdict(task.params), "seed": ctx.seed, "device": str(_device(ctx)),
            "peers": list(task.peers), "workdir": str(ctx.workdir),
            "recipes": [{"name": r.name, "config": r.config.to_dict()} for r in task.recipes]}


def _recipes(spec: dict[str, Any]) -> list[tuple[str, Any]]:
    from sslcell.config import RecipeConfig

    return [(r["name"], RecipeConfig.from_dict(r["config"])) for r in spec["recipes"]]


def _in_child(function: str, spec: dict[str, Any], ctx: Context, n_rounds: int, desc: str) -> dict[str, Any]:
    """``function(spec)`` of this module in a fresh process with ``OMP_WAIT_POLICY=PASSIVE``; its lines starting
    with ``round`` advance the progress bar and go to the log."""
    from sslcell.benchmark.child import run_child

    rounds = iter(ctx.steps(range(n_rounds), desc=desc))

    def on_line(line: str) -> None:
        if line.startswith("round "):
            next(rounds, None)
            ctx.log(line)

    policy = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    out = run_child(f"{__name__}:{function}", spec, ctx.workdir, env={"OMP_WAIT_POLICY": policy}, on_line=on_line)
    for _ in rounds:
        pass
    return out


class StepClock:
    """Times optimiser steps ``warmup + 1 .. warmup + steps``; on CUDA, with ``profile_steps``, profiles the next
    ones for the GPU busy share. Call :meth:`step_done` after every optimiser step; it returns True after the last.
    """

    def __init__(self, warmup: int, steps: int, profile_steps: int, device: torch.device) -> None:
        self.warmup, self.steps, self.device = warmup, steps, device
        self.profile_steps = profile_steps if device.type == "cuda" else 0
        self.done = 0
        self.seconds = math.nan  # of the timed steps
        self.gpu_busy = math.nan  # share of the profiled steps' wall time
        self.profile_error: str | None = None
        self._t0 = self._p0 = 0.0
        self._profiler: Any = None

    @property
    def total(self) -> int:
        return self.warmup + self.steps + self.profile_steps

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def step_done(self) -> bool:
        self.done += 1
        if self.done == self.warmup:
            self._t0 = self._now()
        if self.done == self.warmup + self.steps:
            self.seconds = self._now() - self._t0
            if self.profile_steps:
                self._start_profiler()
        if self._profiler is not None and self.done == self.total:
            self._stop_profiler()
        return self.done >= self.total

    def _start_profiler(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        try:
            self._profiler = profile(activities=[ProfilerActivity.CUDA])
            self._profiler.start()
        except Exception as err:  # noqa: BLE001 - no profiler (no CUPTI): report no busy share, keep the timings
            self._profiler, self.profile_error = None, f"{type(err).__name__}: {err}"
        self._p0 = self._now()

    def _stop_profiler(self) -> None:
        from torch.autograd import DeviceType

        wall = self._now() - self._p0
        try:
            self._profiler.stop()
            events = self._profiler.profiler.kineto_results.events()
            spans = [(e.start_ns(), e.start_ns() + e.duration_ns()) for e in events
                     if e.device_type() == DeviceType.CUDA]
            if spans:
                self.gpu_busy = min(union_seconds(spans) / wall, 1.0)
            else:
                self.profile_error = "the profiler recorded no CUDA activity"
        except Exception as err:  # noqa: BLE001
            self.profile_error = f"{type(err).__name__}: {err}"
        self._profiler = None

    def images_per_second(self, batch_size: int) -> float:
        return batch_size * self.steps / self.seconds


# ------------------------------------------------------------------------------------------------ train_step
@dataclass
class _TrainSettings:
    batch_size: int
    workers: int
    n_images: int
    bf16: bool
    steps: int
    warmup: int
    rounds: int
    profile_steps: int
    size: int


def _train_settings(p: TrainStepParams, device: torch.device) -> _TrainSettings:
    cuda = device.type == "cuda"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    batch = p.batch_size or (256 if cuda else 32)
    workers = p.workers if p.workers is not None else (min(8, max(cores // 2, 1)) if cuda else 2)
    profile = p.profile_steps if cuda else 0
    total = p.warmup + p.steps + profile
    one_epoch = batch * (total + max(workers, 1))  # every worker's share of an epoch holds its steps
    n_images = p.n_images or one_epoch
    if n_images < one_epoch:
        warn_user(f"train_step: n_images={n_images} < {one_epoch}: an epoch ends inside a round's {total} steps, and "
                  "the workers restart among the timed steps")
    bf16 = p.precision == "bf16" or (p.precision == "auto" and cuda)
    return _TrainSettings(batch, workers, n_images, bf16, p.steps, p.warmup, p.rounds, profile, p.size)


def _clock_callback(clock: StepClock) -> Any:
    import pytorch_lightning as pl

    class ClockCallback(pl.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            clock.step_done()

    return ClockCallback()


def _sslcell_round(recipe: Any, cells: Any, s: _TrainSettings, device: torch.device, clock: StepClock,
                   seed: int, out: Path) -> torch.nn.Module:
    """One round of ``sslcell.pretrain`` of ``recipe`` (a RecipeConfig) for ``clock.total`` steps; the trained model."""
    from sslcell.train import pretrain

    config = copy.deepcopy(recipe)  # batch, workers, precision and device as the task sets them
    d, t = config.data, config.train
    d.batch_size, d.num_workers, d.channels = s.batch_size, s.workers, None
    t.precision = "bf16-mixed" if s.bf16 else "32-true"
    t.accelerator, t.devices, t.num_nodes, t.strategy = ("gpu" if device.type == "cuda" else "cpu"), 1, 1, "auto"
    t.checkpoint_every_n_steps = clock.total + 1  # no checkpoint among the measured steps
    t.progress_bar, t.seed = False, seed
    with _quiet_lightning():
        model = pretrain(config, cells, out, overwrite=True, max_steps=clock.total, callbacks=[_clock_callback(clock)])
    shutil.rmtree(out, ignore_errors=True)
    return model


def _lightly_round(recipe: Any, images_hwc: np.ndarray, s: _TrainSettings, device: torch.device, clock: StepClock,
                   seed: int) -> Any:
    """One round of lightly's reference loop for ``recipe`` (a RecipeConfig), ``clock.total`` steps; its
    :class:`~sslcell.benchmark.tasks._lightly_reference.Reference`."""
    from sslcell.benchmark.tasks import _lightly_reference as lightly_ref
    from sslcell.encoders.image import build_image_encoder

    encoder = build_image_encoder(recipe.encoder.name, 3, s.size, **recipe.encoder.options)  # sizes to copy
    torch.manual_seed(seed)
    reference = lightly_ref.build_reference(recipe, encoder, 3, s.size)
    loader = lightly_ref.make_loader(images_hwc, reference, batch_size=s.batch_size, workers=s.workers,
                                     pin_memory=device.type == "cuda", seed=seed)
    lightly_ref.train(reference, loader, recipe, device, s.bf16, clock.step_done)
    return reference


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's start-up banners (GPU available, ...) and hints, silenced for a round."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "pytorch_lightning", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"(lightning|pytorch_lightning)\..*")
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def run_train_step(task: Any, ctx: Context) -> TaskResult:
    """Check the recipes, measure in a child process (module docstring), tabulate."""
    from sslcell.benchmark.tasks._lightly_reference import supported

    if not task.recipes:
        raise ConfigError("recipes: train_step needs at least one image recipe (e.g. configs/image_simclr.yaml)")
    for i, recipe in enumerate(task.recipes):
        if recipe.config.modality != "image":
            raise ConfigError(f"recipes[{i}]: train_step times image recipes; {recipe.name} is "
                              f"{recipe.config.modality}")
        why = supported(recipe.config)
        if "lightly" in task.peers and why is not None:
            raise ConfigError(f"recipes[{i}]: no lightly reference for {recipe.name}: {why}")
    p: TrainStepParams = task.params
    spec = _spec(task, ctx)
    m = _in_child("measure_train_step", spec, ctx, p.rounds * len(task.recipes), "train_step rounds")
    return _train_result(m)


def measure_train_step(spec: dict[str, Any]) -> dict[str, Any]:
    """Interleaved rounds of sslcell's and lightly's steps for every recipe, in this (child) process."""
    from sslcell.data.images import CellImages

    device = torch.device(spec["device"])
    s = _train_settings(TrainStepParams(**spec["params"]), device)
    seed, peers, workdir = spec["seed"], spec["peers"], Path(spec["workdir"])
    images = synthetic_crops(s.n_images, s.size, seed)  # (N, 3, S, S) uint8
    images_hwc = np.ascontiguousarray(images.transpose(0, 2, 3, 1))  # PIL's layout, made once (not timed)
    cells = CellImages.from_array(images, channel_names=["red", "green", "blue"], source="synthetic crops")
    measured = {name: _measure_recipe(name, config, cells, images, images_hwc, s, device, peers, seed, workdir)
                for name, config in _recipes(spec)}
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    import lightly
    import torchvision

    return {"recipes": measured, "settings": vars(s), "device": str(device), "gpu": gpu,
            "peak_bf16_flops": peak_bf16_flops(gpu) if gpu else math.nan, "has_peer": "lightly" in peers,
            "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                         "lightly": lightly.__version__}}


def _measure_recipe(name: str, config: Any, cells: Any, images: np.ndarray, images_hwc: np.ndarray,
                    s: _TrainSettings, device: torch.device, peers: list[str], seed: int,
                    workdir: Path) -> dict[str, Any]:
    sides = ["lightly", "sslcell"] if "lightly" in peers else ["sslcell"]
    ips: dict[str, list[float]] = {side: [] for side in sides}
    busy: dict[str, float] = {}
    errors: dict[str, str] = {}
    models: dict[str, Any] = {}
    for r in range(s.rounds):
        last = r == s.rounds - 1
        for side in sides if r % 2 == 0 else sides[::-1]:
            clock = StepClock(s.warmup, s.steps, s.profile_steps if last else 0, device)
            if side == "sslcell":
                models[side] = _sslcell_round(config, cells, s, device, clock, seed + r, workdir / f"{name}_round{r}")
            else:
                models[side] = _lightly_round(config, images_hwc, s, device, clock, seed + r)
            ips[side].append(clock.images_per_second(s.batch_size))
            if last and clock.profile_steps:
                busy[side] = clock.gpu_busy
                if clock.profile_error:
                    errors[side] = clock.profile_error
        print(f"round {r} of {name}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in ips.items()), flush=True)
    flops, params = _count(models, images, s, device, seed)
    return {"label": _label(config, models["sslcell"].encoder), "images_per_second": ips, "gpu_busy": busy,
            "profile_errors": errors, "flops_per_step": flops, "trainable_parameters": params,
            "lightly_model": getattr(models.get("lightly"), "description", None)}


def _count(models: dict[str, Any], images: np.ndarray, s: _TrainSettings, device: torch.device,
           seed: int) -> tuple[dict[str, int], dict[str, int]]:
    """FLOPs of one step and trainable parameters of each side's model (trained in the last round)."""
    from torch.utils.data import default_collate

    from sslcell.benchmark.tasks._lightly_reference import PILCrops

    flops, params = {}, {}
    model = models["sslcell"].to(device).train()
    batch = torch.from_numpy(images[: s.batch_size]).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    flops["sslcell"] = step_flops(lambda: model.loss(batch, generator)[0])
    params["sslcell"] = _trainable(model)
    model.zero_grad(set_to_none=True)
    if "lightly" in models:
        reference = models["lightly"]
        data = PILCrops(np.ascontiguousarray(images[: s.batch_size].transpose(0, 2, 3, 1)), reference.transform)
        lightly_batch = default_collate([data[i] for i in range(s.batch_size)])
        net = reference.model.to(device).train()
        flops["lightly"] = step_flops(lambda: reference.step(net, lightly_batch, device))
        params["lightly"] = _trainable(net)
        net.zero_grad(set_to_none=True)
    return flops, params


def _train_result(m: dict[str, Any]) -> TaskResult:
    s = _TrainSettings(**m["settings"])
    cuda, has_peer, measured = m["gpu"] is not None, m["has_peer"], m["recipes"]
    rows, targets = [], []
    for name, r in measured.items():
        ips = r["images_per_second"]
        ratio = _median_ratio(ips["sslcell"], ips["lightly"]) if has_peer else None
        for side in ips:
            median = statistics.median(ips[side])
            flops = r["flops_per_step"].get(side, math.nan)
            row = {"model": r["label"], "recipe": name,
                   "side": "sslcell (sslcell.pretrain)" if side == "sslcell" else "lightly reference loop",
                   "trainable params": r["trainable_parameters"].get(side), "images/s (median)": median,
                   "per round": ", ".join(f"{v:.1f}" for v in ips[side]), "GFLOP/step": flops / 1e9}
            if ratio is not None:
                row["x lightly (median per round)"] = ratio[0] if side == "sslcell" else None
            if cuda:
                row["MFU %"] = 100 * flops * median / s.batch_size / m["peak_bf16_flops"]
                row["GPU busy %"] = 100 * r["gpu_busy"].get(side, math.nan)
            rows.append(row)
        if ratio is not None:
            targets.append(Target(f"{r['label']} step vs lightly (images/s, median per-round ratio)", ratio[0], 1.0,
                                  unit="x"))
            r["ratio"], r["ratio_per_round"] = ratio
    columns = ["model", "recipe", "side", "trainable params", "images/s (median)",
               *(["x lightly (median per round)"] if has_peer else []), "per round", "GFLOP/step",
               *(["MFU %", "GPU busy %"] if cuda else [])]
    title = (f"Pretraining step on {s.size} x {s.size} crops, augmentation + loading + copy included: batch "
             f"{s.batch_size}, {s.steps} timed steps after {s.warmup} of warm-up, {s.rounds} interleaved rounds, "
             f"{'bf16 autocast' if s.bf16 else 'fp32'}, {s.workers} DataLoader workers per side, on "
             f"{m['gpu'] or 'CPU'}")
    return TaskResult(tables=[Table(title, columns, rows)], targets=targets, notes=_train_notes(m, s), raw=m)


def _train_notes(m: dict[str, Any], s: _TrainSettings) -> list[str]:
    cuda, measured, v = m["gpu"] is not None, m["recipes"], m["versions"]
    notes = [
        f"Measured: input images per second of whole training steps (data loading in {s.workers} DataLoader workers, "
        "augmentation, host-to-device copy, forward, backward, AdamW step), timed from the end of warm-up step "
        f"{s.warmup} to the end of step {s.warmup + s.steps} with the device synchronised at both ends; each side is "
        "built afresh every round and the rounds alternate which side goes first; the ratio is the median of the "
        "per-round ratios. Both sides: the same synthetic uint8 RGB crops (a noisy background, an elliptical cell "
        f"and a nucleus; {s.n_images} of them, so a round stays within one epoch), batch {s.batch_size}, "
        f"{'bf16 autocast around forward and loss' if s.bf16 else 'fp32'}, AdamW with the recipe's learning rate "
        f"and weight decay; torch {v['torch']} with {m['torch_threads']} intra-op threads in the main process, "
        f"torchvision {v['torchvision']}, lightly {v['lightly']}; measured in a child process with "
        f"OMP_WAIT_POLICY={m['omp_wait_policy']}.",
        "sslcell: `sslcell.pretrain(recipe, CellImages)` itself (Lightning, the recipe's augmentation and method; "
        "batch size, workers and precision set as above, checkpoints only after the measured steps): uint8 batches "
        "from its loader" + (", pinned, copied to the GPU and augmented there (sslcell.augment's torch pipeline)"
                             if cuda else ", augmented in the main process by sslcell.augment's compiled CPU kernel")
        + ".",
    ]
    if m["has_peer"]:
        notes.append("lightly: its reference loop (sslcell/benchmark/tasks/_lightly_reference.py): lightly's "
                     "transform per sample on PIL images in the DataLoader workers" + (", pinned memory and "
                     "non-blocking copies" if cuda else "") + "; models: " + "; ".join(
                         f"{name}: {r['lightly_model']}" for name, r in measured.items()) + ".")
    notes.append("Trainable parameters and GFLOP per step (forward + backward of one batch, counted by "
                 "torch.utils.flop_counter.FlopCounterMode; augmentation is not model work and is not counted, "
                 "except the GPU blur's small convolution)"
                 + ("." if cuda else "; on CPU attention (scaled_dot_product_attention) has no FLOP formula and "
                    "is not counted, on either side."))
    if cuda:
        peak = m["peak_bf16_flops"]
        peak_text = f"{peak / 1e12:.1f} TFLOP/s" if math.isfinite(peak) else "unknown for this GPU (MFU not given)"
        notes.append(
            f"GPU: {m['gpu']}. MFU = GFLOP/step x steps/s / the dense bf16 peak ({peak_text}, vendor datasheet), "
            "whatever the precision. GPU busy = union of the intervals with a CUDA kernel or copy running, from "
            f"torch.profiler (CUDA activity only) over {s.profile_steps} steps after the timed ones in the last "
            "round, divided by those steps' wall time (profiling slows the host slightly, so this leans low).")
        errors = {f"{n} {side}": e for n, r in measured.items() for side, e in r["profile_errors"].items()}
        if errors:
            notes.append("GPU busy share not measured for " + "; ".join(f"{k}: {e}" for k, e in errors.items()) + ".")
    else:
        notes.append("On CPU there is no GPU busy share and no model FLOPs utilisation (not applicable).")
    return notes


register(TaskKind(
    name="train_step", params=TrainStepParams, run=run_train_step,
    data_roles=(),  # makes its own data
    summary="images/s of a pretraining step (augmentation + data loading included) per recipe: sslcell.pretrain vs "
            "lightly's reference loop for the same network and batch; on CUDA also GPU busy share and MFU",
    peers=("lightly",), takes_recipes=True,
    quick={"batch_size": 2, "steps": 1, "warmup": 1, "rounds": 1, "workers": 1, "profile_steps": 1, "size": 32},
))


# ------------------------------------------------------------------------------------------------ embed_throughput
def run_embed_throughput(task: Any, ctx: Context) -> TaskResult:
    """Measure in a child process (module docstring), tabulate."""
    p: EmbedThroughputParams = task.params
    if not task.recipes:
        raise ConfigError("recipes: embed_throughput needs at least one recipe (e.g. configs/image_simclr.yaml)")
    n_cases = sum(1 if r.config.modality == "image" else len(p.sources) for r in task.recipes)
    m = _in_child("measure_embed", _spec(task, ctx), ctx, p.rounds * n_cases, "embedding rounds")
    rows = []
    for case in m["cases"]:
        ratio, case["ratio_per_round"] = _median_ratio(case["sslcell"], case["plain"])
        rows.append({"model": case["label"], "recipe": case["recipe"], "data": case["data"], "cells": case["n"],
                     "batch": case["batch_size"], "tl.embed cells/s": statistics.median(case["sslcell"]),
                     "plain loop cells/s": statistics.median(case["plain"]), "x plain loop": ratio,
                     "max |difference|": case["max_difference"]})
    table = Table(f"Embedding throughput on {m['gpu'] or 'CPU'}: cells/s (median of {p.rounds} interleaved rounds), "
                  "fp32", ["model", "recipe", "data", "cells", "batch", "tl.embed cells/s", "plain loop cells/s",
                           "x plain loop", "max |difference|"], rows)
    notes = [
        "Measured: wall time of one whole call embedding every cell, tl.embed(adata, model, batch_size=..., "
        "device=...) (crops: crops=CellImages) against a plain loop over the same data: a torch DataLoader of "
        "batches (crops: the uint8 array; expression: rows of adata.X, in memory or read from the backed file, "
        "restricted to the model's genes, made dense), torch.no_grad(), model.encoder(model.inputs.normalize(x)) "
        "on the device, each batch's embedding copied to the host, concatenated. Models are built from the recipes "
        "with untrained weights (speed does not depend on them); one untimed call of each first; rounds alternate "
        "which side goes first. 'max |difference|' compares the two sides' embeddings (both compute the same thing). "
        f"torch {m['torch']} with {m['torch_threads']} threads, in a child process with "
        f"OMP_WAIT_POLICY={m['omp_wait_policy']}.",
        f"Data: {p.n_crops} synthetic {p.size} x {p.size} uint8 RGB crops; a synthetic sparse count .h5ad of "
        f"{p.n_cells} cells x {p.n_genes} genes (sslcell.data.synthetic.make_expression), the model's genes chosen "
        "by the recipe's highly-variable-gene step as sslcell.pretrain would. Reported only: the issue sets no "
        "target for embedding throughput.",
    ]
    return TaskResult(tables=[table], notes=notes, raw=m)


def measure_embed(spec: dict[str, Any]) -> dict[str, Any]:
    """Interleaved rounds of ``tl.embed`` and the plain loop for every recipe, in this (child) process."""
    p = EmbedThroughputParams(**spec["params"])
    device, seed, workdir = torch.device(spec["device"]), spec["seed"], Path(spec["workdir"])
    out, expression_data = [], None
    for name, config in _recipes(spec):
        if config.modality == "image":
            cases = _image_cases(config, p, seed)
        else:
            if expression_data is None:
                expression_data = _expression_data(p, seed, workdir)
            cases = _expression_cases(config, p, expression_data)
        for case in cases:
            timed = _time_embedding(case, p.rounds, device, name)
            out.append({"recipe": name, "label": case["label"], "data": case["data"]} | timed)
    return {"cases": out, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def _image_cases(config: Any, p: EmbedThroughputParams, seed: int) -> list[dict[str, Any]]:
    from sslcell.data.images import CellImages
    from sslcell.methods import build_method
    from sslcell.train import _prepare_images

    images = synthetic_crops(p.n_crops, p.size, seed)
    cells = CellImages.from_array(images, channel_names=["red", "green", "blue"], source="synthetic crops")
    cells, contract = _prepare_images(config, cells, None)
    model = build_method(config, contract)
    adata = cells.to_anndata()
    batch_size = p.image_batch_size
    return [{"label": _label(config, model.encoder), "data": "crops in memory", "n": len(cells),
             "batch_size": batch_size, "model": model,
             "sslcell": lambda device: _tl_embed(adata, model, batch_size, device, crops=cells),
             "plain": lambda device: _plain_loop(_CropBatches(images, batch_size), model, device)}]


def _expression_data(p: EmbedThroughputParams, seed: int, workdir: Path) -> dict[str, Any]:
    from sslcell.data.synthetic import make_expression

    adata = make_expression(n_cells=p.n_cells, n_genes=p.n_genes, seed=seed)
    path = workdir / "expression.h5ad"
    adata.write_h5ad(path)
    return {"adata": adata, "path": path}


def _expression_cases(config: Any, p: EmbedThroughputParams, data: dict[str, Any]) -> list[dict[str, Any]]:
    import anndata as ad

    from sslcell.methods import build_method
    from sslcell.train import _prepare_expression

    dataset, contract = _prepare_expression(config, data["path"], None)  # genes and statistics as pretrain fixes them
    dataset.close()
    model = build_method(config, contract)
    batch_size = p.expression_batch_size
    cases = []
    for source in p.sources:
        adata = data["adata"] if source == "memory" else ad.read_h5ad(data["path"], backed="r")
        columns = adata.var_names.get_indexer(list(contract.genes))
        cases.append({
            "label": _label(config), "data": f".h5ad {'in memory' if source == 'memory' else 'backed'}",
            "n": adata.n_obs, "batch_size": batch_size, "model": model,
            "sslcell": lambda device, adata=adata: _tl_embed(adata, model, batch_size, device),
            "plain": lambda device, adata=adata, columns=columns: _plain_loop(
                _RowBatches(adata.X, columns, batch_size), model, device)})
    return cases


def _tl_embed(adata: Any, model: Any, batch_size: int, device: torch.device, crops: Any = None) -> np.ndarray:
    from sslcell import tl

    tl.embed(adata, model, crops=crops, batch_size=batch_size, device=device, key_added="X_bench", overwrite=True)
    return adata.obsm["X_bench"]


class _CropBatches(torch.utils.data.Dataset):
    """Item ``k``: crops ``k*B : (k+1)*B`` of ``(N, C, H, W)`` uint8 as a tensor."""

    def __init__(self, images: np.ndarray, batch_size: int) -> None:
        self.images, self.batch_size = images, batch_size

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def __getitem__(self, k: int) -> torch.Tensor:
        return torch.from_numpy(self.images[k * self.batch_size : (k + 1) * self.batch_size])


class _RowBatches(torch.utils.data.Dataset):
    """Item ``k``: rows ``k*B : (k+1)*B`` of a (backed) sparse ``X``, restricted to ``columns``, dense float32."""

    def __init__(self, x: Any, columns: np.ndarray, batch_size: int) -> None:
        self.x, self.columns, self.batch_size = x, columns, batch_size

    def __len__(self) -> int:
        return -(-self.x.shape[0] // self.batch_size)

    def __getitem__(self, k: int) -> torch.Tensor:
        rows = self.x[k * self.batch_size : (k + 1) * self.batch_size]
        return torch.from_numpy(rows[:, self.columns].toarray().astype(np.float32))


@torch.no_grad()
def _plain_loop(batches: torch.utils.data.Dataset, model: Any, device: torch.device) -> np.ndarray:
    """The peer: ``model.encoder(model.inputs.normalize(x))`` over a DataLoader, embeddings to the host."""
    model.to(device).eval()
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    out = [model.encoder(model.inputs.normalize(x.to(device, non_blocking=True))).float().cpu() for x in loader]
    return torch.cat(out).numpy()


def _time_embedding(case: dict[str, Any], rounds: int, device: torch.device, name: str) -> dict[str, Any]:
    """Cells/s per round of both sides of ``case``, and the largest difference between their embeddings."""
    outputs = {side: case[side](device) for side in ("sslcell", "plain")}  # warm-up, and the agreement check
    difference = float(np.abs(outputs["sslcell"] - outputs["plain"]).max())
    seconds: dict[str, list[float]] = {"sslcell": [], "plain": []}
    for r in range(rounds):
        for side in ("plain", "sslcell") if r % 2 == 0 else ("sslcell", "plain"):
            start = time.perf_counter()
            case[side](device)
            seconds[side].append(time.perf_counter() - start)
        print(f"round {r} of {name}, {case['data']}: tl.embed {case['n'] / seconds['sslcell'][-1]:.0f} cells/s, "
              f"plain loop {case['n'] / seconds['plain'][-1]:.0f} cells/s", flush=True)
    per_second = {side: [case["n"] / t for t in ts] for side, ts in seconds.items()}
    return per_second | {"seconds": seconds, "max_difference": difference, "n": case["n"],
                         "batch_size": case["batch_size"]}


register(TaskKind(
    name="embed_throughput", params=EmbedThroughputParams, run=run_embed_throughput,
    data_roles=(),  # makes its own data
    summary="cells/s of sslcell.tl.embed per recipe's model (crops; expression .h5ad in memory and backed) vs a "
            "plain torch no_grad loop over a DataLoader of the same data; reported, no target",
    takes_recipes=True,
    quick={"n_crops": 16, "size": 32, "n_cells": 200, "n_genes": 300, "image_batch_size": 8,
           "expression_batch_size": 64, "rounds": 1},
))
