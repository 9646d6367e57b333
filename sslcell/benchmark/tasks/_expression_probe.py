"""Fresh-process probes of the expression benchmarks, and the step timer they share with in-process runs.

A probe runs in its own Python process (:func:`run_probe`) so that only its own memory counts: it streams one
loader epoch, pretrains for a bounded number of steps, or embeds a backed file, and returns its peak resident
memory (``VmHWM`` of ``/proc/self/status``) and its timings. The process loads this file by path
(:func:`sslcell.benchmark.child.run_child`), not as a module of :mod:`sslcell.benchmark.tasks`, so that importing
the package (every task kind) does not add to what it measures.

Top-level imports are the standard library only: the package imports this module with every task kind.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

PRELOAD = ("sslcell.train",)  # torch, Lightning, anndata: what every probe imports (under --quick, imported once)
GB = 1e9  # memory is reported in decimal GB (the "3 GB"); 1 GB < 1 GiB, so the stricter reading


def run_probe(kind: str, preloaded: bool = False, **args: Any) -> dict[str, Any]:
    """Run probe ``kind`` (``loader``, ``pretrain`` or ``embed``) with keyword ``args`` in a fresh Python process
    (:func:`~sslcell.benchmark.child.run_child`); its JSON-able result. ``preloaded`` (``--quick``): fork it from a
    process that has imported ``PRELOAD`` once, ~0.2 s instead of ~10 s per probe, but a forked process counts the
    libraries' pages only as it touches them, so its memory figures are lower than a fresh process's."""
    from sslcell.benchmark.child import run_child

    with tempfile.TemporaryDirectory(prefix=f"sslcell_{kind}_probe_") as scratch:
        return run_child(f"{__name__}:probe", {"kind": kind, "args": args}, Path(scratch),
                         preload=PRELOAD if preloaded else ())


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    """The child's side of :func:`run_probe`: ``spec = {"kind": ..., "args": {...}}``."""
    return PROBES[spec["kind"]](**spec["args"])


def status_bytes(field: str) -> int:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); whether it could."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _step_timer_class() -> type:
    """:class:`StepTimer`, defined on first use so that this module imports without Lightning."""
    from pytorch_lightning.callbacks import Callback

    class StepTimer(Callback):
        """Times optimiser steps ``warmup + 1 .. warmup + steps`` of a Lightning run, batch loading included.

        The clock starts when step ``warmup`` ends and stops when step ``warmup + steps`` ends (CUDA synchronised at
        both), so every timed interval holds one batch fetch and one full step. ``fetch_s`` sums, over the timed
        steps, the time from one step's end to the next one's start: getting the next batch (on a GPU it overlaps
        kernels still running). ``loss`` is the last timed step's loss, ``first_batch_sum`` the sum of the first
        batch (both show that two runs saw the same batches). With ``rss_every`` the process's RSS is sampled every
        that many steps (``rss`` holds ``(step, bytes)``).
        """

        def __init__(self, warmup: int, steps: int, rss_every: int = 0) -> None:
            self.warmup, self.steps, self.rss_every = warmup, steps, rss_every
            self.done, self.fetch_s = 0, 0.0
            self.start: float | None = None
            self.stop: float | None = None
            self.loss: float | None = None
            self.first_batch_sum: float | None = None
            self.rss: list[tuple[int, int]] = []
            self._last_end: float | None = None

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            now = time.perf_counter()
            if self.start is not None and self.stop is None and self._last_end is not None:
                self.fetch_s += now - self._last_end
            if self.done == 0:
                self.first_batch_sum = float(batch.sum())

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.done += 1
            if self.done in (self.warmup, self.warmup + self.steps):
                if pl_module.device.type == "cuda":
                    import torch

                    torch.cuda.synchronize(pl_module.device)
                now = time.perf_counter()
                if self.done == self.warmup:
                    self.start = now
                else:
                    self.stop = now
                    self.loss = float(outputs["loss"])
            if self.rss_every and self.done % self.rss_every == 0:
                self.rss.append((self.done, status_bytes("VmRSS")))
            self._last_end = time.perf_counter()

        @property
        def seconds(self) -> float:
            if self.start is None or self.stop is None:
                raise RuntimeError(f"the run stopped after {self.done} steps, before warmup + steps = "
                                   f"{self.warmup + self.steps}")
            return self.stop - self.start

        def summary(self, batch_size: int) -> dict[str, float]:
            """steps/s and cells/s over the timed steps, the loader's share of their time and its milliseconds per
            step, the last loss."""
            return {"steps_per_s": self.steps / self.seconds, "cells_per_s": self.steps * batch_size / self.seconds,
                    "fetch_share": self.fetch_s / self.seconds, "fetch_ms_per_step": 1e3 * self.fetch_s / self.steps,
                    "timed_s": self.seconds, "loss": self.loss, "first_batch_sum": self.first_batch_sum}

    return StepTimer


