"""Kind ``knn_transfer``: label-transfer speed of ``sslcell.tl.transfer_labels`` against scikit-learn's kNN.

Data: ``n_reference`` x ``dim`` float32 reference embeddings and ``n_query`` queries, both drawn (``seed``) from
``n_clusters`` gaussian clusters (centres ~ N(0, 1), cells at s.d. ``spread`` around them, so clusters overlap and
calls can differ between searches) whose labels are ``n_labels`` cell types (cluster id mod ``n_labels``);
``n_neighbors`` neighbours and distance-weighted votes on every side. Entries, each in its own Python process (so its
peak RSS, from ``getrusage``, is its own), timed as build (index / fit) and search (predict) separately; imports are
done before the clock starts, for every entry alike:

* ``sslcell_<index>``: ``tl.build_reference(index=index)`` then ``tl.transfer_labels`` (``index="auto"``, the
  default, builds an IVF index above ``sslcell.transfer.reference.APPROX_ABOVE`` reference cells, settings in
  ``sslcell.transfer.reference.IVF``);
* ``sslcell_exact`` (always run): the same with ``index="exact"``; every entry's calls are compared with its calls;
* peer ``sklearn``: ``KNeighborsClassifier(n_neighbors, weights="distance", algorithm="brute", n_jobs=-1)``.

Targets: the sslcell entry at least ``speed_target`` times faster (build + search) than scikit-learn, agreeing with
exact search on at least ``agreement_target`` of the calls. ``notes`` (hand-written, from the suite file) go into the
results under the measured notes: what was tried before and why the default is what it is.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sslcell.benchmark.registry import Context, Table, Target, TaskKind, TaskResult, register
from sslcell.errors import ConfigError

INDEXES = ("auto", "ivf", "hnsw", "exact")
MIB = 2**20


@dataclass
class KnnTransferParams:
    """Settings of a ``knn_transfer`` task (see the module docstring)."""

    n_reference: int = 1_000_000
    n_query: int = 100_000
    dim: int = 64
    n_clusters: int = 100
    n_labels: int = 20
    spread: float = 1.2  # s.d. of the cells around their cluster centre (centres ~ N(0, 1))
    n_neighbors: int = 15
    index: str = "auto"  # the sslcell entry's index: auto (what users get), ivf, hnsw or exact
    speed_target: float = 10.0  # scikit-learn total time / the sslcell entry's, at least
    agreement_target: float = 0.97  # share of calls equal to exact search's, at least
    notes: str = ""  # hand-written notes (Markdown) appended to the results

    def check(self) -> None:
        for name in ("n_reference", "n_query", "dim", "n_neighbors"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 2 <= self.n_labels <= self.n_clusters:
            raise ConfigError(f"n_labels: must lie in [2, n_clusters = {self.n_clusters}], got {self.n_labels}")
        if self.n_neighbors > self.n_reference:
            raise ConfigError(f"n_neighbors: {self.n_neighbors} is more than the {self.n_reference} reference cells")
        if self.spread <= 0:
            raise ConfigError(f"spread: must be > 0, got {self.spread}")
        if self.index not in INDEXES:
            raise ConfigError(f"index: must be one of {list(INDEXES)}, got {self.index!r}")
        if self.speed_target <= 0:
            raise ConfigError(f"speed_target: a speed-up, must be > 0, got {self.speed_target}")
        if not 0 < self.agreement_target <= 1:
            raise ConfigError(f"agreement_target: a share of calls, must lie in (0, 1], got {self.agreement_target}")


def make_data(folder: Path, n_ref: int, n_query: int, dim: int, seed: int, *, n_clusters: int = 100,
              n_labels: int = 20, spread: float = 1.2) -> None:
    """Write ``reference.npy`` (n_ref, dim), ``query.npy`` (n_query, dim) float32 and their ``*_labels.npy``
    (``"type<cluster mod n_labels>"``) into ``folder``. The same draws as ``benchmarks/bench_transfer.py`` made."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.0, (n_clusters, dim)).astype(np.float32)
    for name, n in (("reference", n_ref), ("query", n_query)):
        cluster = rng.integers(n_clusters, size=n)
        x = centres[cluster] + rng.normal(0, spread, (n, dim)).astype(np.float32)
        np.save(folder / f"{name}.npy", x.astype(np.float32))
        np.save(folder / f"{name}_labels.npy", np.char.add("type", (cluster % n_labels).astype(str)))


