"""Command line: ``sslcell pretrain | embed | evaluate | quickstart``."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from sslcell.errors import OverwriteError, SSLCellError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.run(args) or 0
    except (SSLCellError, FileNotFoundError, FileExistsError) as err:
        print(f"sslcell {args.command}: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslcell", description="Self-supervised representation learning on single cells.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain an encoder without labels")
    p.add_argument("--config", required=True, help="recipe YAML, e.g. configs/expression_mae.yaml")
    p.add_argument(
        "--data", required=True, nargs="+", help=".h5ad file, folder of .h5ad shards or several files; crops: .npz, zarr or folder"
    )
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
    p.add_argument("--data", required=True, help="input .h5ad")
    p.add_argument("--out", required=True, help="output .h5ad (the input plus the embedding)")
    p.add_argument("--key", default="X_sslcell", help="obsm key (default X_sslcell)")
    p.add_argument("--layer", help="read counts from this layer instead of X")
    p.add_argument("--counts-are-log-normalized", action="store_true", help="input is already log1p-normalised")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--overwrite", action="store_true", help="replace --out and an existing obsm key")
    p.set_defaults(run=_embed)

    p = sub.add_parser("evaluate", help="score embeddings with kNN and logistic probes against baselines")
    p.add_argument("--data", required=True, help=".h5ad with labels in obs and embeddings in obsm")
    p.add_argument("--label-key", required=True)
    p.add_argument("--use-rep", nargs="+", default=["X_sslcell"], help="obsm keys to score")
    p.add_argument("--baselines", nargs="*", default=["pca"], help="baselines computed from the counts (pca)")
    p.add_argument("--layer", help="counts layer for the baselines")
    p.add_argument("--n-per-class", type=int, default=5, help="labels per class in the few-label protocol")
    p.add_argument("--out", help="write <out>.json and <out>.md")
    p.set_defaults(run=_evaluate)

    p = sub.add_parser("quickstart", help="pretrain, embed and evaluate on generated data, end to end")
    p.add_argument("--out", default="quickstart_out")
    p.add_argument("--max-epochs", type=int, default=None)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_quickstart)
    return parser


def _channels(text: str) -> list[int | str]:
    """``"0,2"`` -> ``[0, 2]``; ``"brightfield,darkfield"`` -> names."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("give channel indices or names separated by commas, e.g. 0,2")
    return [int(item) if item.lstrip("-").isdigit() else item for item in items]


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

    from sslcell.data.expression import ExpressionDataset
    from sslcell.tl import embed

    src, out = Path(args.data), Path(args.out)
    if out.exists() and not args.overwrite:
        raise OverwriteError(f"{out}: exists; pass --overwrite to replace it")
    if out.resolve() == src.resolve():
        raise OverwriteError(f"{out}: is the input file; write to another path")
    ExpressionDataset.open(src, layer=args.layer, counts_are_log_normalized=args.counts_are_log_normalized)  # validates
    adata = ad.read_h5ad(src, backed="r")
    embed(
        adata,
        args.model,
        key_added=args.key,
        layer=args.layer,
        counts_are_log_normalized=args.counts_are_log_normalized or None,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
    )
    embedding, info = adata.obsm[args.key], adata.uns["sslcell"][args.key]
    adata.file.close()
    # copy the input file (X stays on disk, never loaded whole), then add the embedding to the copy
    tmp = out.with_name(f".{out.name}.tmp")
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
    tmp.replace(out)
    print(f"wrote {out}: obsm[{args.key!r}] {embedding.shape}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import anndata as ad

    from sslcell.evaluate import evaluate

    adata = ad.read_h5ad(args.data)
    report = evaluate(
        adata,
        args.label_key,
        use_rep=args.use_rep,
        baselines=tuple(args.baselines),
        layer=args.layer,
        n_per_class=args.n_per_class,
    )
    print(report.to_markdown())
    if args.out:
        report.to_json(f"{args.out}.json")
        Path(f"{args.out}.md").write_text(report.to_markdown())
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from sslcell.quickstart import quickstart

    quickstart(args.out, max_epochs=args.max_epochs, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
