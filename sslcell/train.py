"""Pretraining with Lightning: devices and DDP, precision, periodic atomic checkpoints, exact resume, logs.

A run directory holds::

    run.json                 recipe + input contract, written at the start (resume reads it back; a resume that
                             changes train settings records them)
    checkpoints/last.ckpt    full training state (weights, optimiser, schedule, loader position)
    model/                   the exported model (safetensors + config.json), refreshed at every checkpoint
    logs/version_N/          CSV (or TensorBoard) logs, one version per start or resume
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException

from sslcell.checkpoint import CARD, CONFIG, WEIGHTS, atomic_write, mismatched_tensors, save_model, versions
from sslcell.config import RecipeConfig
from sslcell.data.expression import ExpressionDataset
from sslcell.data.gene_stats import gene_statistics, select_highly_variable
from sslcell.data.image_loader import make_image_dataloader
from sslcell.data.images import CellImages, ChannelText
from sslcell.data.loader import make_dataloader
from sslcell.errors import (
    ConfigError,
    FileFormatError,
    GeneMismatchError,
    InputError,
    OverwriteError,
    RunInterrupted,
    SSLCellWarning,
)
from sslcell.methods import SSLModule, build_method
from sslcell.methods.contracts import Contract, ExpressionContract, ImageContract, contract_from_dict

log = logging.getLogger(__name__)
RUN_FILE = "run.json"
LAST = "last.ckpt"


def pretrain(
    config: RecipeConfig,
    data: Any,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    max_epochs: int | None = None,
    max_steps: int | None = None,
    devices: int | None = None,
    accelerator: str | None = None,
    channels: list[int | str] | None = None,
    callbacks: list[Callback] | None = None,
) -> SSLModule:
    """Pretrain an encoder on ``data`` without labels and write the run to ``out``.

    Args:
        config: the recipe (see ``configs/``).
        data: expression: an AnnData, an ``.h5ad`` path, a folder or list of ``.h5ad`` shards.
            images: :class:`CellImages`, or an ``.npz`` / zarr / crop-folder path.
        out: the run directory. An existing run is refused unless ``resume`` or ``overwrite``.
        resume: continue the run in ``out`` from its last checkpoint, with its recipe and genes or channels;
            ``config`` must be that recipe (its ``train`` settings but the seed, and ``data.num_workers``, may
            differ).
        max_epochs, max_steps, devices, accelerator: override the recipe's ``train`` settings.
        channels: images: the channels to train on (indices or names); overrides ``data.channels``.
        callbacks: extra Lightning callbacks (early stopping, monitors).

    Returns:
        The trained model (also saved in ``out/model``).
    """
    out = Path(out)
    spawned = _is_spawned_rank()
    given = _settings(config)  # the recipe's own train settings, before the overrides below
    run_record = None  # run.json of the run resumed
    if resume:
        stored, contract, run_record = _read_run(out)
        _check_same_recipe(config, stored, out)
        config = _resumed_recipe(stored, given, run_record.get("given"))
    else:
        config, contract = copy.deepcopy(config), None  # the overrides below never reach the caller's recipe
    if max_epochs is not None:
        config.train.max_epochs = max_epochs
    if max_steps is not None:
        config.train.max_steps = max_steps
    if devices is not None:
        config.train.devices = devices
    if accelerator is not None:
        config.train.accelerator = accelerator
    if channels is not None:
        if config.modality != "image":
            raise ConfigError("channels: crops only; an expression recipe reads genes (drop --channels)")
        if resume:
            raise ConfigError("channels: a resumed run keeps its channels; drop --channels")
        config.data.channels = [channels] if isinstance(channels, (str, int)) else list(channels)
    config.check()  # the overrides too, before anything in out is touched
    if not resume and not spawned:
        _check_new_run(out, overwrite)  # a previous run is removed only once the new data are read (in _fit)

    prepare = _prepare_images if config.modality == "image" else _prepare_expression
    dataset, contract = prepare(config, data, contract)
    try:
        return _fit(config, data, dataset, contract, out, callbacks or [], run_record=run_record, spawned=spawned,
                    given=given)
    finally:
        if isinstance(dataset, ExpressionDataset):
            dataset.close()  # the returned model keeps the trainer, and with it the loader: release the files


def _fit(config: RecipeConfig, data: Any, dataset: Any, contract: Contract, out: Path, callbacks: list,
         *, run_record: dict[str, Any] | None, spawned: bool, given: dict[str, Any]) -> SSLModule:
    """Build the model, trainer and loader over ``dataset`` and train (resuming from ``out``'s checkpoint when
    ``run_record``, the run's ``run.json``, is given)."""
    resume = run_record is not None
    pl.seed_everything(config.train.seed, workers=True, verbose=False)
    model = build_method(config, contract)
    trainer = _trainer(config, out, callbacks)
    pin_memory = trainer.accelerator.__class__.__name__ == "CUDAAccelerator"
    d = config.data
    if config.modality == "image":
        loader = make_image_dataloader(
            dataset, batch_size=d.batch_size, seed=config.train.seed, num_workers=d.num_workers, pin_memory=pin_memory
        )
    else:
        loader = make_dataloader(
            dataset,
            batch_size=d.batch_size,
            block_size=d.block_size,
            buffer_blocks=d.buffer_blocks,
            seed=config.train.seed,
            num_workers=d.num_workers,
            pin_memory=pin_memory,
        )
    len(loader.dataset)  # raises now, before the run directory is written, if the data cannot fill a batch
    if not spawned and not resume:
        _clear_run(out)  # --overwrite: the previous run goes only now that the new one's data and recipe are good
        out.mkdir(parents=True, exist_ok=True)
        _write_run(out, config, contract, data, dataset, given)
    ckpt = out / "checkpoints" / LAST
    if resume and not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: nothing to resume from (the run stopped before its first checkpoint)")
    if resume:
        _check_same_data(out, run_record, dataset, data)
        state = read_checkpoint(ckpt)  # a damaged checkpoint, or another run's, stops here: nothing written
        _check_checkpoint_fits(state, model, ckpt)
        _position_loader(loader.dataset, state)
        if not spawned:  # the settings a resume changed (max_epochs, say) hold for the next resume too
            _record_resumed_settings(out, run_record, config, given)
    try:
        fit_quietly(trainer, model, loader, ckpt_path=ckpt if resume else None, weights_only=True,
                    also=(".*resuming from a checkpoint that ended before the epoch ended.*",))
    except RunInterrupted:  # with where the checkpoint is, and how to go on
        raise RunInterrupted(f"{out}: stopped by SIGTERM at step {trainer.global_step} (epoch "
                             f"{trainer.current_epoch}), before the run's end; its checkpoint was written then: "
                             "continue it with resume=True (--resume)") from None
    if trainer.is_global_zero:
        save_model(model, out / "model", trained=_trained_info(trainer, dataset, data), overwrite=True)  # its own run
    return model


def read_checkpoint(ckpt: Path) -> dict[str, Any]:
    """A resume checkpoint's contents, loaded with ``weights_only=True`` (no code runs); a truncated, corrupt or
    code-carrying file is a :class:`FileFormatError` that says so."""
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's weights-only unpickler refused it: never retry unsafely
        raise FileFormatError(
            f"{ckpt}: refused: not a checkpoint sslcell wrote (corrupt, or holding objects other than tensors and "
            "plain data, whose loading could run code); start the run again with --overwrite"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as err:
        raise FileFormatError(f"{ckpt}: cannot read the checkpoint (truncated or corrupt: {err}); start the run "
                              "again with --overwrite") from None
    if not isinstance(state, dict):
        raise FileFormatError(f"{ckpt}: not an sslcell checkpoint (a {type(state).__name__})")
    return state


def _check_checkpoint_fits(state: dict[str, Any], model: torch.nn.Module, ckpt: Path) -> None:
    """Refuse a checkpoint that is not a Lightning checkpoint of this run's model (every tensor, of its shape):
    one copied from another run failed inside Lightning with a traceback."""
    weights = state.get("state_dict")
    if "pytorch-lightning_version" not in state or not isinstance(weights, dict):
        raise FileFormatError(f"{ckpt}: not a checkpoint of an sslcell run (no Lightning state); start the run again "
                              "with --overwrite")
    wrong, extra = mismatched_tensors(weights, model.state_dict())
    if wrong or extra:
        raise FileFormatError(f"{ckpt}: the checkpoint is of another model than this run's recipe builds (missing or "
                              f"misshapen {wrong[:3]}, unexpected {extra[:3]}); resume with the run's own checkpoint, "
                              "or start the run again with --overwrite")


def _position_loader(dataset: Any, checkpoint: dict[str, Any]) -> None:
    """Put the loader at the saved epoch and batch (``checkpoint``: as :func:`read_checkpoint` read it) before
    ``fit``: Lightning makes the epoch's iterator (and copies the loader into its workers) before any hook of a
    resumed run, so the hooks are too late for workers."""
    state = checkpoint.get("sslcell_loader") or {}
    epoch, done = int(state.get("epoch", 0)), int(state.get("batches_done", 0))
    if done >= len(dataset):
        epoch, done = epoch + 1, 0
    dataset.set_epoch(epoch)
    dataset.skip_batches(done)


def _prepare_images(
    config: RecipeConfig, data: Any, contract: ImageContract | None
) -> tuple[CellImages, ImageContract]:
    """Open the crops, select the channels and fix the channel spec and per-channel statistics (unless resuming)."""
    d = config.data
    if isinstance(data, (list, tuple)):
        raise InputError(f"crops: one .npz, zarr store or folder of crops per run, got {len(data)} paths; combine "
                         "them into one (e.g. one folder of crops)")
    cells = data if isinstance(data, CellImages) else CellImages.read(data, label_key=d.label_key)
    if contract is not None:
        return cells.select_channels(list(contract.channel_names)), contract
    if d.channels is not None:  # recorded in the model's recipe as names or indices, never as the CLI's text
        d.channels = [c.resolve(cells.channel_names) if isinstance(c, ChannelText) else c for c in d.channels]
        cells = cells.select_channels(d.channels)
    return cells, image_contract(cells, max_cells=d.stats_max_cells, seed=config.train.seed)


def image_contract(cells: CellImages, max_cells: int = 10000, seed: int = 0) -> ImageContract:
    """The input contract a model trained on ``cells`` fixes: channel names, per-channel mean / std (over at most
    ``max_cells`` crops, sampled with ``seed``), crop size and dtype."""
    stats = cells.channel_stats(max_cells=max_cells, seed=seed)
    return ImageContract(
        channel_names=tuple(cells.channel_names),
        channel_mean=tuple(stats["mean"]),
        channel_std=tuple(stats["std"]),
        image_size=tuple(int(s) for s in cells.shape[2:]),
        dtype=str(cells.dtype),
    )


def _prepare_expression(
    config: RecipeConfig, data: Any, contract: ExpressionContract | None
) -> tuple[ExpressionDataset, ExpressionContract]:
    """Open the data and fix the model's genes (highly variable genes of this data, unless resuming)."""
    d = config.data
    if contract is not None:
        dataset = ExpressionDataset.open(
            data, layer=d.layer, genes=list(contract.genes), counts_are_log_normalized=d.counts_are_log_normalized
        )
        return dataset, contract
    dataset = ExpressionDataset.open(data, layer=d.layer, counts_are_log_normalized=d.counts_are_log_normalized)
    if dataset.n_obs < max(d.batch_size, 2):
        raise InputError(
            f"{', '.join(map(str, dataset.sources))}: {dataset.n_obs} cell(s), fewer than one batch of {d.batch_size}: "
            "too few to pretrain on (lower data.batch_size, or pretrain on more cells)"
        )
    genes = [str(g) for g in dataset.genes]
    if d.n_top_genes is not None and d.n_top_genes < len(genes):
        genes = [str(g) for g in select_highly_variable(dataset, d.n_top_genes)]
        dataset = dataset.with_genes(genes)
        if len(genes) < d.n_top_genes:
            warnings.warn(f"data.n_top_genes={d.n_top_genes}, but only {len(genes)} genes vary in the pretraining "
                          f"cells: the model reads those {len(genes)}", SSLCellWarning, stacklevel=3)
    stats = gene_statistics(dataset, target_sum=d.target_sum)  # also refuses all-zero data
    if stats.attrs["n_empty_cells"]:
        warnings.warn(
            f"{stats.attrs['n_empty_cells']} of {stats.attrs['n_cells']} cells have no counts over the model's "
            f"{len(genes)} genes: they all give the model the same all-zero input (filter empty cells first)",
            SSLCellWarning, stacklevel=3,
        )
    silent = stats.index[stats["var_log1p"].to_numpy() == 0].tolist()
    if silent:
        warnings.warn(
            f"{len(silent)} of the model's {len(genes)} genes never vary in the pretraining cells (e.g. "
            f"{silent[:3]}): they carry nothing here (data.n_top_genes picks the variable genes)",
            SSLCellWarning, stacklevel=3,
        )
    mean = std = None
    if d.scale:
        mean = tuple(stats["mean_log1p"].astype(float).tolist())
        std = tuple(np.sqrt(stats["var_log1p"].to_numpy()).astype(float).tolist())
    contract = ExpressionContract(
        genes=tuple(genes),
        target_sum=d.target_sum,
        counts_are_log_normalized=d.counts_are_log_normalized,
        gene_mean=mean,
        gene_std=std,
    )
    return dataset, contract


def on_gpu(accelerator: str) -> bool:
    """Whether Lightning's ``accelerator`` setting puts training on a CUDA device."""
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


# Lightning warnings that ask nothing of the user (regular expressions matched against the message)
HARMLESS_WARNINGS = (
    ".*`IterableDataset` has `__len__` defined.*",  # our loaders shard by rank and worker themselves: exact
    ".*LeafSpec.* is deprecated.*",  # Lightning's own call of a torch API
    ".*is smaller than the logging interval.*",  # few batches an epoch (small data): nothing to change
)


class _NoAdverts(logging.Filter):
    """Drops Lightning's advertisement lines (the litlogger tip, logged when a Trainer is made) from its rank-zero
    INFO log; installed when this module is imported."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡")


_RANK_ZERO = logging.getLogger("pytorch_lightning.utilities.rank_zero")
if not any(isinstance(f, _NoAdverts) for f in _RANK_ZERO.filters):
    _RANK_ZERO.addFilter(_NoAdverts())


def fit_quietly(trainer: pl.Trainer, *args: Any, also: tuple[str, ...] = (), **kwargs: Any) -> None:
    """``trainer.fit(*args, **kwargs)`` without :data:`HARMLESS_WARNINGS` (and ``also``). A SIGTERM (``kill``, a
    scheduler's time limit) raises :class:`RunInterrupted`: Lightning ends the fit with a ``SystemExit`` without a
    code, so the process would exit 0 as if it had finished."""
    with warnings.catch_warnings():
        for message in (*HARMLESS_WARNINGS, *also):
            warnings.filterwarnings("ignore", message=message)
        try:
            trainer.fit(*args, **kwargs)
        except SIGTERMException:
            raise RunInterrupted(f"stopped by SIGTERM at step {trainer.global_step} (epoch {trainer.current_epoch}) "
                                 "of training, before its end") from None


def resolve_precision(accelerator: str, precision: str) -> str:
    """``precision="auto"``: bf16 mixed precision on a GPU, 32-bit on CPU; any other value is kept."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if on_gpu(accelerator) else "32-true"


def _trainer(config: RecipeConfig, out: Path, callbacks: list[Callback]) -> pl.Trainer:
    t = config.train
    accelerator = t.accelerator
    precision = resolve_precision(accelerator, t.precision)
    strategy = t.strategy
    if strategy == "auto" and t.devices * t.num_nodes > 1:
        strategy = "ddp"
    if t.logger == "csv":
        logger = CSVLogger(save_dir=str(out), name="logs")
    else:
        logger = TensorBoardLogger(save_dir=str(out), name="logs")
    return pl.Trainer(
        max_epochs=t.max_epochs if t.max_epochs > 0 else -1,
        max_steps=t.max_steps,
        accelerator=accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=precision,
        logger=logger,
        log_every_n_steps=t.log_every_n_steps,
        enable_checkpointing=False,  # RunCheckpoint below writes atomically and exports the model
        callbacks=[RunCheckpoint(out, every_n_steps=t.checkpoint_every_n_steps), *callbacks],
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        use_distributed_sampler=False,  # the block-shuffle loader shards by rank itself
    )


class RunCheckpoint(Callback):
    """Every ``every_n_steps`` optimiser steps and at each epoch's end: write ``checkpoints/last.ckpt``
    atomically and refresh ``model/``, so a killed run loses at most ``every_n_steps`` steps.

    With ``max_steps`` set, the epoch's checkpoint is written at its last batch's end instead: Lightning restores a
    checkpoint written at the epoch's end as an unfinished epoch then, and the resumed run trained one batch twice
    (and stopped an epoch early when ``max_epochs`` bound). Without it, the epoch's end: a run resumed from a
    last-batch checkpoint is restored with its next epoch's start uncounted, so a second resume in that epoch
    started it again (both cases are tested, kill after kill)."""

    def __init__(self, out: Path, every_n_steps: int) -> None:
        self.out = Path(out)
        self.every_n_steps = max(int(every_n_steps), 1)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: SSLModule, *args: Any) -> None:
        last = pl_module._batches_done >= trainer.num_training_batches
        if trainer.global_step % self.every_n_steps == 0 or (last and trainer.max_steps != -1):
            self._save(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: SSLModule) -> None:
        if trainer.max_steps == -1 and pl_module._batches_done >= trainer.num_training_batches:  # not a stop mid-epoch
            self._save(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: SSLModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):  # raised after a whole batch: a consistent state to resume
            self._save(trainer, pl_module)

    def _save(self, trainer: pl.Trainer, pl_module: SSLModule) -> None:
        directory = self.out / "checkpoints"
        tmp = directory / f".{LAST}.tmp"
        if trainer.is_global_zero:
            directory.mkdir(parents=True, exist_ok=True)
        trainer.strategy.barrier()
        try:
            trainer.save_checkpoint(tmp, weights_only=False)  # collective: every rank calls it, rank 0 writes
        except BaseException:
            if trainer.is_global_zero:
                tmp.unlink(missing_ok=True)  # a failed write (a full disk) leaves no partial checkpoint behind
            raise
        if trainer.is_global_zero:
            os.replace(tmp, directory / LAST)
            save_model(
                pl_module,
                self.out / "model",
                trained={"epoch": int(trainer.current_epoch), "global_step": int(trainer.global_step)},
                overwrite=True,  # the run's own model, refreshed at each checkpoint
            )
        trainer.strategy.barrier()


def _trained_info(trainer: pl.Trainer, dataset: ExpressionDataset | CellImages, data: Any) -> dict[str, Any]:
    return {
        "epochs": int(trainer.current_epoch),
        "global_step": int(trainer.global_step),
        "n_cells": _n_cells(dataset),
        "data": _describe(data),
        "world_size": int(trainer.world_size),
    }


def _describe(data: Any) -> Any:
    if isinstance(data, CellImages):
        return str(data.source)
    if isinstance(data, (str, Path)):
        return str(data)
    if isinstance(data, (list, tuple)):
        return [str(d) for d in data]
    return f"<{type(data).__name__}>"


def _check_new_run(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OverwriteError(f"{out}: is a file, not a run directory; choose another --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        if _sslcell_json(out / RUN_FILE, ("recipe", "contract")):
            raise OverwriteError(f"{out}: holds a previous run; pass resume=True (--resume) to continue it, "
                                 "overwrite=True (--overwrite) to replace it, or choose another output folder")
        raise OverwriteError(f"{out}: holds files that are not a run; choose another output folder, or pass "
                             "overwrite=True (--overwrite) to replace them")
    if out.is_dir() and overwrite:
        _refuse_foreign_files(out)


def _clear_run(out: Path) -> None:
    """Remove a previous run's own files (run record, checkpoint, model and their temp files) before a new run
    writes into ``out``, so a resume can never mix two runs. Every other file stays; ``logs/`` keeps its
    numbered versions."""
    _refuse_foreign_files(out)
    owned = [out / RUN_FILE, out / "checkpoints" / LAST, out / "checkpoints" / f".{LAST}.tmp",
             *(out / "model" / name for name in (WEIGHTS, CONFIG, CARD))]
    owned += [p for d in ("checkpoints", "model") if (out / d).is_dir() for p in (out / d).glob(".*")
              if p.name.startswith((f".{LAST}", f".{WEIGHTS}.", f".{CONFIG}."))]
    for path in owned:
        path.unlink(missing_ok=True)
    for folder in ("checkpoints", "model"):
        if (out / folder).is_dir() and not any((out / folder).iterdir()):
            (out / folder).rmdir()


def _refuse_foreign_files(out: Path) -> None:
    """Raise where ``out`` holds a run.json that is not an sslcell run's, or ``out/model`` a config.json or
    README.md that is not an sslcell model's: the run would write over them (weights alone are taken for a model
    killed while it was being written)."""
    model = out / "model"
    foreign = [] if _sslcell_json(model / CONFIG, ("format_version", "recipe", "contract")) else [
        model / name for name in (CONFIG, CARD) if (model / name).exists()]
    if (out / RUN_FILE).exists() and not _sslcell_json(out / RUN_FILE, ("recipe", "contract")):
        foreign.insert(0, out / RUN_FILE)
    if foreign:
        raise OverwriteError(f"{', '.join(map(str, foreign))}: not sslcell's, and the run writes its own files there "
                             "(overwrite replaces only sslcell's); move them, or choose another output folder")


def _sslcell_json(path: Path, keys: tuple[str, ...]) -> bool:
    """Whether ``path`` is a JSON object holding ``keys``: a file sslcell wrote (a run record, a model's config),
    not a user's file of the same name."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(value, dict) and all(key in value for key in keys)


def _write_run(out: Path, config: RecipeConfig, contract: Contract, data: Any,
               dataset: ExpressionDataset | CellImages, given: dict[str, Any]) -> None:
    payload = {
        "recipe": config.to_dict(),  # as run: overrides (--max-epochs ...) applied
        "given": given,  # the train settings of the recipe as given: a resume applies only what it changes
        "contract": contract.to_dict(),
        "data": _describe(data),
        "n_cells": _n_cells(dataset),
        "data_sample": _data_sample(dataset),
        "versions": versions(),
    }
    (out / RUN_FILE).write_text(json.dumps(payload, indent=1))


def _n_cells(dataset: ExpressionDataset | CellImages) -> int:
    return int(len(dataset) if isinstance(dataset, CellImages) else dataset.n_obs)


def _data_sample(dataset: ExpressionDataset | CellImages, n: int = 16) -> str:
    """SHA-256 of ``n`` evenly spaced cells as the run reads them (pixels of its channels, or counts on its
    genes): other cells as many as the run's are told apart from its own on resuming."""
    import hashlib

    total = _n_cells(dataset)
    rows = np.unique(np.linspace(0, total - 1, min(total, n)).round().astype(np.intp))
    digest = hashlib.sha256(str(total).encode())
    if isinstance(dataset, CellImages):
        digest.update(np.ascontiguousarray(dataset.batch(rows)).tobytes())
    else:
        for row in rows:
            x = dataset.read_rows(int(row), int(row) + 1).toarray().astype(np.float32)
            digest.update(x.tobytes())
    return digest.hexdigest()


def _check_same_data(out: Path, recorded: dict[str, Any], dataset: ExpressionDataset | CellImages,
                     data: Any) -> None:
    """Refuse to resume on other data than the run's (``recorded``: its run.json): another number of cells
    (another epoch, another order), or cells without some of the model's genes (it chose them from its own data,
    which hold them all)."""
    n, have = recorded.get("n_cells"), _n_cells(dataset)
    if n is not None and n != have:
        raise InputError(f"{out}: the run trained on {n} cells ({recorded.get('data')}); {_describe(data)} holds "
                         f"{have}: resume on the run's data, or start a new run (--out elsewhere)")
    alignment = getattr(dataset, "alignment", None)
    if alignment is not None and alignment.n_missing:
        raise GeneMismatchError(f"{out}: {alignment}: the run trained on all of its model's genes; resume on the "
                                "run's data, or start a new run")
    sample = recorded.get("data_sample")  # runs written before 0.2.0's last fixes have none
    if sample is not None and sample != _data_sample(dataset):
        raise InputError(f"{out}: {_describe(data)} holds other cells than the data the run trained on "
                         f"({recorded.get('data')}): a sample of {min(n or 16, 16)} cells differs; resume on the "
                         "run's data, or start a new run (--out elsewhere)")


def _settings(config: RecipeConfig) -> dict[str, Any]:
    """The settings a resume may change: ``train`` (but the seed) and ``data.num_workers``."""
    recipe = config.to_dict()
    return {"train": recipe["train"], "num_workers": recipe["data"]["num_workers"]}


def _resumed_recipe(stored: RecipeConfig, given: dict[str, Any], before: dict[str, Any] | None) -> RecipeConfig:
    """The run's recipe as it ran (its overrides included), with each setting of :func:`_settings` that the
    recipe a resume was given changes from the one the run was last given (``before``; older runs: as it ran)."""
    config = copy.deepcopy(stored)
    before = before or _settings(stored)
    for name, value in given["train"].items():
        if name != "seed" and value != before["train"].get(name):
            setattr(config.train, name, value)
    if given["num_workers"] != before["num_workers"]:
        config.data.num_workers = given["num_workers"]
    return config


def _record_resumed_settings(out: Path, recorded: dict[str, Any], config: RecipeConfig,
                             given: dict[str, Any]) -> None:
    """Rewrite ``run.json`` (``recorded``, as read) with the settings a resume runs, and the recipe it was given
    (atomically; not when nothing changed)."""
    ran = _settings(config)
    recipe = recorded["recipe"]
    if (recipe["train"], recipe["data"].get("num_workers")) == (ran["train"], ran["num_workers"]) \
            and recorded.get("given") == given:
        return
    recipe["train"] = ran["train"]
    recipe["data"]["num_workers"] = ran["num_workers"]
    payload = {**recorded, "given": given}
    atomic_write(out / RUN_FILE, lambda tmp: tmp.write_text(json.dumps(payload, indent=1)))


def _check_same_recipe(given: RecipeConfig, stored: RecipeConfig, out: Path) -> None:
    """Refuse to resume the run in ``out`` with another recipe (method, encoder, optimiser, data or seed): it
    would go on with the stored one. How long and where it trains, and how it logs, may differ."""
    a, b = given.to_dict(), stored.to_dict()
    changed = [] if a["modality"] == b["modality"] else ["modality"]
    for section in ("method", "encoder", "optim", "data", "train"):
        for name, value in b[section].items():
            free = section == "train" and name != "seed" or section == "data" and name in ("num_workers", "channels")
            if not free and a[section].get(name) != value:
                changed.append(f"{section}.{name} (the run's {value!r}, given {a[section].get(name)!r})")
    if changed:
        raise ConfigError(f"{out}: resuming with another recipe than the run's: {'; '.join(changed)}; resume with "
                          f"the recipe it started with (recorded in {out / RUN_FILE}), or start a new run")


def _read_run(out: Path) -> tuple[RecipeConfig, Contract, dict[str, Any]]:
    """The run in ``out``: its recipe, input contract and the whole ``run.json``."""
    path = out / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no run to resume in {out}")
    try:
        payload = json.loads(path.read_text())
        return RecipeConfig.from_dict(payload["recipe"]), contract_from_dict(payload["contract"]), payload
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, ConfigError) as err:
        raise FileFormatError(f"{path}: not a readable run record ({type(err).__name__}: {err}); the run cannot "
                              "be resumed (start it again with --overwrite)") from None


def _is_spawned_rank() -> bool:
    """True in the extra processes Lightning's DDP launcher starts (they re-run the same command)."""
    return int(os.environ.get("LOCAL_RANK", "0")) > 0 or int(os.environ.get("NODE_RANK", "0")) > 0