def run(task: Any, ctx: Context) -> TaskResult:
    """Make the data, run each entry in its own process, compare the calls, tabulate."""
    from sslcell.benchmark.child import preloaded_note, run_child

    p: KnnTransferParams = task.params
    folder = ctx.workdir / "data"
    folder.mkdir(parents=True, exist_ok=True)
    make_data(folder, p.n_reference, p.n_query, p.dim, ctx.seed, n_clusters=p.n_clusters, n_labels=p.n_labels,
              spread=p.spread)
    entries = [f"sslcell_{'default' if p.index == 'auto' else p.index}", "sslcell_exact"]
    entries = list(dict.fromkeys(entries)) + (["sklearn_brute"] if "sklearn" in task.peers else [])
    rows = []
    for entry in ctx.steps(entries, desc="transfer entries"):
        spec = {"entry": entry, "folder": str(folder), "n_neighbors": p.n_neighbors,
                "index": "exact" if entry == "sslcell_exact" else p.index}
        rows.append(run_child(f"{__name__}:run_entry", spec, ctx.workdir / entry,
                              preload=ENTRY_IMPORTS if ctx.quick else ()))
        ctx.log(f"{entry}: build {rows[-1]['build_s']:.1f} s, search {rows[-1]['search_s']:.1f} s")
    exact = np.load(folder / "pred_sslcell_exact.npy")
    truth = np.load(folder / "query_labels.npy")
    for row in rows:
        pred = np.load(folder / f"pred_{row['entry']}.npy")
        row["agreement_with_exact"] = float(np.mean(pred == exact))
        row["accuracy_vs_cluster_label"] = float(np.mean(pred == truth))
    result = _result(p, rows, entries[0])
    if ctx.quick:
        result.notes.append(preloaded_note("entry", ", ".join(ENTRY_IMPORTS)))
    return result


# what every entry imports before its peak memory is reset; under --quick the entries fork from a process that has
# imported them once (faster, but a forked process counts library pages only as it touches them: lower memory)
ENTRY_IMPORTS = ("anndata", "pandas", "sklearn.neighbors", "sslcell.tl", "sslcell.transfer.reference")


def run_entry(spec: dict[str, Any]) -> dict[str, Any]:
    """One entry in this (child) process: build and search times, peak RSS; its calls saved beside the data."""
    import anndata as ad
    import pandas as pd
    from sklearn.neighbors import KNeighborsClassifier

    from sslcell import tl
    from sslcell.benchmark.tasks._expression_probe import reset_peak, status_bytes
    from sslcell.transfer.reference import IVF

    # every entry has imported the same modules by now; from here the peak counts this entry's work only
    imports_peak, imports_rss = _peak_rss_mib(), status_bytes("VmRSS") / MIB
    was_reset = reset_peak()
    folder, entry, k = Path(spec["folder"]), spec["entry"], spec["n_neighbors"]
    x_ref, x_q = np.load(folder / "reference.npy"), np.load(folder / "query.npy")
    y_ref = np.load(folder / "reference_labels.npy")
    t0 = time.perf_counter()
    if entry.startswith("sslcell"):
        ref = ad.AnnData(obs=pd.DataFrame({"label": y_ref}, index=np.arange(len(y_ref)).astype(str)))
        ref.obsm["X_sslcell"] = x_ref
        query = ad.AnnData(obs=pd.DataFrame(index=np.arange(len(x_q)).astype(str)))
        query.obsm["X_sslcell"] = x_q
        index = tl.build_reference(ref, "label", index=spec["index"])
        t1 = time.perf_counter()
        tl.transfer_labels(query, index, "label", n_neighbors=k)
        pred, kind = query.obs["label_pred"].astype(str).to_numpy(), index.kind
        if kind == "ivf":
            nlist = IVF.nlist(index.n)
            kind = f"ivf ({IVF.codec}, nlist {nlist}, nprobe {IVF.nprobe(nlist)})"
    else:
        clf = KNeighborsClassifier(k, weights="distance", algorithm="brute", n_jobs=-1).fit(x_ref, y_ref)
        t1 = time.perf_counter()
        pred, kind = clf.predict(x_q), "brute"
    t2 = time.perf_counter()
    np.save(folder / f"pred_{entry}.npy", pred.astype(str))
    work_peak = status_bytes("VmHWM") / MIB if was_reset else None
    return {"entry": entry, "index": kind, "build_s": t1 - t0, "search_s": t2 - t1, "total_s": t2 - t0,
            "peak_rss_mib": max(imports_peak, _peak_rss_mib(), imports_rss), "rss_after_imports_mib": imports_rss,
            "work_added_rss_mib": None if work_peak is None else work_peak - imports_rss}


