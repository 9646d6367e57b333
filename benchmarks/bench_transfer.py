"""Label-transfer speed: sslcell.tl.transfer_labels (default choices) vs scikit-learn's KNeighborsClassifier.

Reference: 1,000,000 x 64 float32 embeddings, 100,000 queries, both drawn (seed 0) from 100 gaussian clusters whose
labels are 20 cell types (cluster id mod 20); 15 neighbours, distance-weighted votes on every side. Each entry runs
in its own process (peak RSS from getrusage), timed as build (index / fit) and search (predict) separately:

* sslcell default (``index="auto"``: IVF above 200,000 reference cells, settings in sslcell.transfer.reference);
* sslcell exact (``index="exact"``): the calls every entry is compared with;
* scikit-learn ``KNeighborsClassifier(algorithm="brute", n_jobs=-1)``.

Target: sslcell default at least 10x faster (build + search) than scikit-learn, agreeing with exact search on at
least 97% of the calls.

    python benchmarks/bench_transfer.py [--n-reference 1000000] [--n-query 100000]

Writes benchmarks/results/transfer_speed.md / .json; the hand-written notes of an earlier transfer_speed.md (from its
"Variants tried" line on) are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ENTRIES = ("sslcell_default", "sslcell_exact", "sklearn_brute")
NOTES = "Variants tried"  # the line from which an earlier transfer_speed.md is kept


def make_data(folder: Path, n_ref: int, n_query: int, dim: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.0, (100, dim)).astype(np.float32)
    for name, n in (("reference", n_ref), ("query", n_query)):
        cluster = rng.integers(100, size=n)
        x = centres[cluster] + rng.normal(0, 1.2, (n, dim)).astype(np.float32)  # clusters overlap: calls can differ
        np.save(folder / f"{name}.npy", x.astype(np.float32))
        np.save(folder / f"{name}_labels.npy", np.char.add("type", (cluster % 20).astype(str)))


def run_entry(entry: str, folder: Path, k: int) -> dict:
    """One entry in this process: times, peak RSS, predictions (saved beside the data)."""
    import anndata as ad
    import pandas as pd
    from sklearn.neighbors import KNeighborsClassifier

    from sslcell import tl  # imports are not timed, for either side

    x_ref, x_q = np.load(folder / "reference.npy"), np.load(folder / "query.npy")
    y_ref = np.load(folder / "reference_labels.npy")
    t0 = time.perf_counter()
    if entry.startswith("sslcell"):
        ref = ad.AnnData(obs=pd.DataFrame({"label": y_ref}, index=np.arange(len(y_ref)).astype(str)))
        ref.obsm["X_sslcell"] = x_ref
        query = ad.AnnData(obs=pd.DataFrame(index=np.arange(len(x_q)).astype(str)))
        query.obsm["X_sslcell"] = x_q
        index = tl.build_reference(ref, "label", index="auto" if entry == "sslcell_default" else "exact")
        t1 = time.perf_counter()
        tl.transfer_labels(query, index, "label", n_neighbors=k)
        pred, kind = query.obs["label_pred"].astype(str).to_numpy(), index.kind
        if kind == "ivf":
            from sslcell.transfer.reference import IVF

            faiss_index = index._index.index
            kind = f"ivf ({IVF.codec}, nlist {faiss_index.nlist}, nprobe {faiss_index.nprobe})"
    else:
        clf = KNeighborsClassifier(k, weights="distance", algorithm="brute", n_jobs=-1).fit(x_ref, y_ref)
        t1 = time.perf_counter()
        pred, kind = clf.predict(x_q), "brute"
    t2 = time.perf_counter()
    np.save(folder / f"pred_{entry}.npy", pred.astype(str))
    return {"entry": entry, "index": kind, "build_s": t1 - t0, "search_s": t2 - t1, "total_s": t2 - t0,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def kept_notes(path: Path) -> list[str]:
    """The notes of an earlier result file, from its "Variants tried" line to the end (none if there is none)."""
    lines = path.read_text().splitlines() if path.exists() else []
    start = next((i for i, line in enumerate(lines) if line.startswith(NOTES)), len(lines))
    return [""] + lines[start:] if start < len(lines) else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-reference", type=int, default=1_000_000)
    parser.add_argument("--n-query", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--n-neighbors", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--entry", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "transfer_speed"))
    args = parser.parse_args()
    if args.entry:  # a child process
        print(json.dumps(run_entry(args.entry, Path(args.folder), args.n_neighbors)))
        return
    command = "python benchmarks/bench_transfer.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_data(folder, args.n_reference, args.n_query, args.dim, args.seed)
        rows = []
        for entry in ENTRIES:
            out = subprocess.run([sys.executable, __file__, "--entry", entry, "--folder", str(folder),
                                  "--n-neighbors", str(args.n_neighbors)], check=True, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
        exact = np.load(folder / "pred_sslcell_exact.npy")
        truth = np.load(folder / "query_labels.npy")
        for row in rows:
            pred = np.load(folder / f"pred_{row['entry']}.npy")
            row["agreement_with_exact"] = float(np.mean(pred == exact))
            row["accuracy_vs_cluster_label"] = float(np.mean(pred == truth))
    by = {r["entry"]: r for r in rows}
    speedup = by["sklearn_brute"]["total_s"] / by["sslcell_default"]["total_s"]
    agreement = by["sslcell_default"]["agreement_with_exact"]
    result = {"command": command, "settings": vars(args) | {"entry": None, "folder": None}, "rows": rows,
              "speedup_total": speedup, "targets": {"speed-up >= 10x": speedup >= 10, "agreement >= 0.97":
                                                    agreement >= 0.97},
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "load_average_end": os.getloadavg()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        "# Label-transfer speed: sslcell vs scikit-learn", "",
        f"Command: `{command}`  ",
        f"Data: {args.n_reference:,} x {args.dim} reference, {args.n_query:,} queries, 100 gaussian clusters, "
        f"20 labels, seed {args.seed}; {args.n_neighbors} neighbours, distance-weighted votes.  ",
        f"Machine: {os.cpu_count()} cores, {platform.platform()}; one process per entry.", "",
        "| entry | index | build s | search s | total s | peak RSS MiB | agreement with exact | accuracy |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['entry']} | {r['index']} | {r['build_s']:.1f} | {r['search_s']:.1f} | {r['total_s']:.1f} "
                     f"| {r['peak_rss_mib']:.0f} | {r['agreement_with_exact']:.4f} | "
                     f"{r['accuracy_vs_cluster_label']:.4f} |")
    lines += ["", f"**Speed-up (total, scikit-learn / sslcell default): {speedup:.1f}x, target 10x: "
              f"{'PASS' if speedup >= 10 else 'MISS'}; agreement with exact search {agreement:.4f}, target 0.97: "
              f"{'PASS' if agreement >= 0.97 else 'MISS'}**"]
    lines += kept_notes(out.with_suffix(".md"))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