def step_timer(warmup: int, steps: int, rss_every: int = 0) -> Any:
    """A :class:`StepTimer` callback (see :func:`_step_timer_class`)."""
    if warmup < 1 or steps < 1:
        raise ValueError(f"step_timer: warmup and steps must be >= 1, got {warmup}, {steps}")
    return _step_timer_class()(warmup, steps, rss_every)


def pretrain_timed(config: Any, data: Any, out: Path, warmup: int, steps: int, rss_every: int = 0) -> dict[str, Any]:
    """``sslcell.train.pretrain`` for ``warmup + steps`` steps on ``data`` (a path or an AnnData), the timed steps
    summarised (:meth:`StepTimer.summary`) with the whole call's seconds (``wall_s``, preparation pass included)."""
    import logging

    from sslcell.train import pretrain

    timer = step_timer(warmup, steps, rss_every)
    lightning = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric")]
    levels = [lg.level for lg in lightning]
    for lg in lightning:
        lg.setLevel(logging.WARNING)  # "GPU available: ..." on every run
    start = time.perf_counter()
    try:
        pretrain(config, data, out, overwrite=True, max_steps=warmup + steps, callbacks=[timer])
    finally:
        for lg, level in zip(lightning, levels, strict=True):
            lg.setLevel(level)
    result = timer.summary(config.data.batch_size) | {"wall_s": time.perf_counter() - start}
    result["rss"] = timer.rss
    return result


# --- the probes (each runs in a fresh process) -------------------------------------------------------------------

def probe_loader(path: str, batch_size: int, block_size: int, buffer_blocks: int, seed: int) -> dict[str, Any]:
    """One epoch of ``BlockShuffleLoader`` over ``path``: cells/s, and the peak RSS during it (``VmHWM`` reset to
    the RSS just before, so imports do not count) and its growth; then a second epoch under ``tracemalloc``."""
    import tracemalloc

    from sslcell.data.expression import ExpressionDataset
    from sslcell.data.loader import BlockShuffleLoader

    loader = BlockShuffleLoader(ExpressionDataset.open(path), batch_size=batch_size, block_size=block_size,
                                buffer_blocks=buffer_blocks, seed=seed)
    rss_before = status_bytes("VmRSS")
    was_reset = reset_peak()
    start, cells = time.perf_counter(), 0
    for batch in loader:
        cells += batch.shape[0]
    seconds = time.perf_counter() - start
    peak = status_bytes("VmHWM")
    loader.set_epoch(1)
    tracemalloc.start()
    sum(1 for _ in loader)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"n_obs": loader.dataset.n_obs, "batches": len(loader), "cells_per_s": cells / seconds,
            "rss_before_gb": rss_before / GB, "peak_rss_gb": peak / GB, "rss_growth_gb": (peak - rss_before) / GB,
            "hwm_was_reset": was_reset, "tracemalloc_peak_gb": traced_peak / GB}


def probe_pretrain(path: str, recipe: dict[str, Any], out: str, warmup: int, steps: int,
                   rss_every: int = 0) -> dict[str, Any]:
    """Pretrain ``recipe`` on the backed file ``path`` for ``warmup + steps`` steps (``sslcell.train.pretrain``, its
    preparation pass included); the whole process's peak RSS, the RSS before pretraining and the timed steps."""
    from sslcell.config import RecipeConfig
    from sslcell.train import pretrain  # noqa: F401  (imported before the baseline RSS is read)

    rss_imported = status_bytes("VmRSS")
    result = pretrain_timed(RecipeConfig.from_dict(recipe), path, Path(out), warmup, steps, rss_every)
    peak = status_bytes("VmHWM")
    return result | {"rss_imported_gb": rss_imported / GB, "peak_rss_gb": peak / GB,
                     "rss": [(step, rss / GB) for step, rss in result["rss"]]}


def probe_embed(path: str, model: str, batch_size: int | None, device: str | None) -> dict[str, Any]:
    """``sslcell.tl.embed`` of the backed file ``path`` (read chunk-wise) with the model in ``model``; the whole
    process's peak RSS, the RSS before embedding and cells/s."""
    import anndata as ad
    import numpy as np

    from sslcell.checkpoint import load
    from sslcell.tl import embed

    rss_imported = status_bytes("VmRSS")
    start = time.perf_counter()
    adata = ad.read_h5ad(path, backed="r")
    embed(adata, load(model), batch_size=batch_size, device=device)
    seconds = time.perf_counter() - start
    emb = adata.obsm["X_sslcell"]
    peak = status_bytes("VmHWM")
    return {"n_obs": int(adata.n_obs), "embedding_shape": list(emb.shape), "finite": bool(np.isfinite(emb).all()),
            "cells_per_s": adata.n_obs / seconds, "wall_s": seconds, "rss_imported_gb": rss_imported / GB,
            "peak_rss_gb": peak / GB, "embedding_gb": emb.nbytes / GB}


PROBES = {"loader": probe_loader, "pretrain": probe_pretrain, "embed": probe_embed}
