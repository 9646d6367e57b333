"""Speed and memory of sslcell's out-of-core expression loader against two peers, in one run.

All three produce shuffled dense float32 ``(256, G)`` torch batches from the same count matrix
(default: 200,000 cells x 2,000 genes, ~8% nonzero, integer counts in an uncompressed CSR ``.h5ad``,
as anndata writes it by default), in one process each, timed in interleaved rounds (median reported):

* (a) sslcell: ``BlockShuffleLoader(ExpressionDataset.open(path))`` on the backed file, one full epoch.
* (b) anndata: ``AnnLoader(read_h5ad(path, backed="r"), batch_size=256, shuffle=True)``, a bounded
  number of batches (it reads every batch row by row from the file, so it is slow).
* (c) in memory: the matrix loaded whole as float32 scipy CSR; random batches ``X[idx]`` densified
  to a float32 tensor, one epoch's worth.

Targets: (a)/(b) >= 20 and (a)/(c) >= 0.5. The file lies in the OS page cache (it was just written,
or is read once before timing), so this measures the loader, not the disk. For information, (a) also
runs through ``make_dataloader(num_workers=2)``.

Memory: a fresh subprocess streams one full epoch over a file of N/2 rows and one of N rows and
reports its peak RSS growth (VmHWM after - VmRSS before, from /proc/self/status) and the peak of
Python-level allocations (tracemalloc). Target: the growth does not follow the file size.

    python benchmarks/bench_loader.py --n-obs 200000 --n-genes 2000 --density 0.08 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from sslcell.data.expression import ExpressionDataset
from sslcell.data.loader import BlockShuffleLoader, make_dataloader

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 2**20


def make_counts(n_obs: int, n_genes: int, density: float, seed: int) -> sp.csr_matrix:
    """``(n_obs, n_genes)`` int32 CSR: gene-specific detection rates averaging ``density``, geometric counts."""
    rng = np.random.default_rng(seed)
    rate = rng.lognormal(0.0, 0.8, n_genes)
    rate = np.clip(density * rate / rate.mean(), 0.0, 0.9)
    parts = []
    for start in range(0, n_obs, 10_000):
        n = min(10_000, n_obs - start)
        rows, cols = np.nonzero(rng.random((n, n_genes), dtype=np.float32) < rate)
        values = rng.geometric(0.4, rows.size).astype(np.int32)
        parts.append(sp.csr_matrix((values, (rows, cols)), shape=(n, n_genes)))
    return sp.vstack(parts, format="csr")


def write_h5ad(matrix: sp.csr_matrix, path: Path) -> None:
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(matrix.shape[0])])
    var = pd.DataFrame(index=[f"gene{j}" for j in range(matrix.shape[1])])
    ad.AnnData(matrix, obs=obs, var=var).write_h5ad(path)  # anndata defaults: CSR, no compression


def time_sslcell(path: Path, args, epoch: int) -> float:
    loader = BlockShuffleLoader(
        ExpressionDataset.open(path), batch_size=args.batch_size, block_size=args.block_size,
        buffer_blocks=args.buffer_blocks, seed=args.seed,
    )  # fmt: skip
    loader.set_epoch(epoch)
    n, start = 0, time.perf_counter()
    for batch in loader:
        n += batch.shape[0]
    return n / (time.perf_counter() - start)


def time_sslcell_workers(path: Path, args, epoch: int) -> float:
    loader = make_dataloader(
        ExpressionDataset.open(path), batch_size=args.batch_size, block_size=args.block_size,
        buffer_blocks=args.buffer_blocks, seed=args.seed, num_workers=2,
    )  # fmt: skip
    loader.dataset.set_epoch(epoch)
    iterator = iter(loader)
    n = next(iterator).shape[0]  # worker start-up not counted
    start = time.perf_counter()
    for batch in iterator:
        n += batch.shape[0]
    return (n - args.batch_size) / (time.perf_counter() - start)


def time_annloader(path: Path, args) -> float:
    from anndata.experimental import AnnLoader

    adata = ad.read_h5ad(path, backed="r")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        iterator = iter(AnnLoader(adata, batch_size=args.batch_size, shuffle=True))
        next(iterator)
        n, start = 0, time.perf_counter()
        for _ in range(args.annloader_batches):
            n += next(iterator).X.float().shape[0]  # int32 counts in the file: float32 like the others
    elapsed = time.perf_counter() - start
    adata.file.close()
    return n / elapsed


def time_in_memory(matrix: sp.csr_matrix, args, epoch: int) -> float:
    order = np.random.default_rng([args.seed, epoch]).permutation(matrix.shape[0])
    n, start = 0, time.perf_counter()
    for i in range(0, matrix.shape[0] - args.batch_size + 1, args.batch_size):
        batch = torch.from_numpy(matrix[order[i : i + args.batch_size]].toarray())
        n += batch.shape[0]
    return n / (time.perf_counter() - start)


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def memory_probe(path: Path, args) -> dict:
    """Run in a fresh process: peak memory while streaming one epoch over ``path``."""
    loader = BlockShuffleLoader(
        ExpressionDataset.open(path), batch_size=args.batch_size, block_size=args.block_size,
        buffer_blocks=args.buffer_blocks, seed=args.seed,
    )  # fmt: skip
    rss_before = _status("VmRSS")
    try:  # reset the peak to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    n_batches = sum(1 for _ in loader)
    hwm_after = _status("VmHWM")
    tracemalloc.start()
    sum(1 for _ in loader)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "n_obs": loader.dataset.n_obs, "batches": n_batches, "rss_before_mib": rss_before / MiB,
        "hwm_after_mib": hwm_after / MiB, "rss_growth_mib": (hwm_after - rss_before) / MiB,
        "hwm_was_reset": reset, "tracemalloc_peak_mib": traced_peak / MiB,
    }  # fmt: skip


def run_probe(path: Path, args) -> dict:
    command = [sys.executable, __file__, "--memory-probe", str(path), "--batch-size", str(args.batch_size),
               "--block-size", str(args.block_size), "--buffer-blocks", str(args.buffer_blocks),
               "--seed", str(args.seed)]  # fmt: skip
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:  # sslcell run from a source tree
        return getattr(sys.modules.get(package), "__version__", "source tree")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory_gib,
            "os": platform.platform(), "python": platform.python_version()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", type=Path, help="an existing .h5ad to read (default: generate one in a temp dir)")
    parser.add_argument("--n-obs", type=int, default=200_000)
    parser.add_argument("--n-genes", type=int, default=2_000)
    parser.add_argument("--density", type=float, default=0.08)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--buffer-blocks", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--annloader-batches", type=int, default=100)
    parser.add_argument("--out", type=Path, default=RESULTS / "loader", help="writes OUT.md and OUT.json")
    parser.add_argument("--memory-probe", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe is not None:
        print(json.dumps(memory_probe(args.memory_probe, args)))
        return

    started = time.perf_counter()
    command = "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:])
    load_start = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        tmp = Path(tmp)
        if args.path is None:
            matrix = make_counts(args.n_obs, args.n_genes, args.density, args.seed)
            path = tmp / "counts.h5ad"
            write_h5ad(matrix, path)
            source = f"generated: {args.n_obs} x {args.n_genes}, density {args.density}, seed {args.seed}"
        else:
            path = args.path
            matrix = sp.csr_matrix(ad.read_h5ad(path).X)
            source = str(path)
        half = tmp / "half.h5ad"
        write_h5ad(matrix[: matrix.shape[0] // 2], half)
        in_memory = matrix.astype(np.float32)
        n_obs, n_genes = matrix.shape
        file_mib = path.stat().st_size / MiB
        density = matrix.nnz / (n_obs * n_genes)
        print(f"data: {source}; {n_obs} x {n_genes}, {density:.3%} nonzero, {file_mib:.0f} MiB on disk", flush=True)

        time_sslcell(path, args, epoch=999)  # warm the page cache (and code paths), not timed
        rounds = {"sslcell": [], "annloader": [], "in_memory": [], "sslcell_2_workers": []}
        for r in range(args.rounds):
            rounds["sslcell"].append(time_sslcell(path, args, epoch=r))
            rounds["in_memory"].append(time_in_memory(in_memory, args, epoch=r))
            rounds["annloader"].append(time_annloader(path, args))
            rounds["sslcell_2_workers"].append(time_sslcell_workers(path, args, epoch=r))
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]:,.0f} cells/s" for k, v in rounds.items()), flush=True)
        medians = {k: statistics.median(v) for k, v in rounds.items()}

        probes = [run_probe(half, args), run_probe(path, args)]
        x_bytes = [in_memory[: p["n_obs"]].data.nbytes + in_memory[: p["n_obs"]].indices.nbytes for p in probes]
    for probe, size in zip(probes, x_bytes, strict=True):
        probe["x_csr_float32_mib"] = size / MiB

    ratio_b = medians["sslcell"] / medians["annloader"]
    ratio_c = medians["sslcell"] / medians["in_memory"]
    growth_delta = probes[1]["rss_growth_mib"] - probes[0]["rss_growth_mib"]
    x_delta = probes[1]["x_csr_float32_mib"] - probes[0]["x_csr_float32_mib"]
    targets = {
        "(a)/(b) >= 20": ratio_b >= 20,
        "(a)/(c) >= 0.5": ratio_c >= 0.5,
        "peak RSS growth at N rows - at N/2 rows < 25% of the X size difference": growth_delta < 0.25 * x_delta,
    }
    result = {
        "command": command, "machine": machine(),
        "load_average_start_end": [load_start, [round(x, 2) for x in os.getloadavg()]],
        "versions": {p: _version(p) for p in ("sslcell", "numpy", "scipy", "h5py", "anndata", "torch")},
        "data": {"source": source, "n_obs": n_obs, "n_genes": n_genes, "density": density,
                 "file_mib": file_mib},
        "settings": {k: getattr(args, k)
                     for k in ("seed", "batch_size", "block_size", "buffer_blocks", "rounds", "annloader_batches")},
        "cells_per_s_rounds": rounds, "cells_per_s_median": medians,
        "ratios": {"(a)/(b) sslcell / AnnLoader": ratio_b, "(a)/(c) sslcell / in-memory CSR": ratio_c},
        "ratios_per_round": {
            "(a)/(b) sslcell / AnnLoader": [a / b for a, b in zip(rounds["sslcell"], rounds["annloader"], strict=True)],
            "(a)/(c) sslcell / in-memory CSR": [a / c for a, c in
                                                zip(rounds["sslcell"], rounds["in_memory"], strict=True)],
        },
        "memory": probes, "targets": {k: "PASS" if v else "MISS" for k, v in targets.items()},
        "wall_s": time.perf_counter() - started,
    }  # fmt: skip
    write_results(result, args.out)


def write_results(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    m, s, med = result["machine"], result["settings"], result["cells_per_s_median"]
    rounds = result["cells_per_s_rounds"]
    rows = [
        ("(a) sslcell BlockShuffleLoader, backed file, 1 process", "sslcell"),
        ("(b) anndata AnnLoader, backed file, shuffle=True", "annloader"),
        ("(c) in-memory scipy CSR, X[idx] -> dense tensor", "in_memory"),
        ("(a') sslcell make_dataloader(num_workers=2), for information", "sslcell_2_workers"),
    ]
    lines = [
        "# Expression loader benchmark", "",
        f"Command: `{result['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}, Python {m['python']}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + "  ",
        f"Load average (1/5/15 min) at start {result['load_average_start_end'][0]}, "
        f"at end {result['load_average_start_end'][1]} "
        "(a shared machine: other work ran at the same time; rounds are interleaved so all sides share it)  ",
        f"Data: {result['data']['source']}; {result['data']['n_obs']:,} x {result['data']['n_genes']:,}, "
        f"{result['data']['density']:.2%} nonzero, integer counts, CSR, uncompressed  ",
        f"Settings: batch {s['batch_size']}, block {s['block_size']}, buffer {s['buffer_blocks']} blocks, "
        f"seed {s['seed']}, {s['rounds']} rounds, AnnLoader timed over {s['annloader_batches']} batches per round; "
        "dense float32 batches everywhere",
        "", "| loader | cells/s (median) | rounds |", "|---|---:|---|",
    ]  # fmt: skip
    for label, key in rows:
        lines.append(f"| {label} | {med[key]:,.0f} | {', '.join(f'{v:,.0f}' for v in rounds[key])} |")
    lines += ["", "| ratio | of medians | per round |", "|---|---:|---|"]
    per_round = result["ratios_per_round"]
    lines += [f"| {k} | {v:.2f} | {', '.join(f'{r:.2f}' for r in per_round[k])} |" for k, v in result["ratios"].items()]
    lines += ["", "Peak memory while streaming one full epoch (fresh process per file):", "",
              "| rows | batches | RSS before (MiB) | peak RSS growth (MiB) | tracemalloc peak (MiB) "
              "| X as float32 CSR (MiB) |",
              "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for p in result["memory"]:
        lines.append(
            f"| {p['n_obs']:,} | {p['batches']} | {p['rss_before_mib']:.0f} | {p['rss_growth_mib']:.1f} | "
            f"{p['tracemalloc_peak_mib']:.1f} | {p['x_csr_float32_mib']:.0f} |"
        )
    lines += ["", "| target | result |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in result["targets"].items()]
    lines += ["", f"Total benchmark wall time: {result['wall_s']:.0f} s.", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
