"""Expression speed and memory (issue 14 items 1, 2, 4, 5, 6): the streamed loader against its peers, pretraining
from a backed file against the same batches in memory, peak memory on a 2,000,000-cell file, and scaling plots.

Every kind works on synthetic counts written during the run by :func:`counts_file`: ``(n_obs, n_genes)`` int32
counts in an uncompressed CSR ``.h5ad`` (anndata's default layout), gene-specific detection rates averaging
``density``, geometric counts. The file is written chunk by chunk, so even 2,000,000 x 2,000 needs only one chunk
in memory. Files lie in the suite's scratch folder, shared by its tasks (and kept with ``--workdir``); a file just
written is in the OS page cache, so the speed kinds measure the code, not the disk.

``expression_loader`` (``benchmarks/bench_loader.py`` runs it; it was that script before). All entries produce
shuffled dense float32 ``(batch_size, G)`` torch batches from the same file, in one process each, timed in
interleaved rounds (median reported):

* sslcell: ``BlockShuffleLoader(ExpressionDataset.open(path))`` on the backed file, one full epoch;
* peer ``annloader``: ``AnnLoader(read_h5ad(path, backed="r"), batch_size, shuffle=True)``, a bounded number of
  batches (it reads every batch row by row from the file, so it is slow);
* peer ``in_memory``: the matrix loaded whole as float32 scipy CSR; random batches ``X[idx]`` made dense, one
  epoch's worth;
* for information, sslcell through ``make_dataloader(num_workers=workers)``.

Targets: sslcell / AnnLoader >= 20 and sslcell / in-memory >= 0.5. Memory: a fresh process streams one epoch over
the first N/2 rows and one over all N rows and reports its peak RSS growth (``VmHWM`` after - ``VmRSS`` before)
and the peak of Python-level allocations (tracemalloc); target: the growth from N/2 to N rows stays under 25% of
the growth of the matrix itself (the loader's memory does not follow the file size).
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from sslcell.benchmark.child import preloaded_note
from sslcell.benchmark.registry import Context, Table, Target, TaskKind, TaskResult, register
from sslcell.benchmark.tasks._expression_probe import GB, pretrain_timed, run_probe
from sslcell.errors import ConfigError

CHUNK_ROWS = 10_000  # rows drawn and written at a time
MEMORY_LIMIT_GB = 3.0  # issue 14, item 5


# --- synthetic counts, written chunk-wise --------------------------------------------------------------------------

def count_chunks(n_obs: int, n_genes: int, density: float, seed: int) -> Iterator[sp.csr_matrix]:
    """Row chunks ``(<= CHUNK_ROWS, n_genes)`` int32 CSR: gene ``g`` is detected with probability ``rate[g]``
    (log-normal across genes, mean ``density``), detected counts are geometric (p = 0.4).

    Chunk ``k`` draws its detections and its counts from two generators seeded ``(seed, k, 0)`` and
    ``(seed, k, 1)``, both in row order, so the first ``n`` rows are the same whatever ``n_obs``: a smaller file is
    the first rows of a larger one.
    """
    rng = np.random.default_rng(seed)
    rate = rng.lognormal(0.0, 0.8, n_genes)
    rate = np.clip(density * rate / rate.mean(), 0.0, 0.9).astype(np.float32)
    for k, start in enumerate(range(0, n_obs, CHUNK_ROWS)):
        n = min(CHUNK_ROWS, n_obs - start)
        hit = np.random.default_rng([seed, k, 0]).random((n, n_genes), dtype=np.float32) < rate
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.count_nonzero(hit, axis=1), out=indptr[1:])
        columns = np.nonzero(hit)[1].astype(np.int32)  # row-major: sorted within each row
        values = np.random.default_rng([seed, k, 1]).geometric(0.4, columns.size).astype(np.int32)
        yield sp.csr_matrix((values, columns, indptr), shape=(n, n_genes))


def file_chunks(path: Path, n_obs: int) -> Iterator[sp.csr_matrix]:
    """The first ``n_obs`` rows of the ``.h5ad`` at ``path``, in chunks of ``CHUNK_ROWS`` (stored dtype kept)."""
    import h5py
    from anndata.io import sparse_dataset

    with h5py.File(path, "r") as f:
        matrix = sparse_dataset(f["X"])
        for start in range(0, n_obs, CHUNK_ROWS):
            yield matrix[start : min(start + CHUNK_ROWS, n_obs)]


def write_counts(path: Path, chunks: Iterable[sp.csr_matrix], n_obs: int, n_genes: int) -> Path:
    """Write the CSR row ``chunks`` as ``X`` of an ``.h5ad`` (obs ``cell<i>``, var ``gene<j>``) with anndata's own
    writer (``write_elem``, then ``sparse_dataset(...).append``): uncompressed, int64 ``indptr``. Memory: one chunk
    and the obs names. Written to a temporary name first, so ``path`` only ever holds a complete file."""
    import anndata as ad
    import h5py
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem

    tmp = path.with_name(f".{path.name}.tmp")
    obs = pd.DataFrame(index=pd.Index([f"cell{i}" for i in range(n_obs)]))
    var = pd.DataFrame(index=pd.Index([f"gene{j}" for j in range(n_genes)]))
    try:
        ad.AnnData(obs=obs, var=var).write_h5ad(tmp)  # no X yet
        del obs
        rows = 0
        with h5py.File(tmp, "a") as f:
            for chunk in chunks:
                if rows == 0:
                    write_elem(f, "X", chunk, dataset_kwargs={"indptr_dtype": np.int64})
                else:
                    sparse_dataset(f["X"]).append(chunk)
                rows += chunk.shape[0]
        if rows != n_obs:
            raise ValueError(f"write_counts: the chunks hold {rows} rows, expected {n_obs}")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return path


def counts_path(ctx: Context, n_obs: int, n_genes: int, density: float) -> Path:
    """Where :func:`counts_file` keeps the file of these settings."""
    return ctx.workdir.parent / "expression_counts" / f"counts_{n_obs}x{n_genes}_d{density:g}_seed{ctx.seed}.h5ad"


def counts_file(ctx: Context, n_obs: int, n_genes: int, density: float, *, prefix_of: Path | None = None) -> Path:
    """The synthetic counts of these settings, written once per suite run into the scratch folder the suite's
    tasks share (``ctx.workdir``'s parent): drawn with :func:`count_chunks`, or, given ``prefix_of`` (a larger file
    of the same settings), copied from its first rows, which are the same rows."""
    path = counts_path(ctx, n_obs, n_genes, density)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        ctx.log(f"writing {path.name}")
        chunks = file_chunks(prefix_of, n_obs) if prefix_of is not None else count_chunks(n_obs, n_genes, density,
                                                                                        ctx.seed)
        write_counts(path, chunks, n_obs, n_genes)
    return path


def describe_file(path: Path) -> dict[str, Any]:
    """Size on disk, shape, nonzeros, and what ``X`` would take in memory as float32 CSR (data + indices)."""
    import h5py

    with h5py.File(path, "r") as f:
        n_obs, n_genes = (int(s) for s in f["X"].attrs["shape"])
        nnz = int(f["X"]["indptr"][-1])
    return {"n_obs": n_obs, "n_genes": n_genes, "nnz": nnz, "density": nnz / (n_obs * n_genes),
            "file_gb": path.stat().st_size / GB, "x_csr_float32_gb": nnz * 8 / GB}


# --- shared helpers ------------------------------------------------------------------------------------------------

def _check_positive(params: Any, *names: str) -> None:
    for name in names:
        value = getattr(params, name)
        values = value if isinstance(value, list) else [value]
        if not values or any(v is not None and v < 1 for v in values):
            raise ConfigError(f"{name}: must be >= 1 (a non-empty list of them for a list), got {value!r}")


def _check_density(density: float) -> None:
    if not 0.0 < density <= 0.5:
        raise ConfigError(f"density: must lie in (0, 0.5], got {density}")


def _recipes(task: Any) -> list[Any]:
    if not task.recipes:
        raise ConfigError(f"task {task.name}: recipes: give at least one expression recipe (e.g. "
                          "configs/expression_mae.yaml)")
    for spec in task.recipes:
        if spec.config.modality != "expression":
            raise ConfigError(f"task {task.name}: recipe {spec.name} is an {spec.config.modality} recipe; this "
                              "task pretrains on expression")
    return task.recipes


def bench_config(recipe: Any, device: str, batch_size: int | None = None, no_checkpoint_before: int = 0) -> Any:
    """A copy of ``recipe`` for a benchmark run: no progress bar, ``--device`` applied (``cuda`` -> Lightning's
    ``gpu``; ``auto`` keeps the recipe's), ``batch_size`` if given, and no periodic checkpoint before step
    ``no_checkpoint_before`` (so none falls inside a timed window)."""
    config = copy.deepcopy(recipe)
    config.train.progress_bar = False
    if device != "auto":
        config.train.accelerator = {"cuda": "gpu"}.get(device, device)
    if batch_size is not None:
        config.data.batch_size = batch_size
    if no_checkpoint_before:
        config.train.checkpoint_every_n_steps = max(config.train.checkpoint_every_n_steps, no_checkpoint_before + 1)
    return config


def _check_window(path: Path, config: Any, warmup: int, steps: int, where: str) -> int:
    """Batches per epoch of ``config``'s loader over ``path``; the warm-up and timed steps must fit in one epoch
    (an epoch's end writes a checkpoint and restarts the loader, which is not a step's cost)."""
    from sslcell.data.expression import ExpressionDataset
    from sslcell.data.loader import BlockShuffleLoader

    d = config.data
    with ExpressionDataset.open(path) as dataset:
        n = len(BlockShuffleLoader(dataset, batch_size=d.batch_size, block_size=d.block_size,
                                   buffer_blocks=d.buffer_blocks, num_workers=d.num_workers))
    if warmup + steps > n:
        raise ConfigError(f"{where}: warmup + steps = {warmup + steps} exceed one epoch ({n} batches of "
                          f"{d.batch_size} from {path.name}); lower them or use more cells")
    return n


def _rounds_text(values: list[float], fmt: str = ",.0f") -> str:
    return ", ".join(format(v, fmt) for v in values)


def _load_average() -> list[float]:
    import os

    return [round(x, 2) for x in os.getloadavg()]


def _load_note(start: list[float]) -> str:
    """The machine's load at the task's start and end: on a shared machine other work runs at the same time."""
    return (f"Load average (1 / 5 / 15 min) {start} at the start of the task, {_load_average()} at its end: work "
            "beyond this benchmark's shares the machine when these exceed its cores (interleaved rounds share it "
            "alike; absolute times suffer).")


def _probe_note(ctx: Context) -> list[str]:
    """Under --quick the probes fork from a process that imported their libraries once (run_probe): say so."""
    return [preloaded_note("probe", "torch, Lightning and anndata")] if ctx.quick else []


def _device_arg(device: str) -> str | None:
    return None if device == "auto" else device


# --- expression_loader ---------------------------------------------------------------------------------------------

@dataclass
class LoaderParams:
    """Settings of ``expression_loader`` (see the module docstring)."""

    n_obs: int = 200_000
    n_genes: int = 2_000
    density: float = 0.08
    batch_size: int = 256
    block_size: int = 1024
    buffer_blocks: int = 8
    rounds: int = 3
    annloader_batches: int = 100  # AnnLoader batches timed per round
    workers: int = 2  # the make_dataloader(num_workers=...) row, for information; 0 leaves it out
    memory: bool = True  # the fresh-process memory probe at N/2 and N rows

    def check(self) -> None:
        _check_positive(self, "n_obs", "n_genes", "batch_size", "block_size", "buffer_blocks", "rounds",
                        "annloader_batches")
        _check_density(self.density)
        if self.workers < 0:
            raise ConfigError(f"workers: must be >= 0, got {self.workers}")


def _time_sslcell(path: Path, p: LoaderParams, seed: int, epoch: int) -> float:
    from sslcell.data.expression import ExpressionDataset
    from sslcell.data.loader import BlockShuffleLoader

    loader = BlockShuffleLoader(ExpressionDataset.open(path), batch_size=p.batch_size, block_size=p.block_size,
                                buffer_blocks=p.buffer_blocks, seed=seed)
    loader.set_epoch(epoch)
    n, start = 0, time.perf_counter()
    for batch in loader:
        n += batch.shape[0]
    seconds = time.perf_counter() - start
    loader.dataset.close()
    return n / seconds


def _time_sslcell_workers(path: Path, p: LoaderParams, seed: int, epoch: int) -> float:
    from sslcell.data.expression import ExpressionDataset
    from sslcell.data.loader import make_dataloader

    loader = make_dataloader(ExpressionDataset.open(path), batch_size=p.batch_size, block_size=p.block_size,
                             buffer_blocks=p.buffer_blocks, seed=seed, num_workers=p.workers)
    loader.dataset.set_epoch(epoch)
    iterator = iter(loader)
    next(iterator)  # worker start-up not counted
    n, start = 0, time.perf_counter()
    for batch in iterator:
        n += batch.shape[0]
    return n / (time.perf_counter() - start)


def _time_annloader(path: Path, p: LoaderParams) -> float:
    import anndata as ad
    from anndata.experimental import AnnLoader

    adata = ad.read_h5ad(path, backed="r")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        iterator = iter(AnnLoader(adata, batch_size=p.batch_size, shuffle=True))
        next(iterator)
        n, start = 0, time.perf_counter()
        for _ in range(p.annloader_batches):
            n += next(iterator).X.float().shape[0]  # int32 counts in the file: float32 like the others
    seconds = time.perf_counter() - start
    adata.file.close()
    return n / seconds


def _time_in_memory(matrix: sp.csr_matrix, p: LoaderParams, seed: int, epoch: int) -> float:
    import torch

    order = np.random.default_rng([seed, epoch]).permutation(matrix.shape[0])
    n, start = 0, time.perf_counter()
    for i in range(0, matrix.shape[0] - p.batch_size + 1, p.batch_size):
        n += torch.from_numpy(matrix[order[i : i + p.batch_size]].toarray()).shape[0]
    return n / (time.perf_counter() - start)


LOADER_LABELS = {
    "sslcell": "sslcell BlockShuffleLoader, backed file, 1 process",
    "annloader": "anndata AnnLoader, backed file, shuffle=True",
    "in_memory": "in-memory scipy CSR, X[idx] -> dense tensor",
    "sslcell_workers": "sslcell make_dataloader(num_workers={workers}), for information",
}


def run_loader(task: Any, ctx: Context) -> TaskResult:
    p: LoaderParams = task.params
    load = _load_average()
    path = counts_file(ctx, p.n_obs, p.n_genes, p.density)
    info = describe_file(path)
    entries = ["sslcell", *(peer for peer in ("in_memory", "annloader") if peer in task.peers)]
    entries += ["sslcell_workers"] if p.workers else []
    matrix = None
    if "in_memory" in entries:
        import anndata as ad

        x = ad.read_h5ad(path).X
        # rebuilt from its arrays so that scipy picks one index dtype (int32 when it fits): the file's int64 indptr
        # beside int32 indices would make every X[idx] copy both index arrays whole (about 30x slower)
        matrix = sp.csr_matrix((x.data.astype(np.float32), x.indices, x.indptr), shape=x.shape)
        del x
    _time_sslcell(path, p, ctx.seed, epoch=999)  # warms the page cache and the code paths, not timed
    timers = {
        "sslcell": lambda r: _time_sslcell(path, p, ctx.seed, r),
        "in_memory": lambda r: _time_in_memory(matrix, p, ctx.seed, r),
        "annloader": lambda r: _time_annloader(path, p),
        "sslcell_workers": lambda r: _time_sslcell_workers(path, p, ctx.seed, r),
    }
    rounds: dict[str, list[float]] = {name: [] for name in entries}
    for r in ctx.steps(range(p.rounds), desc="loader rounds"):
        for name in entries:
            rounds[name].append(timers[name](r))
        ctx.log(f"round {r}: " + ", ".join(f"{k} {v[-1]:,.0f} cells/s" for k, v in rounds.items()))
    matrix = None  # the peer's copy of X is no longer needed
    medians = {name: statistics.median(values) for name, values in rounds.items()}
    speed = Table(
        title="Cells/s (dense float32 batches; median of interleaved rounds)",
        columns=["loader", "cells/s", "rounds"],
        rows=[{"loader": LOADER_LABELS[name].format(workers=p.workers), "cells/s": medians[name],
               "rounds": _rounds_text(rounds[name])} for name in entries])
    ratio_rows, targets = [], []
    for peer, goal in (("annloader", 20.0), ("in_memory", 0.5)):
        if peer in entries:
            ratio = medians["sslcell"] / medians[peer]
            per_round = [a / b for a, b in zip(rounds["sslcell"], rounds[peer], strict=True)]
            ratio_rows.append({"ratio": f"sslcell / {peer}", "of medians": ratio,
                               "per round": _rounds_text(per_round, ".2f")})
            targets.append(Target(f"sslcell / {peer} cells/s", ratio, goal))
    tables = [speed] + ([Table("Ratios", ["ratio", "of medians", "per round"], ratio_rows)] if ratio_rows else [])
    raw: dict[str, Any] = {"data": info, "cells_per_s_rounds": rounds, "cells_per_s_median": medians}
    if p.memory:
        half = counts_file(ctx, p.n_obs // 2, p.n_genes, p.density, prefix_of=path)
        probes = []
        for file in (half, path):
            probe = run_probe("loader", ctx.quick, path=str(file), batch_size=p.batch_size, block_size=p.block_size,
                              buffer_blocks=p.buffer_blocks, seed=ctx.seed)
            probes.append(probe | {"x_csr_float32_gb": describe_file(file)["x_csr_float32_gb"]})
        tables.append(Table(
            title="Peak memory while streaming one epoch (a fresh process per file; MB = 1e6 bytes)",
            columns=["rows", "batches", "RSS before (MB)", "peak RSS growth (MB)", "tracemalloc peak (MB)",
                     "X as float32 CSR (MB)"],
            rows=[{"rows": pr["n_obs"], "batches": pr["batches"], "RSS before (MB)": pr["rss_before_gb"] * 1e3,
                   "peak RSS growth (MB)": pr["rss_growth_gb"] * 1e3,
                   "tracemalloc peak (MB)": pr["tracemalloc_peak_gb"] * 1e3,
                   "X as float32 CSR (MB)": pr["x_csr_float32_gb"] * 1e3} for pr in probes]))
        growth = probes[1]["rss_growth_gb"] - probes[0]["rss_growth_gb"]
        x_growth = probes[1]["x_csr_float32_gb"] - probes[0]["x_csr_float32_gb"]
        targets.append(Target("peak RSS growth from N/2 to N rows / growth of X", growth / x_growth, 0.25,
                              higher_is_better=False))
        raw["memory"] = probes
    notes = [
        f"Data: synthetic counts written in the run, {info['n_obs']:,} x {info['n_genes']:,}, "
        f"{info['density']:.2%} nonzero, int32 CSR .h5ad, uncompressed, {info['file_gb']:.2f} GB on disk, in the "
        f"page cache (read once before timing). Batch {p.batch_size}, block {p.block_size}, buffer "
        f"{p.buffer_blocks} blocks, seed {ctx.seed}, {p.rounds} interleaved rounds; sslcell and in-memory time a "
        f"full epoch, AnnLoader {p.annloader_batches} batches per round (its first batch not timed).",
        "Memory: VmHWM - VmRSS of a fresh process streaming one epoch (peak reset just before it), and the "
        "tracemalloc peak of a second epoch; the target compares how much the peak grows from N/2 to N rows with "
        "how much the matrix grows.",
        _load_note(load),
        *_probe_note(ctx),
    ]
    return TaskResult(tables=tables, targets=targets, notes=notes, raw=raw)


register(TaskKind(
    name="expression_loader", params=LoaderParams, run=run_loader,
    data_roles=(),  # makes its own data
    summary="cells/s of sslcell's block-shuffle loader on a backed .h5ad against AnnLoader and in-memory CSR batches, "
            "and its peak memory at N/2 and N rows",
    peers=("annloader", "in_memory"),
    quick={"n_obs": 20_000, "n_genes": 200, "rounds": 1, "annloader_batches": 10},
))


# --- expression_pretrain_backed ------------------------------------------------------------------------------------

@dataclass
class PretrainBackedParams:
    """Settings of ``expression_pretrain_backed``: the synthetic file, the steps timed, the interleaved rounds."""

    n_obs: int = 200_000
    n_genes: int = 2_000
    density: float = 0.08
    batch_size: int | None = None  # None: the recipe's data.batch_size
    warmup: int = 30
    steps: int = 300
    rounds: int = 3

    def check(self) -> None:
        _check_positive(self, "n_obs", "n_genes", "batch_size", "warmup", "steps", "rounds")
        _check_density(self.density)


def run_pretrain_backed(task: Any, ctx: Context) -> TaskResult:
    import anndata as ad

    p: PretrainBackedParams = task.params
    load = _load_average()
    path = counts_file(ctx, p.n_obs, p.n_genes, p.density)
    info = describe_file(path)
    in_memory = ad.read_h5ad(path)  # the same matrix, whole in memory
    rows, ratio_rows, targets, raw = [], [], [], {"data": info}
    for spec in _recipes(task):
        config = bench_config(spec.config, ctx.device, p.batch_size, no_checkpoint_before=p.warmup + p.steps)
        _check_window(path, config, p.warmup, p.steps, "params.steps")
        runs: dict[str, list[dict[str, Any]]] = {"backed": [], "in_memory": []}
        for r in ctx.steps(range(p.rounds), desc=f"{spec.name}: backed / in memory"):
            for variant in ("backed", "in_memory") if r % 2 == 0 else ("in_memory", "backed"):
                data = path if variant == "backed" else in_memory
                runs[variant].append(pretrain_timed(copy.deepcopy(config), data, ctx.workdir / f"{spec.name}_{variant}",
                                                    p.warmup, p.steps))
        keys = ("steps_per_s", "cells_per_s", "fetch_share", "fetch_ms_per_step", "wall_s")
        med = {v: {k: statistics.median(run[k] for run in rs) for k in keys} for v, rs in runs.items()}
        same = all(a["first_batch_sum"] == b["first_batch_sum"] and np.isclose(a["loss"], b["loss"], rtol=1e-3)
                   for a, b in zip(runs["backed"], runs["in_memory"], strict=True))
        labels = {"backed": "streamed from the backed .h5ad", "in_memory": "the same AnnData in memory"}
        for variant, label in labels.items():
            rows.append({"recipe": spec.name, "data": label, "steps/s": med[variant]["steps_per_s"],
                         "cells/s": med[variant]["cells_per_s"], "loader share": med[variant]["fetch_share"],
                         "loader ms/step": med[variant]["fetch_ms_per_step"],
                         "steps/s per round": _rounds_text([r["steps_per_s"] for r in runs[variant]], ",.1f"),
                         "last loss": runs[variant][-1]["loss"], "whole run (s)": med[variant]["wall_s"]})
        ratio = med["backed"]["steps_per_s"] / med["in_memory"]["steps_per_s"]
        per_round = [a["steps_per_s"] / b["steps_per_s"] for a, b in zip(runs["backed"], runs["in_memory"],
                                                                          strict=True)]
        ratio_rows.append({"recipe": spec.name, "backed / in memory": ratio,
                           "per round": _rounds_text(per_round, ".3f"), "same batches": "yes" if same else "NO"})
        targets.append(Target(f"{spec.name}: backed / in-memory steps/s", ratio, 0.9))
        raw[spec.name] = {"runs": runs, "medians": med, "same_batches": same, "batch_size": config.data.batch_size,
                          "num_workers": config.data.num_workers, "accelerator": config.train.accelerator}
    batch = ", ".join(f"{spec.name} {raw[spec.name]['batch_size']}" for spec in task.recipes)
    notes = [
        f"Each run is sslcell.train.pretrain of the recipe for {p.warmup} + {p.steps} steps, once on the backed file "
        f"({info['n_obs']:,} x {info['n_genes']:,}, {info['density']:.2%} nonzero, int32 CSR, in the page cache) and "
        "once on the same matrix loaded whole as an in-memory AnnData: same seed, same genes, same block-shuffled "
        f"batches (batch size {batch}; 'same batches' checks the first batch's sum and the last loss). "
        f"{p.rounds} rounds, the order alternating. steps/s is timed from the end of step {p.warmup} to the end of "
        f"step {p.warmup + p.steps}, batch loading included; 'loader share' is the part of that time spent between "
        "one step's end and the next one's start (getting the batch), 'loader ms/step' the same time per step "
        "(less sensitive than steps/s to other work on a shared machine). 'whole run' adds the preparation pass over "
        "the data (gene statistics) and Lightning's start-up. No checkpoint is written inside the timed steps.",
        _load_note(load),
    ]
    return TaskResult(tables=[Table("Pretraining steps", list(rows[0]), rows),
                              Table("Backed / in memory, steps/s", list(ratio_rows[0]), ratio_rows)],
                      targets=targets, notes=notes, raw=raw)


register(TaskKind(
    name="expression_pretrain_backed", params=PretrainBackedParams, run=run_pretrain_backed,
    data_roles=(),  # makes its own data
    summary="pretraining steps/s streamed from a backed .h5ad against the same batches in memory (target 0.9x)",
    takes_recipes=True,
    modality="expression",
    quick={"n_obs": 3000, "n_genes": 200, "warmup": 3, "steps": 15, "rounds": 1},
))


# --- expression_memory ---------------------------------------------------------------------------------------------

@dataclass
class MemoryParams:
    """Settings of ``expression_memory``: the file, the pretraining steps, the embedding chunk size."""

    n_obs: int = 2_000_000
    n_genes: int = 2_000
    density: float = 0.08
    batch_size: int | None = None  # None: the recipe's data.batch_size
    warmup: int = 20
    steps: int = 300
    embed_batch_size: int | None = None  # None: tl.embed's default (4096 cells per chunk)

    def check(self) -> None:
        _check_positive(self, "n_obs", "n_genes", "batch_size", "warmup", "steps", "embed_batch_size")
        _check_density(self.density)


def run_memory(task: Any, ctx: Context) -> TaskResult:
    p: MemoryParams = task.params
    load = _load_average()
    reused, start = counts_path(ctx, p.n_obs, p.n_genes, p.density).exists(), time.perf_counter()
    path = counts_file(ctx, p.n_obs, p.n_genes, p.density)
    write_s = time.perf_counter() - start
    written = "reused from the scratch folder" if reused else f"written chunk-wise in {write_s:.0f} s"
    info = describe_file(path)
    rows, targets, raw = [], [], {"data": info, "write_s": None if reused else write_s}
    for spec in _recipes(task):
        config = bench_config(spec.config, ctx.device, p.batch_size)
        _check_window(path, config, p.warmup, p.steps, "params.steps")
        out = ctx.workdir / f"{spec.name}_run"
        n_steps = p.warmup + p.steps
        train = run_probe("pretrain", ctx.quick, path=str(path), recipe=config.to_dict(), out=str(out), warmup=p.warmup,
                          steps=p.steps, rss_every=max(1, n_steps // 6))
        emb = run_probe("embed", ctx.quick, path=str(path), model=str(out / "model"), batch_size=p.embed_batch_size,
                        device=_device_arg(ctx.device))
        if emb["embedding_shape"][0] != info["n_obs"] or not emb["finite"]:
            raise RuntimeError(f"embedding {emb['embedding_shape']} (finite: {emb['finite']}) for {info['n_obs']} "
                               "cells")
        rows += [
            {"recipe": spec.name, "run": f"pretrain, {n_steps} steps of {config.data.batch_size} cells",
             "RSS after imports (GB)": train["rss_imported_gb"], "peak RSS (GB)": train["peak_rss_gb"],
             "cells/s": train["cells_per_s"], "wall (s)": train["wall_s"]},
            {"recipe": spec.name, "run": f"tl.embed on the backed file, every cell ({emb['embedding_shape'][1]} dims)",
             "RSS after imports (GB)": emb["rss_imported_gb"], "peak RSS (GB)": emb["peak_rss_gb"],
             "cells/s": emb["cells_per_s"], "wall (s)": emb["wall_s"]},
        ]
        targets += [Target(f"{spec.name}: peak RSS, pretraining", train["peak_rss_gb"], MEMORY_LIMIT_GB,
                           higher_is_better=False, unit=" GB"),
                    Target(f"{spec.name}: peak RSS, embedding", emb["peak_rss_gb"], MEMORY_LIMIT_GB,
                           higher_is_better=False, unit=" GB")]
        raw[spec.name] = {"pretrain": train, "embed": emb, "num_workers": config.data.num_workers}
        rss = ", ".join(f"{gb:.2f} GB after step {step}" for step, gb in train["rss"])
        ctx.log(f"{spec.name}: pretraining peak {train['peak_rss_gb']:.2f} GB, embedding {emb['peak_rss_gb']:.2f} GB")
        raw[spec.name]["rss_during_steps"] = rss
    notes = [
        f"File: {info['n_obs']:,} x {info['n_genes']:,} synthetic counts, {info['density']:.2%} nonzero "
        f"({info['nnz']:,} values), int32 CSR .h5ad, uncompressed: {info['file_gb']:.2f} GB on disk "
        f"({written}); X loaded whole as float32 CSR "
        f"would take {info['x_csr_float32_gb']:.2f} GB.",
        f"Peak RSS is VmHWM of a fresh process (imports, the preparation pass over the file, model and optimiser "
        f"included), GB = 1e9 bytes. Pretraining: sslcell.train.pretrain on the file path for {p.warmup + p.steps} "
        "steps, enough for the loader to cycle through many buffers and for the model and optimiser to be warm; "
        "the loader keeps a fixed number of blocks whatever the file size, so a longer run reads more buffers of "
        "the same size. RSS sampled during the steps: "
        + "; ".join(f"{name}: {raw[name]['rss_during_steps']}" for name in (s.name for s in task.recipes))
        + ". Embedding: sslcell.tl.embed on read_h5ad(path, backed='r') with the model just trained (X read in "
        "chunks; the (N, D) float32 embedding and obs are held in memory). Loader workers (data.num_workers > 0) "
        "would run in other processes, not counted: the recipes here use "
        + ", ".join(f"{name} {raw[name]['num_workers']}" for name in (s.name for s in task.recipes)) + ".",
        _load_note(load),
        *_probe_note(ctx),
    ]
    columns = ["recipe", "run", "RSS after imports (GB)", "peak RSS (GB)", "cells/s", "wall (s)"]
    return TaskResult(tables=[Table("Peak memory on a backed file", columns, rows)], targets=targets, notes=notes,
                      raw=raw)


register(TaskKind(
    name="expression_memory", params=MemoryParams, run=run_memory,
    data_roles=(),  # makes its own data
    summary="peak RSS pretraining on (and embedding) a 2,000,000 x 2,000 .h5ad streamed from disk (target < 3 GB)",
    takes_recipes=True,
    modality="expression",
    quick={"n_obs": 20_000, "n_genes": 200, "warmup": 3, "steps": 20},
))


# --- expression_scaling --------------------------------------------------------------------------------------------

@dataclass
class ScalingParams:
    """Settings of ``expression_scaling``: the dataset sizes (at the recipe's batch size) and the batch sizes (on
    the first ``batch_axis_size`` cells) measured; every file is the first rows of the largest."""

    sizes: list[int] = field(default_factory=lambda: [10_000, 100_000, 1_000_000, 2_000_000])
    batch_sizes: list[int] = field(default_factory=lambda: [64, 256, 1024, 4096])
    batch_axis_size: int = 500_000
    n_genes: int = 2_000
    density: float = 0.08
    warmup: int = 10
    steps: int = 100

    def check(self) -> None:
        _check_positive(self, "sizes", "batch_sizes", "batch_axis_size", "n_genes", "warmup", "steps")
        _check_density(self.density)
        if self.batch_axis_size > max(self.sizes):
            raise ConfigError(f"batch_axis_size: {self.batch_axis_size} exceeds the largest of sizes "
                              f"({max(self.sizes)}); its file is the first rows of that one")


def run_scaling(task: Any, ctx: Context) -> TaskResult:
    p: ScalingParams = task.params
    load = _load_average()
    recipes = _recipes(task)
    largest = counts_file(ctx, max(p.sizes), p.n_genes, p.density)
    files = {n: counts_file(ctx, n, p.n_genes, p.density, prefix_of=largest) if n != max(p.sizes) else largest
             for n in sorted({*p.sizes, p.batch_axis_size})}
    measured: dict[tuple[str, int, int], dict[str, Any]] = {}  # (what, cells, batch size) -> probe result

    def measure(n_obs: int, batch_size: int | None) -> None:
        for i, spec in enumerate(recipes):
            config = bench_config(spec.config, ctx.device, batch_size, no_checkpoint_before=p.warmup + p.steps)
            b, d = config.data.batch_size, config.data
            if i == 0 and ("loader", n_obs, b) not in measured:  # the first recipe's loader settings
                measured["loader", n_obs, b] = run_probe(
                    "loader", ctx.quick, path=str(files[n_obs]), batch_size=b, block_size=d.block_size,
                    buffer_blocks=d.buffer_blocks, seed=ctx.seed)
            if (spec.name, n_obs, b) not in measured:
                _check_window(files[n_obs], config, p.warmup, p.steps, f"params (at {n_obs} cells, batch {b})")
                measured[spec.name, n_obs, b] = run_probe(
                    "pretrain", ctx.quick, path=str(files[n_obs]), recipe=config.to_dict(),
                    out=str(ctx.workdir / f"{spec.name}_{n_obs}_{b}"), warmup=p.warmup, steps=p.steps)

    points = [(n, None) for n in sorted(p.sizes)] + [(p.batch_axis_size, b) for b in sorted(p.batch_sizes)]
    for n_obs, batch_size in ctx.steps(points, desc="scaling points"):
        measure(n_obs, batch_size)
    recipe_batch = {spec.name: bench_config(spec.config, ctx.device).data.batch_size for spec in recipes}
    size_rows = _scaling_rows(measured, recipes, [(n, None) for n in sorted(p.sizes)], recipe_batch)
    batch_rows = _scaling_rows(measured, recipes, [(p.batch_axis_size, b) for b in sorted(p.batch_sizes)],
                               recipe_batch)
    plots = [_plot(size_rows, "cells", "cells in the file", ctx.out_dir / f"{ctx.prefix}_size.png"),
             _plot(batch_rows, "batch size", f"batch size (first {p.batch_axis_size:,} cells)",
                   ctx.out_dir / f"{ctx.prefix}_batch.png")]
    columns = ["cells", "batch size", "measured", "cells/s", "steps/s", "peak RSS (GB)", "wall (s)"]
    notes = [
        "Each point runs in a fresh process on synthetic counts (int32 CSR .h5ad in the page cache; every file is the "
        f"first rows of the {max(p.sizes):,}-cell one, {p.n_genes:,} genes, density {p.density}). 'loader': one epoch "
        "of BlockShuffleLoader with the recipe's block and buffer settings, peak RSS during that epoch. Pretraining: "
        f"sslcell.train.pretrain for {p.warmup} + {p.steps} steps, the last {p.steps} timed (batch loading "
        "included), peak RSS of the whole process (imports and the preparation pass over the file included); "
        "'wall' is the whole call. GB = 1e9 bytes.",
        _load_note(load),
        *_probe_note(ctx),
    ]
    return TaskResult(
        tables=[Table("Against dataset size (the recipe's batch size)", columns, size_rows),
                Table(f"Against batch size ({p.batch_axis_size:,} cells)", columns, batch_rows)],
        plots=[plot.name for plot in plots], notes=notes,
        raw={"points": [{"what": k[0], "cells": k[1], "batch_size": k[2], **v} for k, v in measured.items()],
             "files": {str(n): describe_file(f) for n, f in files.items()}})


def _scaling_rows(measured: dict, recipes: list[Any], points: list[tuple[int, int | None]],
                  recipe_batch: dict[str, int]) -> list[dict[str, Any]]:
    """One row per point and measurement: the loader (at the first recipe's batch size), then each recipe."""
    rows = []
    for n_obs, batch_size in points:
        batches = {spec.name: batch_size or recipe_batch[spec.name] for spec in recipes}
        for what, b in [("loader", batches[recipes[0].name]), *batches.items()]:
            m = measured[what, n_obs, b]
            loader = what == "loader"
            rows.append({"cells": n_obs, "batch size": b,
                         "measured": "loader (one epoch)" if loader else f"pretraining {what}",
                         "cells/s": m["cells_per_s"], "steps/s": m["cells_per_s"] / b,
                         "peak RSS (GB)": m["peak_rss_gb"], "wall (s)": None if loader else m["wall_s"]})
    return rows


def _plot(rows: list[dict[str, Any]], x: str, xlabel: str, path: Path) -> Path:
    """Two panels against ``x`` (log scale): cells/s and peak RSS, one line per ``measured``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    speed, memory = fig.subplots(1, 2)
    for what in dict.fromkeys(r["measured"] for r in rows):
        mine = [r for r in rows if r["measured"] == what]
        xs = [r[x] for r in mine]
        speed.plot(xs, [r["cells/s"] for r in mine], marker="o", label=what)
        memory.plot(xs, [r["peak RSS (GB)"] for r in mine], marker="o", label=what)
    memory.axhline(MEMORY_LIMIT_GB, color="grey", linestyle="--", label=f"{MEMORY_LIMIT_GB:g} GB (issue 14)")
    speed.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="cells/s")
    memory.set(xscale="log", xlabel=xlabel, ylabel="peak RSS (GB)", ylim=(0, None))
    for ax in (speed, memory):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return path


register(TaskKind(
    name="expression_scaling", params=ScalingParams, run=run_scaling,
    data_roles=(),  # makes its own data
    summary="loader and pretraining throughput and peak RSS against dataset size and batch size, with plots",
    takes_recipes=True,
    modality="expression",
    quick={"sizes": [2000, 4000], "batch_sizes": [32, 64], "batch_axis_size": 2000, "n_genes": 200, "warmup": 2,
           "steps": 5},
))
