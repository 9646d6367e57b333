"""Command line: ``sslcell pretrain | embed | finetune | predict | evaluate | transfer | cell-cycle | benchmark |
quickstart``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from sslcell.errors import ConfigError, InputError, OverwriteError, RunInterrupted, SSLCellError, SSLCellWarning


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _show_sslcell_logs()
    default = warnings.formatwarning  # the format alone: filters, -W error and recorders stay the caller's
    warnings.formatwarning = _format_warning(args.command, default)
    try:
        return _run(args)
    finally:
        warnings.formatwarning = default


def _run(args: argparse.Namespace) -> int:
    try:
        return args.run(args) or 0
    except RunInterrupted as err:  # as a process killed by SIGTERM ends: 128 + 15
        stops_for_good = args.command in ("finetune", "cell-cycle")
        after = "; nothing was written (it does not resume): run it again" * stops_for_good
        print(f"sslcell {args.command}: {err}{after}".replace("resume=True (--resume)", "--resume"), file=sys.stderr)
        return 143
    except KeyboardInterrupt:  # Ctrl-C: no traceback; 128 + SIGINT, as the shell reports it
        print(f"sslcell {args.command}: interrupted{RESUMABLE.get(args.command, '')}", file=sys.stderr)
        return 130
    except (SSLCellError, OSError) as err:  # bad input, or the environment (missing file, full disk, permissions)
        print(f"sslcell {args.command}: error: {_as_cli(str(err), args.command)}", file=sys.stderr)
        return 2
    except SSLCellWarning as err:  # raised as an error: python -W error, PYTHONWARNINGS=error
        print(f"sslcell {args.command}: error: {_as_cli(str(err), args.command)} (a warning, raised as an error by "
              "the warnings filter)", file=sys.stderr)
        return 2


def _format_warning(command: str, default: Callable[..., str]) -> Callable[..., str]:
    """sslcell's warnings as ``sslcell <command>: warning: <message>``, flags named as on the command line (not the
    line of the console script they are attributed to); other libraries' warnings as ``default`` formats them."""

    def format_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001 (warnings' API)
        if issubclass(category, SSLCellWarning):
            return f"sslcell {command}: warning: {_as_cli(_named(str(message)), command)}\n"
        return default(message, category, filename, lineno, line)

    return format_warning


# how an interrupted command goes on
RESUMABLE = {"pretrain": "; run it again with --resume to continue from its last checkpoint",
             "benchmark": "; run it again with the same --workdir and --resume to keep the trainings it finished"}


# what each command offers for log-normalised data, where a library message names the Python argument
LOG_NORMALISED = {"embed": "--counts-are-log-normalized", "pretrain": "data.counts_are_log_normalized: true in the "
                  "recipe", "finetune": "--counts-are-log-normalized (or the raw counts: --layer)",
                  "predict": "--counts-are-log-normalized (or the raw counts: --layer)",
                  "transfer": "sslcell embed (--counts-are-log-normalized or --layer) first, then transfer without "
                              "--model"}


def _as_cli(message: str, command: str = "embed") -> str:
    """Library messages name Python arguments; on the command line, name the flags (``command``'s own)."""
    message = message.replace("open with counts_are_log_normalized=True", "open with " + LOG_NORMALISED.get(
        command, "the raw counts instead (--layer, e.g. --layer counts)"))
    if command == "pretrain":  # its label key is the recipe's data.label_key, not a flag
        message = message.replace("label_key", "data.label_key")
    for python, flag in (("resume=True (--resume)", "--resume"), ("overwrite=True (--overwrite)", "--overwrite"),
                         ("overwrite=True", "--overwrite"), ("key_added", "--key-added"),
                         ("counts_are_log_normalized=True", "--counts-are-log-normalized"),
                         ("max_missing_genes", "--max-missing-genes"), ("crops=cells", "--crops"),
                         ("unknown_label=", "--unknown-label "), ("unknown_label", "--unknown-label"),
                         ("min_confidence", "--min-confidence"), ("label_key=", "--label-key "),
                         ("label_key ", "--label-key "), ("(label_key)", "(--label-key)"), ("tta=False", "no --tta"),
                         ("channels=[...] / --channels", "--channels"), ("channels=... / --channels", "--channels"),
                         ("anchor_order", "--anchor-order"), ("anchor_key", "--anchor-key"),
                         ("reference_key", "--reference-key"), ("reference=", "--reference "),
                         ("baselines=()", "--baselines alone")):
        message = message.replace(python, flag)
    return " ".join(message.split())  # one line, whatever the wrapped error (YAML, HDF5) printed


def _show_sslcell_logs() -> None:
    """sslcell's INFO lines (progress, alignment reports) on stderr; other libraries' loggers are left alone."""
    log = logging.getLogger("sslcell")
    if not any(getattr(h, "_sslcell_cli", False) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._sslcell_cli = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(logging.INFO)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at each record (a test's capture, a redirect), not the one at creation."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Parser(argparse.ArgumentParser):
    """No abbreviated flags: ``finetune --layer counts`` was read as ``--layer-decay counts``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def _parser() -> argparse.ArgumentParser:
    from sslcell import __version__

    parser = _Parser(prog="sslcell", description="Self-supervised representation learning on single cells.")
    parser.add_argument("--version", action="version", version=f"sslcell {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("pretrain", help="pretrain an encoder without labels")
    p.add_argument("--config", required=True, help="recipe YAML, e.g. configs/expression_mae.yaml")
    p.add_argument("--data", required=True, nargs="+",
                   help=".h5ad file, folder of .h5ad shards or several files; crops: .npz, zarr or folder")
    p.add_argument("--channels", type=_channels, help="images: channels to train on, indices or names, e.g. 0,2")
    p.add_argument("--out", required=True, help="run directory (model in <out>/model)")
    p.add_argument("--max-epochs", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--devices", type=int, help="devices per node (several: DDP)")
    p.add_argument("--accelerator", help="cpu, gpu or auto (recipe default)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.set_defaults(run=_pretrain)

    p = sub.add_parser("embed", help="embed cells with a pretrained model into obsm")
    p.add_argument("--model", required=True, help="model or run directory")
    p.add_argument("--data", required=True, help="input .h5ad; crops: .npz, zarr or folder")
    p.add_argument("--out", required=True, help="output .h5ad (the input plus the embedding; for crops: obs + obsm)")
    p.add_argument("--key-added", "--key", dest="key", default="X_sslcell",
                   help="obsm key to write (default X_sslcell; --key is the old name)")
    p.add_argument("--layer", help="read counts from this layer instead of X")
    p.add_argument("--counts-are-log-normalized", action="store_true", help="input is already log1p-normalised")
    p.add_argument("--max-missing-genes", type=float,
                   help="largest share of the model's genes that may be missing (default 0.5; 1: any overlap)")
    p.add_argument("--channels", type=_channels, help="crops: channels to use (default: the model's, by name)")
    p.add_argument("--label-key", help="crops: npz/zarr array or obs.csv column with labels, kept as obs['label']")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--overwrite", action="store_true", help="replace --out and an existing obsm key")
    p.set_defaults(run=_embed)

    p = sub.add_parser("finetune", help="train a cell-type / fate classifier on labelled cells")
    p.add_argument("--model", required=True, help="pretrained model or run directory")
    p.add_argument("--data", required=True, help="labelled crops (.npz, zarr or folder) or, for expression, .h5ad")
    p.add_argument("--label-key", default="label",
                   help="expression: obs column with the labels (default: label); crops: npz/zarr array or obs.csv "
                        "column (default: a labels array, or class subfolders)")
    p.add_argument("--out", required=True, help="classifier directory")
    p.add_argument("--config", help="YAML with FinetuneConfig fields (flags below override it)")
    p.add_argument("--head", choices=["linear", "mlp", "full"],
                   help="linear probe or MLP on frozen embeddings, or full fine-tuning of encoder and head")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float, help="head learning rate (encoder: lr x encoder_lr_factor)")
    p.add_argument("--encoder-lr-factor", type=float, help="encoder learning rate = lr x this (0: frozen encoder)")
    p.add_argument("--layer-decay", type=float,
                   help="full, ViT: layer-wise rate decay, each layer below the top at this factor (e.g. 0.75)")
    p.add_argument("--drop-path", type=float, help="full, ViT: stochastic depth while fine-tuning (e.g. 0.1)")
    p.add_argument("--oversample", type=_oversample,
                   help="class balancing: true (equal classes), false (natural mix) or a power in [0, 1], e.g. 0.5")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--dropout", type=float, help="dropout before the head")
    p.add_argument("--hidden-dim", type=int, help="mlp head: width of the hidden layer")
    p.add_argument("--val-fraction", type=float,
                   help="hold out this share of labelled cells (stratified): best epoch kept, early stopping")
    p.add_argument("--patience", type=int, help="with --val-fraction: epochs without improvement before stopping")
    p.add_argument("--val-group-key",
                   help="with --val-fraction: obs column of groups (image, plate, donor); hold out whole groups")
    p.add_argument("--supcon-weight", type=float, help="mlp / full: add a supervised contrastive loss, this weight")
    p.add_argument("--seed", type=int)
    p.add_argument("--channels", type=_channels, help="channels to use (default: the model's, by name)")
    p.add_argument("--max-missing-genes", type=float,
                   help="expression: largest share of the model's genes that may be missing (default 0.5)")
    p.add_argument("--layer", help="expression: read the counts from this layer instead of X (e.g. counts)")
    p.add_argument("--counts-are-log-normalized", action="store_true",
                   help="expression: the input is already log1p-normalised")
    p.add_argument("--overwrite", action="store_true", help="replace an existing classifier in --out")
    p.set_defaults(run=_finetune)

    p = sub.add_parser("predict", help="predict classes of cells with a fine-tuned classifier")
    p.add_argument("--model", required=True, help="classifier directory (from sslcell finetune)")
    p.add_argument("--data", required=True, help="crops (.npz, zarr or folder) or, for expression, .h5ad")
    p.add_argument("--out", required=True,
                   help="output directory: predictions.h5ad, and metrics + plots with --label-key")
    p.add_argument("--label-key", help="obs column with true labels: writes metrics.json/.md and PNG plots")
    p.add_argument("--channels", type=_channels, help="channels to use (default: the model's, by name)")
    p.add_argument("--tta", action="store_true",
                   help="average the scores over each crop's flips and 90-degree turns (8 passes, or 4 if not square)")
    p.add_argument("--layer", help="expression: read the counts from this layer instead of X (e.g. counts)")
    p.add_argument("--counts-are-log-normalized", action="store_true",
                   help="expression: the input is already log1p-normalised")
    p.add_argument("--key-added", default="sslcell_pred",
                   help="obs / obsm keys of the predictions (default sslcell_pred: obs sslcell_pred, "
                        "sslcell_pred_confidence; obsm sslcell_pred_proba)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing files in --out and existing predictions under --key-added in --data")
    p.set_defaults(run=_predict)

    p = sub.add_parser("evaluate", help="score embeddings with kNN and logistic probes against baselines")
    p.add_argument("--data", required=True, help=".h5ad with labels in obs and embeddings in obsm")
    p.add_argument("--label-key", required=True)
    p.add_argument("--use-rep", nargs="+", default=["X_sslcell"], help="obsm keys to score")
    p.add_argument("--baselines", nargs="*",
                   help="pca (expression: PCA-50 of the counts; the default) or pixel_pca (crops: PCA-50 of the "
                        "pixels, needs --crops; the default with it); the flag alone: none")
    p.add_argument("--crops", help="crops (.npz, zarr or folder) of --data's rows, as `sslcell embed` read them: "
                   "for the pixel_pca baseline")
    p.add_argument("--n-neighbors", type=int, default=15, help="neighbours of the kNN probe")
    p.add_argument("--layer", help="counts layer for the baselines")
    p.add_argument("--n-per-class", type=int, default=5, help="labels per class in the few-label protocol")
    p.add_argument("--out", help="write <out>.json and <out>.md")
    p.add_argument("--overwrite", action="store_true", help="replace existing <out>.json and <out>.md")
    p.set_defaults(run=_evaluate)

    p = sub.add_parser("cell-cycle", help="place cells on a closed trajectory fitted through an embedding (theta)")
    p.add_argument("--data", required=True,
                   help=".h5ad with the representation in obsm; with --model or --recipe: crops (.npz, zarr, folder)")
    p.add_argument("--out", required=True, help="output .h5ad: obs cell_cycle_theta (and _phase with anchors); "
                   "with --model or --recipe: a folder (recipe/, cells.h5ad, cell_cycle.png)")
    p.add_argument("--model", help="DeepCycle recipe: fine-tune this pretrained image model on --channels to predict "
                   "pseudo-phases cut from --marker-channels, then fit the cycle")
    p.add_argument("--marker-channels", type=_channels, help="with --model: the marker channel(s) (1: quantiles; "
                   "2: G1 marker, S/G2/M marker, median grid)")
    p.add_argument("--channels", type=_channels, help="with --model / --recipe: the label-free channels")
    p.add_argument("--epochs", type=int, help="with --model: fine-tuning epochs")
    p.add_argument("--recipe", help="place new crops with a recipe saved by --model (markers not needed)")
    p.add_argument("--use-rep", help="obsm key of the representation (default: X_sslcell)")
    p.add_argument("--anchor-key", help="obs column of phase labels (NaN: unlabelled) fixing the origin and, with "
                   "three or more phases, the direction; every phase of --anchor-order needs labelled cells")
    p.add_argument("--anchor-order", type=lambda text: [t.strip() for t in text.split(",") if t.strip()],
                   help="the phases in cycle order, comma-separated, e.g. G1,S,G2,M")
    p.add_argument("--reference", help=".h5ad holding a cell-cycle fit (written by this command) of cells embedded "
                   "with the same model: place --data's cells on it, nothing refitted (e.g. cells all in one phase)")
    p.add_argument("--reference-key", help="the fit's key in --reference (default: cell_cycle)")
    p.add_argument("--key-added", help="obs/uns key of the fit (default: cell_cycle)")
    p.add_argument("--plot", help="also write pl.cell_cycle's figure to this PNG")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out and obs keys")
    p.set_defaults(run=_cell_cycle)

    p = sub.add_parser("transfer", help="label query cells from a labelled reference by nearest neighbours")
    p.add_argument("--reference", required=True,
                   help="labelled .h5ad (embedded, or embedded here with --model), or a reference folder saved by "
                        "--save-reference (or ReferenceIndex.save)")
    p.add_argument("--query", help=".h5ad to label (embedded, or embedded here with --model)")
    p.add_argument("--label-key", help="obs column of the reference with the labels (a saved reference knows it)")
    p.add_argument("--out", required=True, help="output .h5ad: the query with obs <label-key>_pred / _confidence")
    p.add_argument("--model", help="embed the .h5ad files first (else obsm[--use-rep] must exist)")
    p.add_argument("--use-rep", help="obsm key of the embeddings (default: X_sslcell, or a saved reference's)")
    p.add_argument("--n-neighbors", type=int, default=15)
    p.add_argument("--weights", choices=["distance", "uniform"], default="distance",
                   help="distance: votes weighted by 1 / distance (default); uniform: one vote per neighbour")
    p.add_argument("--min-confidence", type=float, default=0.0,
                   help="below this vote share the call is --unknown-label")
    p.add_argument("--unknown-label", default="unknown",
                   help="the call of cells below --min-confidence (default: unknown; a reference class of that name "
                        "is refused then)")
    p.add_argument("--class-weight", choices=["balanced"],
                   help="balanced: divide each class's votes by its share of the reference (rare types not outvoted)")
    p.add_argument("--index", choices=["auto", "exact", "ivf", "hnsw"], default="auto",
                   help="the kind of index built over an .h5ad reference (a saved reference keeps its own)")
    p.add_argument("--save-reference", metavar="DIR",
                   help="also save the index built over the .h5ad reference here, to label later queries with "
                        "--reference DIR without rebuilding it")
    p.add_argument("--leave-one-out", action="store_true",
                   help="no --query: label the reference's own cells, each left out of its own vote, and print the "
                        "accuracy and macro-F1 against its labels (--out: the reference with the calls)")
    p.add_argument("--key-added", help="the calls go to obs <key-added>_pred and _confidence (default: --label-key)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out, --save-reference and the query's obs <key-added>_pred (with "
                        "--model: the .h5ad files' obsm --use-rep)")
    p.set_defaults(run=_transfer)

    p = sub.add_parser("benchmark", help="run a benchmark suite (tasks x recipes x baselines x peers) and write tables")
    p.add_argument("suite", nargs="?", help="suite YAML, e.g. benchmarks/suites/crop_speed.yaml")
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds to minutes): checks that it all runs")
    p.add_argument("--out", help="folder for <suite>.md / .json / plots (default: the suite's out)")
    p.add_argument("--data", help="folder where the suite's relative data paths resolve (default: its data_dir)")
    p.add_argument("--only", nargs="+", metavar="TASK", help="run only these tasks of the suite")
    p.add_argument("--recipes", nargs="+", metavar="RECIPE",
                   help="run only these recipes (by name) of the tasks; their baselines and peers still run")
    p.add_argument("--workdir", help="keep models and scratch files here: a new or empty folder, or one an earlier "
                                      "run made (default: a temporary folder)")
    p.add_argument("--resume", action="store_true",
                   help="with --workdir: crop tasks read back the trainings an earlier (killed) run of the same "
                        "settings finished there instead of training them again, and go on with an unfinished "
                        "pretraining from its last checkpoint")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (tasks that train or embed)")
    p.add_argument("--list", action="store_true", help="list the task kinds, their parameters, baselines and peers")
    p.set_defaults(run=_benchmark)

    p = sub.add_parser("quickstart", help="pretrain, embed and evaluate on generated data, end to end")
    p.add_argument("--out", default="quickstart_out")
    p.add_argument("--max-epochs", type=int, default=None)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_quickstart)
    return parser


def _check_device(device: str) -> None:
    """Refuse a ``--device`` that is no device, or one this machine lacks, before any task runs."""
    if device == "auto":
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device: {device!r} is not a device; give auto, cpu, cuda or cuda:<index>")
    kind = parsed.type
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available on this machine; use cpu or auto")
    if kind == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device}: no MPS device is available on this machine; use cpu or auto")


def _benchmark(args: argparse.Namespace) -> int:
    from sslcell.benchmark import load_suite, run_suite
    from sslcell.benchmark.registry import describe_kinds

    if args.list:
        print(describe_kinds())
        return 0
    if not args.suite:
        raise SSLCellError("give a suite file (or --list to see the task kinds)")
    _check_device(args.device)
    suite = load_suite(args.suite, quick=args.quick, data_dir=args.data, out=args.out, only=args.only,
                       recipes=args.recipes)
    run = run_suite(suite, workdir=args.workdir, device=args.device, resume=args.resume)
    print(f"results: {run.markdown_path} (and {run.json_path.name})")
    for missed in run.targets_missed:
        print(f"target not met: {missed}")
    for task, message in run.errors.items():
        print(f"task {task} failed: {message}", file=sys.stderr)
    return 1 if run.errors else 0


def _channels(text: str) -> list[int | str]:
    """``"0,2"`` -> indices, ``"brightfield,darkfield"`` -> names: each item a name where the crops have a channel of
    that name, else an index (:class:`ChannelText`); ``name:X`` / ``index:N`` say which."""
    from sslcell.data.images import ChannelText

    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("give channel indices or names separated by commas, e.g. 0,2")
    channels: list[int | str] = []
    for item in items:
        kind, _, value = item.partition(":")
        if kind == "index" and value.isdigit():
            channels.append(int(value))
        elif kind in ("name", "index"):
            if not value:
                raise argparse.ArgumentTypeError(f"{item!r}: give the channel after {kind}:")
            if kind == "index":
                raise argparse.ArgumentTypeError(f"{item!r}: index: takes a whole number, e.g. index:0")
            channels.append(value)
        else:
            channels.append(ChannelText(item))
    return channels


def _pretrain(args: argparse.Namespace) -> int:
    from sslcell.config import load_config
    from sslcell.train import pretrain

    data = args.data[0] if len(args.data) == 1 else args.data
    pretrain(
        load_config(args.config),
        data,
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        max_epochs=args.max_epochs,
        max_steps=args.max_steps,
        devices=args.devices,
        accelerator=args.accelerator,
        channels=args.channels,
    )
    print(f"model written to {Path(args.out) / 'model'}")
    return 0


def _embed(args: argparse.Namespace) -> int:
    import anndata as ad
    import h5py

    from sslcell.checkpoint import read_model_config
    from sslcell.data.expression import ExpressionDataset
    from sslcell.tl import embed

    if read_model_config(args.model)["contract"]["modality"] == "image":
        return _embed_images(args)
    _refuse_flags(args, ("channels", "label_key"), "crops only; this model reads expression (labels stay in obs)")
    src, out = Path(args.data), _new_h5ad(args.out, args.overwrite, args.data)
    if src.is_dir():
        raise InputError(f"--data {src}: a folder; embed writes the input .h5ad with its embedding, so give one "
                         ".h5ad file (embed each shard on its own)")
    ExpressionDataset.open(src, layer=args.layer, counts_are_log_normalized=args.counts_are_log_normalized)  # validates
    adata = ad.read_h5ad(src, backed="r")
    embed(
        adata,
        args.model,
        key_added=args.key,
        layer=args.layer,
        counts_are_log_normalized=args.counts_are_log_normalized or None,
        batch_size=args.batch_size,
        max_missing_genes=args.max_missing_genes,
        overwrite=args.overwrite,
    )
    embedding, info = adata.obsm[args.key], adata.uns["sslcell"][args.key]
    adata.file.close()

    def copy_with_embedding(tmp: str) -> None:
        """The input file (X stays on disk, never loaded whole) with the embedding added."""
        shutil.copyfile(src, tmp)
        with h5py.File(tmp, "r+") as f:
            for group, key, value in (("obsm", args.key, embedding), ("uns", "sslcell", None)):
                f.require_group(group)
                if value is None:
                    old = ad.io.read_elem(f[group][key]) if key in f[group] else {}
                    value = {**old, args.key: info}
                if key in f[group]:
                    del f[group][key]
                ad.io.write_elem(f[group], key, value)
            neighbors = f"{args.key}_neighbors"  # what pl.umap computed from an earlier embedding under this key
            for group, key in (("obsm", f"{args.key}_umap"), ("uns", neighbors),
                               ("obsp", f"{neighbors}_connectivities"), ("obsp", f"{neighbors}_distances")):
                if group in f and key in f[group]:
                    del f[group][key]

    _write_atomically(out, copy_with_embedding)
    print(f"wrote {out}: obsm[{args.key!r}] {embedding.shape}")
    return 0


def _embed_images(args: argparse.Namespace) -> int:
    from sslcell.data.images import CellImages
    from sslcell.tl import embed_crops

    _refuse_flags(args, ("layer", "counts_are_log_normalized", "max_missing_genes"),
                  "not applicable to an image model; remove it")
    out = _new_h5ad(args.out, args.overwrite, args.data)
    cells = CellImages.read(args.data, label_key=args.label_key)
    adata = embed_crops(cells, args.model, key_added=args.key, channels=args.channels,
                        batch_size=min(args.batch_size, 1024))
    _write_h5ad(adata, out)
    labels = f", labels in obs['label'] (from {args.label_key!r})" if args.label_key and "label" in adata.obs else ""
    print(f"wrote {out}: {adata.n_obs} cells, obsm[{args.key!r}] {adata.obsm[args.key].shape}{labels}")
    return 0


def _oversample(text: str) -> bool | float:
    """``--oversample``: true / false or a power in [0, 1]."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected true, false or a number in [0, 1], got {text!r}") from None


def _finetune(args: argparse.Namespace) -> int:
    from sslcell.checkpoint import load
    from sslcell.classify import FinetuneConfig, finetune, save_classifier
    from sslcell.config import read_yaml

    out = _output_folder(Path(args.out), args.overwrite)
    values = {}
    if args.config:
        values = read_yaml(args.config)
    for name in ("head", "epochs", "lr", "encoder_lr_factor", "layer_decay", "drop_path", "oversample", "batch_size",
                 "dropout", "hidden_dim", "val_fraction", "patience", "supcon_weight", "seed"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    values.setdefault("progress_bar", sys.stderr.isatty())  # a bar in a terminal; one line an epoch in a log
    head = values.get("head", "full")
    if head != "full":  # before the settings' own check, which names the Python fields
        _refuse_flags(args, ("encoder_lr_factor", "layer_decay", "drop_path"), f"the {head} head trains on the "
                      "frozen encoder's embeddings; these shape the encoder's training (--head full)")
    config = FinetuneConfig.from_dict(values)
    if config.head != "mlp":
        _refuse_flags(args, ("hidden_dim",), f"the width of the mlp head's hidden layer, not the {config.head} head's")
    if not config.val_fraction:
        _refuse_flags(args, ("patience",), "stops training on a validation split; give --val-fraction too")
    model = load(args.model)
    if model.inputs.modality == "expression":
        # backed: the labelled cells' counts are read chunk-wise, and errors name the file
        classifier = finetune(_read_h5ad(args.data, backed="r"), model, args.label_key, config, channels=args.channels,
                              max_missing_genes=args.max_missing_genes, val_group_key=args.val_group_key,
                              layer=args.layer, counts_are_log_normalized=args.counts_are_log_normalized or None)
    else:
        _refuse_flags(args, ("layer", "counts_are_log_normalized"), "for expression models; this one reads crops, "
                      "remove it")
        cells = _read_labelled_crops(args.data, args.label_key)
        classifier = finetune(cells, model, "label", config, channels=args.channels,
                              max_missing_genes=args.max_missing_genes, val_group_key=args.val_group_key)
    save_classifier(classifier, out, overwrite=args.overwrite)
    print(f"classifier ({config.head}, {len(classifier.classes)} classes) written to {out}")
    return 0


def _read_labelled_crops(path: str, label_key: str | None):
    """Crops with their labels as ``obs['label']``: ``label_key`` names the npz / zarr array or ``obs.csv`` column;
    ``None``, or ``"label"`` where the crops hold no array or column of that name, reads their default labels (a
    ``labels`` array, class subfolders)."""
    from sslcell.data.images import CellImages

    try:
        return CellImages.read(path, label_key=label_key)
    except InputError as err:
        if label_key != "label" or not any(why in str(err) for why in ("not found", "no obs.csv", "not a column")):
            raise
    return CellImages.read(path, label_key=None)


def _predict(args: argparse.Namespace) -> int:
    import numpy as np

    from sslcell.classify import load_classifier
    from sslcell.classify.predict import METRIC_FILES, write_metrics
    from sslcell.data.labels import label_strings
    from sslcell.tl import predict, score

    out = _output_folder(Path(args.out), args.overwrite, empty=False)  # its own files are checked one by one
    target = out / "predictions.h5ad"
    # the metrics too when there are no labels: an earlier run's would sit beside these predictions (removed below)
    owned = [target, *(out / name for name in METRIC_FILES)]
    for path in owned:
        _new_file(path, args.overwrite)  # every file it would write, before any work
    classifier = load_classifier(args.model)
    key = args.key_added
    if classifier.inputs.modality == "image":
        _refuse_flags(args, ("layer", "counts_are_log_normalized"), "for expression classifiers; this one reads "
                      "crops, remove it")
        cells = _read_labelled_crops(args.data, args.label_key)
        label_key = None if args.label_key is None else "label"
        adata = cells.to_anndata()
        predict(adata, classifier, crops=cells, label_key=label_key, key_added=key, channels=args.channels,
                tta=args.tta, overwrite=args.overwrite)  # (aligns the crops, and warns, once)
    else:
        _refuse_flags(args, ("channels", "tta"), "for image classifiers; this one reads expression, remove them")
        adata, label_key = _read_h5ad(args.data), args.label_key
        with _naming(args.data):
            predict(adata, classifier, label_key=label_key, key_added=key, overwrite=args.overwrite, layer=args.layer,
                    counts_are_log_normalized=args.counts_are_log_normalized or None)
    out.mkdir(parents=True, exist_ok=True)
    for path in owned[1:]:
        path.unlink(missing_ok=True)  # --overwrite: no earlier run's plot left beside these metrics
    _write_h5ad(adata, target)
    print(f"wrote {target}: obs[{key!r}], obs['{key}_confidence'] and obsm['{key}_proba'] for {adata.n_obs} cells")
    if label_key is not None:
        report = score(adata, label_key, key)
        labelled = ~adata.obs[label_key].isna().to_numpy()
        truth = label_strings(adata.obs[label_key], f"obs[{label_key!r}]")[labelled]
        files = write_metrics(report, truth, np.asarray(adata.obsm[f"{key}_proba"])[labelled], out)
        print(report.to_markdown(title="Prediction metrics"))
        print("wrote " + ", ".join(str(f) for f in files))
    return 0


def _refuse_flags(args: argparse.Namespace, names: tuple[str, ...], why: str) -> None:
    """Raise naming the flags among ``names`` (argparse destinations) that were given but do not apply: ``why``."""
    given = [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) not in (None, False)]
    if given:
        raise InputError(f"{', '.join(given)}: {why}")


_NAMING: list[str] = []  # the files whose AnnData the command is working on, innermost last (see _naming)


@contextlib.contextmanager
def _naming(path: str) -> Iterator[None]:
    """Errors and warnings about an AnnData read into memory name its file instead of the library's
    ``<AnnData>``."""
    _NAMING.append(str(path))
    try:
        yield
    except (SSLCellError, SSLCellWarning) as err:  # a warning too: raised as an error by -W error
        if err.args and isinstance(err.args[0], str):
            err.args = (_named(err.args[0]), *err.args[1:])
        raise
    finally:
        _NAMING.pop()


def _named(message: str) -> str:
    """``message`` with the library's ``<AnnData>`` replaced by the file the innermost :func:`_naming` names."""
    from sslcell.data.shards import IN_MEMORY

    return message.replace(IN_MEMORY, _NAMING[-1]) if _NAMING else message


def _read_h5ad(path: str, backed: str | None = None):
    from sslcell.data.expression import read_h5ad

    return read_h5ad(path, backed)


def _new_h5ad(path: str, overwrite: bool, *inputs: str | None) -> Path:
    """``--out`` for an AnnData: a new ``.h5ad`` (``--overwrite`` replaces one), never one of the command's
    ``inputs``, checked before any work."""
    out = Path(path)
    for given in inputs:
        if given is not None and out.resolve() == Path(given).resolve():
            raise OverwriteError(f"{out}: is an input file; write to another path")
    if out.suffix.lower() != ".h5ad" and not out.is_dir():  # (a folder: _new_file says so)
        raise InputError(f"--out {out}: the output is an AnnData; give a path ending in .h5ad")
    return _new_file(out, overwrite)


def _new_file(path: Path, overwrite: bool) -> Path:
    if path.is_dir():
        raise OverwriteError(f"{path}: is a folder; give the path of the file to write")
    if path.exists() and not overwrite:
        raise OverwriteError(f"{path}: exists; pass --overwrite to replace it")
    return path


def _output_folder(path: Path, overwrite: bool, *, empty: bool = True, flag: str = "--out") -> Path:
    """``--out`` (or ``flag``) of a command that writes a folder, checked before any work: refused where it is a
    file, or (``empty``: the command replaces the folder's contents) holds files and ``overwrite`` is off."""
    if path.exists() and not path.is_dir():
        raise OverwriteError(f"{path}: is a file; {flag} names a folder to write into")
    if empty and path.exists() and any(path.iterdir()) and not overwrite:
        raise OverwriteError(f"{path}: is not empty; pass --overwrite to replace it or choose another --out")
    return path


def _write_h5ad(adata, path: Path) -> None:
    _write_atomically(path, adata.write_h5ad)


def _write_atomically(path: Path, write) -> None:
    """``checkpoint.atomic_write`` (an interrupted write never leaves half a file at ``path``, a failed one leaves
    no temporary file) into a created parent folder; errors name ``path``, not the temporary file."""
    from sslcell.checkpoint import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, write)
    except OSError as err:
        raise OSError(f"{path}: could not be written ({err.strerror or err})") from None


def _cell_cycle(args: argparse.Namespace) -> int:
    from sslcell.pl import cell_cycle as plot_cell_cycle
    from sslcell.pl._utils import png_path
    from sslcell.tl import cell_cycle

    if args.model or args.recipe:
        return _cell_cycle_crops(args)
    _refuse_flags(args, ("marker_channels", "channels", "epochs"), "these fit the DeepCycle recipe on crops; give "
                  "--model (or place crops with --recipe)")
    args.use_rep = args.use_rep or "X_sslcell"  # the .h5ad mode's defaults (None: the crops mode refuses them)
    args.key_added = args.key_added or "cell_cycle"
    args.reference_key = args.reference_key or "cell_cycle"
    out = _new_h5ad(args.out, args.overwrite, args.data, args.reference)
    if args.plot:
        _new_file(png_path(args.plot), args.overwrite)  # a new .png, checked before any work
    adata = _read_h5ad(args.data)
    reference = _read_h5ad(args.reference) if args.reference else None
    with _naming(args.data):
        cell_cycle(adata, args.use_rep, anchor_key=args.anchor_key, anchor_order=args.anchor_order,
                   reference=reference, reference_key=args.reference_key, key_added=args.key_added,
                   overwrite=args.overwrite)
    _write_h5ad(adata, out)
    info = adata.uns["sslcell"][args.key_added]
    if reference is not None:
        print(f"wrote {out}: obs['{args.key_added}_theta'] for {adata.n_obs} cells placed on {args.reference}'s fit; "
              f"their residual {info['projected_residual']:.2f}, they span {info['projected_closure']:.0%} of it")
        if args.plot:
            plot_cell_cycle(adata, key=args.key_added, path=args.plot)
        return 0
    if args.plot:
        plot_cell_cycle(adata, color=args.anchor_key, key=args.key_added, path=args.plot)
    print(f"wrote {out}: obs['{args.key_added}_theta'] for {adata.n_obs} cells; closure {info['closure']:.2f}"
          + (f" ({info['closure_unscaled']:.2f} without axis scaling)" if info.get("closure_unscaled") is not None
             else "")
          + f", residual {info['residual']:.2f}, explained variance {info['explained_variance']:.2f}"
          + (f", {info['anchor_accuracy']:.0%} of anchored cells in their phase's arc" if info["anchored"] else ""))
    return 0


def _cell_cycle_crops(args: argparse.Namespace) -> int:
    """DeepCycle on crops: fit a recipe (--model) or apply a saved one (--recipe); write a folder."""
    import pandas as pd

    from sslcell.cellcycle.recipe import CycleRecipe, fit_recipe
    from sslcell.checkpoint import load
    from sslcell.classify import FinetuneConfig
    from sslcell.data.images import CellImages
    from sslcell.pl import cell_cycle as plot_cell_cycle

    _refuse_flags(args, ("plot", "anchor_key", "anchor_order", "reference", "use_rep", "key_added", "reference_key"),
                  "these read an .h5ad of embeddings; with --model / --recipe the command writes its own folder "
                  "(cells.h5ad with obs cell_cycle_theta, cell_cycle.png)")
    if args.model and args.recipe:
        raise InputError(f"--model and --recipe: --model {args.model} fits a new recipe, --recipe {args.recipe} places "
                         "crops with a saved one; give one of them")
    out = _output_folder(Path(args.out), args.overwrite)
    cells = CellImages.read(args.data)
    if args.model:
        if not args.marker_channels:
            raise InputError("--model fits the DeepCycle recipe: give --marker-channels and the label-free --channels")
        values = {"progress_bar": sys.stderr.isatty(), **({"epochs": args.epochs} if args.epochs else {})}
        recipe, pseudo = fit_recipe(cells, load(args.model), args.marker_channels, args.channels,
                                    FinetuneConfig.from_dict(values),
                                    scheme="quantiles" if len(args.marker_channels) == 1 else "grid")
        recipe.save(out / "recipe", overwrite=args.overwrite)
    else:
        _refuse_flags(args, ("marker_channels", "epochs"), "these fit a new recipe (--model); --recipe places crops "
                      "with a saved one")
        recipe, pseudo = CycleRecipe.load(args.recipe), None
    adata = recipe.to_anndata(cells, args.channels)
    if pseudo is not None:
        adata.obs["pseudo_phase"] = pd.Categorical(pseudo, categories=recipe.info["order"])
    _write_h5ad(adata, out / "cells.h5ad")
    plot_cell_cycle(adata, color="pseudo_phase" if pseudo is not None else None, path=out / "cell_cycle.png")
    fit, placed = recipe.fit, adata.uns["sslcell"]["cell_cycle"]["projected_residual"]
    print(f"wrote {out}: {'recipe/, ' if args.model else ''}cells.h5ad (obs cell_cycle_theta, cell_cycle_phase), "
          f"cell_cycle.png; the recipe's cycle: closure {fit.closure:.2f}, residual {fit.residual:.2f}; these crops "
          f"lie at residual {placed:.2f} around it")
    return 0


def _transfer(args: argparse.Namespace) -> int:
    from sslcell.checkpoint import check_free_files, read_model_config
    from sslcell.tl import build_reference, embed, transfer_labels
    from sslcell.transfer.reference import FILES, ReferenceIndex

    saved = Path(args.reference).is_dir()
    _check_transfer_flags(args, saved)
    out = _new_h5ad(args.out, args.overwrite, args.reference, args.query)
    if args.save_reference:  # before any work
        folder = _output_folder(Path(args.save_reference), args.overwrite, empty=False, flag="--save-reference")
        check_free_files(folder, FILES, args.overwrite)
    if args.model and read_model_config(args.model)["contract"]["modality"] == "image":
        raise InputError(f"--model {args.model}: an image model reads crops, not these .h5ad files; embed the crops "
                         "first (sslcell embed --model ... --data crops.npz --out cells.h5ad) and pass the embedded "
                         "files as --reference / --query, without --model")
    if saved:
        reference = ReferenceIndex.load(args.reference)
        if args.index not in ("auto", reference.kind):
            raise InputError(f"--index {args.index}: the saved reference {args.reference} was built as "
                             f"{reference.kind!r}; --index chooses the kind built over an .h5ad reference")
        args.label_key = args.label_key or reference.label_key
        if args.label_key is None:  # saved before references kept their label column
            raise InputError(f"--label-key: required; the saved reference {args.reference} does not record which "
                             "obs column its labels came from")
        args.use_rep = args.use_rep or reference.use_rep
    else:
        reference = _read_h5ad(args.reference)
        args.use_rep = args.use_rep or "X_sslcell"
    query = reference if args.leave_one_out else _read_h5ad(args.query)
    if args.model:
        sides = [("--reference", args.reference, reference)] * (not saved)  # a saved reference holds no counts
        sides += [("--query", args.query, query)] * (not args.leave_one_out)  # (the query is the reference then)
        for flag, path, adata in sides:
            if args.use_rep in adata.obsm and not args.overwrite:
                raise OverwriteError(f"{flag} {path}: obsm[{args.use_rep!r}] holds an embedding already; pass "
                                     "--overwrite to replace it with --model's, or leave out --model to use it")
            with _naming(path):
                embed(adata, args.model, key_added=args.use_rep, overwrite=args.overwrite)
    built = build_reference(reference, args.label_key, args.use_rep, index=args.index) if args.save_reference else None
    transfer_labels(query, built if built is not None and not args.leave_one_out else reference, args.label_key,
                    args.use_rep, n_neighbors=args.n_neighbors, weights=args.weights, class_weight=args.class_weight,
                    min_confidence=args.min_confidence, unknown_label=args.unknown_label, index=args.index,
                    leave_one_out=args.leave_one_out, key_added=args.key_added, overwrite=args.overwrite)
    _write_h5ad(query, out)
    key = f"{args.key_added or args.label_key}_pred"
    info = query.uns["sslcell"][key]
    print(f"wrote {out}: obs['{key}'] for {query.n_obs} cells from {info['n_reference']} reference "
          f"cells ({info['index']} index, {info['n_unknown']} unknown)")
    if built is not None:
        built.save(args.save_reference, overwrite=args.overwrite)
        print(f"saved the reference index to {args.save_reference}: label later queries with --reference "
              f"{args.save_reference}")
    if args.leave_one_out:
        print(_leave_one_out_scores(query, args.label_key, key))
    return 0


def _check_transfer_flags(args: argparse.Namespace, saved: bool) -> None:
    """Refuse flag combinations ``sslcell transfer`` cannot honour, before any file is read."""
    if args.leave_one_out:
        _refuse_flags(args, ("query",), "--leave-one-out labels the reference's own cells; leave out --query")
        if saved:
            raise InputError(f"--reference {args.reference}: --leave-one-out labels the cells of a labelled .h5ad; "
                             "a saved reference holds no AnnData to write them to")
    elif args.query is None:
        raise InputError("--query: required (or --leave-one-out, to score the reference against its own labels)")
    if saved:
        _refuse_flags(args, ("save_reference",), f"--reference {args.reference} is a saved reference already")
    elif args.label_key is None:
        raise InputError("--label-key: required with an .h5ad --reference (the obs column with its labels)")


def _leave_one_out_scores(adata, label_key: str, pred_key: str) -> str:
    """One line: accuracy and macro-F1 of the leave-one-out calls against the labelled cells' own labels."""
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score

    from sslcell.data.labels import label_strings

    truth = label_strings(adata.obs[label_key], f"obs[{label_key!r}] of the reference")
    labelled = np.asarray([t is not None for t in truth])
    truth, pred = truth[labelled].astype(str), adata.obs[pred_key].astype(str).to_numpy()[labelled]
    f1 = f1_score(truth, pred, labels=np.unique(truth), average="macro")  # an 'unknown' call is a miss, not a class
    return (f"leave-one-out on {labelled.sum()} labelled cells: accuracy {accuracy_score(truth, pred):.3f}, "
            f"macro-F1 {f1:.3f}")


def _evaluate(args: argparse.Namespace) -> int:
    from sslcell.data.images import CellImages
    from sslcell.tl import evaluate

    outs = [_new_file(Path(f"{args.out}{suffix}"), args.overwrite) for suffix in (".json", ".md")] if args.out else []
    adata = _read_h5ad(args.data)
    crops = CellImages.read(args.crops) if args.crops else None
    with _naming(args.data):
        report = evaluate(adata, args.label_key, use_rep=args.use_rep, crops=crops,
                          baselines=None if args.baselines is None else tuple(args.baselines), layer=args.layer,
                          n_neighbors=args.n_neighbors, n_per_class=args.n_per_class)
    print(report.to_markdown())
    if outs:
        _write_atomically(outs[0], report.to_json)
        _write_atomically(outs[1], lambda path: Path(path).write_text(report.to_markdown()))
        print(f"wrote {outs[0]}, {outs[1]}")
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from sslcell.quickstart import quickstart

    quickstart(args.out, max_epochs=args.max_epochs, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