def _peak_rss_mib() -> float:
    """The process's peak RSS in MiB (getrusage; after a reset of the peak, the peak since)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _result(p: KnnTransferParams, rows: list[dict[str, Any]], tested: str) -> TaskResult:
    by = {r["entry"]: r for r in rows}
    peer = by.get("sklearn_brute")
    table_rows = [{"entry": r["entry"], "index": r["index"], "build s": r["build_s"], "search s": r["search_s"],
                   "total s": r["total_s"], "peak RSS MiB": r["peak_rss_mib"],
                   "RSS after imports MiB": r["rss_after_imports_mib"], "work peak added MiB": r["work_added_rss_mib"],
                   "agreement with exact": r["agreement_with_exact"], "accuracy": r["accuracy_vs_cluster_label"],
                   **({"x scikit-learn": peer["total_s"] / r["total_s"]} if peer else {})} for r in rows]
    columns = ["entry", "index", "build s", "search s", "total s", "peak RSS MiB", "RSS after imports MiB",
               "work peak added MiB",
               "agreement with exact", "accuracy", *(["x scikit-learn"] if peer else [])]
    targets = [Target(f"{tested} agreement with exact search", by[tested]["agreement_with_exact"],
                      p.agreement_target)]
    raw: dict[str, Any] = {"rows": rows, "params": dataclasses.asdict(p)}
    if peer:
        speedup = peer["total_s"] / by[tested]["total_s"]
        targets.insert(0, Target(f"{tested} speed-up over scikit-learn brute force (build + search)", speedup,
                                 p.speed_target, unit="x"))
        raw["speedup_total"] = speedup
    notes = [
        f"Measured: {p.n_reference:,} x {p.dim} float32 reference embeddings and {p.n_query:,} queries from "
        f"{p.n_clusters} gaussian clusters (centres N(0, 1), s.d. {p.spread} around them) labelled with {p.n_labels} "
        f"types (cluster id mod {p.n_labels}); {p.n_neighbors} neighbours, distance-weighted votes. Each entry runs in "
        "its own Python process, imports done before the clock starts: build = index construction or fit, search = "
        "transfer_labels or predict. Peak RSS: the whole process's, from getrusage (imports included, as in the "
        "earlier results); 'work peak added': the peak from the end of the imports to the end of the search (the "
        "peak is reset there through /proc/self/clear_refs) less the RSS after the imports, i.e. what the data, the "
        "index and the search added. Agreement: share of queries whose call equals sslcell's exact search; accuracy: "
        "against the cluster's label. scikit-learn: KNeighborsClassifier(algorithm='brute', weights='distance', "
        "n_jobs=-1); faiss and scikit-learn use every core of the machine.",
    ]
    if p.notes.strip():
        notes.append(p.notes.strip())
    return TaskResult(tables=[Table("Label transfer: build and search times, memory, agreement", columns,
                                    table_rows)], targets=targets, notes=notes, raw=raw)


register(TaskKind(
    name="knn_transfer", params=KnnTransferParams, run=run,
    data_roles=(),  # makes its own data
    summary="label-transfer speed and memory of sslcell.tl.transfer_labels (default index and exact) vs "
            "scikit-learn's brute-force KNeighborsClassifier, each in its own process; agreement with exact search",
    peers=("sklearn",),
    quick={"n_reference": 20_000, "n_query": 2_000, "index": "ivf"},
))
