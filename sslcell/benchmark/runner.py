"""Run a suite: every task in order, one progress bar, a Markdown table file and a JSON record per run."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sslcell.benchmark.record import describe_hardware, provenance
from sslcell.benchmark.registry import Context, TaskResult
from sslcell.benchmark.report import markdown
from sslcell.benchmark.suite import Suite
from sslcell.checkpoint import atomic_write
from sslcell.errors import ConfigError, OverwriteError

log = logging.getLogger("sslcell.benchmark")
HEADER = "# Benchmark suite:"  # first line of every results file this runner writes
WORKDIR_MARKER = "sslcell_benchmark_workdir.json"  # in a --workdir this runner made: its task folders may be replaced


@dataclasses.dataclass
class SuiteRun:
    """The outcome of :func:`run_suite`: per-task results, failures (task -> message), written files."""

    results: dict[str, TaskResult]
    errors: dict[str, str]
    markdown_path: Path
    json_path: Path

    @property
    def targets_missed(self) -> list[str]:
        return [f"{task}: {t.name}" for task, r in self.results.items() for t in r.targets if not t.met]


def output_paths(suite: Suite, only: list[str] | None = None) -> tuple[Path, Path, str]:
    """``(markdown, json, prefix)``: ``<name>.*``; a run of some tasks (``only``) writes ``<name>_<task>-<task>.*``,
    of some recipes (``suite.recipes``) ``<name>[_<tasks>]_<recipe>-<recipe>.*`` and a --quick run
    ``<name>[...]_quick.*``, so none of them replaces the whole suite's results."""
    stem = (suite.name + (f"_{'-'.join(only)}" if only else "")
            + (f"_{'-'.join(suite.recipes)}" if suite.recipes else "") + ("_quick" if suite.quick else ""))
    return suite.out / f"{stem}.md", suite.out / f"{stem}.json", stem


def run_suite(suite: Suite, *, workdir: str | Path | None = None, device: str = "auto",
              progress: bool | None = None, only: list[str] | None = None, resume: bool = False) -> SuiteRun:
    """Run ``suite`` (or only the tasks named in ``only``), write its results and return them.

    ``resume``: tasks read back the trainings an earlier run of the same settings finished in ``workdir`` (a killed
    run goes on where it stopped; see :mod:`sslcell.benchmark.fit_store`).

    A task that raises is recorded as failed (message and traceback in the JSON) and the others still run.
    Results files are replaced only if this runner wrote them (their first line is ``# Benchmark suite:``), and
    not by a run in which a task failed: that one writes ``<name>_failed.md`` / ``.json`` beside them.
    """
    from tqdm.auto import tqdm

    if resume and workdir is None:
        raise ConfigError("--resume: give the --workdir of the run to resume (without one a run keeps nothing)")
    only = only if only is not None else suite.only
    unknown = sorted(set(only or []) - {t.name for t in suite.tasks})
    if unknown:
        raise ConfigError(f"--only: no task named {unknown[0]!r} in suite {suite.name}; its tasks are "
                          f"{[t.name for t in suite.tasks]}")
    tasks = [t for t in suite.tasks if only is None or t.name in only]
    only = [t.name for t in tasks] if only else None  # suite order
    if workdir is not None:
        _claim_workdir(Path(workdir))
    if suite.out.exists() and not suite.out.is_dir():
        raise OverwriteError(f"{suite.out}: is a file; the suite's out (or --out) names the folder for its results")
    md_path, json_path, stem = output_paths(suite, only)
    for path in (md_path, json_path, *_failed_paths(md_path, json_path)):  # before any work: a run is never lost
        _check_ours(path, Path(suite.source).name)
    _check_plots_ours(suite.out, [f"{s}_{t.name}_*.png" for s in (stem, f"{stem}_failed") for t in tasks])
    suite.out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = provenance(suite.seed) | {
        "suite": suite.describe(), "quick": suite.quick,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    hardware_line = describe_hardware(record["hardware"])
    log.info("suite %s%s: %d task(s) on %s", suite.name, " (--quick)" if suite.quick else "", len(tasks),
             hardware_line)
    results: dict[str, TaskResult] = {}
    errors: dict[str, str] = {}
    durations: dict[str, float] = {}
    tracebacks: dict[str, str] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sslcell_bench_") as tmp:
        root = Path(workdir) if workdir is not None else Path(tmp)
        staged = Path(tmp) / "plots"  # plots go to suite.out once the run knows its file names
        staged.mkdir()
        bar = tqdm(tasks, desc=suite.name, unit="task", disable=progress is False if progress is not None else None)
        for task in bar:
            bar.set_postfix_str(task.name)
            ctx = Context(seed=suite.seed, quick=suite.quick, workdir=root / task.name, out_dir=staged,
                          prefix=f"{stem}_{task.name}", device=device, resume=resume,
                          steps=lambda items, desc="": tqdm(items, desc=desc, leave=False, position=1,
                                                             disable=bar.disable))
            ctx.workdir.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            try:
                results[task.name] = task.kind.run(task, ctx)
            except Exception as err:  # noqa: BLE001 - one failed task must not lose the others' results
                errors[task.name] = f"{type(err).__name__}: {err}"
                tracebacks[task.name] = traceback.format_exc()
                log.error("task %s failed: %s", task.name, errors[task.name])
            durations[task.name] = time.perf_counter() - t0
            log.info("task %s: %s in %.0f s", task.name, "failed" if task.name in errors else "done",
                     durations[task.name])
        record["seconds"] = time.perf_counter() - start
        failed_run = bool(errors) and (md_path.exists() or json_path.exists())
        if failed_run:  # a failing run never replaces earlier results, plots included
            earlier = md_path
            md_path, json_path = _failed_paths(md_path, json_path)
            log.warning("%d task(s) failed: the earlier results in %s are kept, this run's are in %s", len(errors),
                        earlier, md_path)
        for task_name, result in results.items():
            result.plots = [_publish(staged / name, suite.out, stem, failed_run) for name in result.plots
                            if _written(staged / name, task_name)]
    record["tasks"] = {name: {"seconds": durations[name], **_result_json(r)} for name, r in results.items()}
    record["failed"] = {name: {"error": errors[name], "traceback": tracebacks[name]} for name in errors}
    text = json.dumps(_finite(record), indent=2, default=_json_default, allow_nan=False) + "\n"
    atomic_write(json_path, lambda tmp: tmp.write_text(text))
    report = markdown(suite.name, suite.description, record, results, errors, durations, hardware_line)
    atomic_write(md_path, lambda tmp: tmp.write_text(report))
    log.info("wrote %s and %s", md_path, json_path)
    return SuiteRun(results=results, errors=errors, markdown_path=md_path, json_path=json_path)


def _claim_workdir(workdir: Path) -> None:
    """Make ``workdir`` the runner's (a marker file in it), refusing an existing folder that holds anything but
    no marker: tasks replace the models and scratch files in their folders there, so it must not be a user's."""
    marker = workdir / WORKDIR_MARKER
    if workdir.exists() and not workdir.is_dir():
        raise OverwriteError(f"--workdir {workdir}: is a file; --workdir names a folder for the run's models")
    if marker.is_file():
        return
    if workdir.is_dir() and any(not p.name.startswith(".") for p in workdir.iterdir()):
        raise OverwriteError(f"--workdir {workdir}: the folder holds files but was not made by sslcell benchmark "
                             f"(no {WORKDIR_MARKER}); the run replaces models there, so give a new or empty folder "
                             f"(the folder of a run by an sslcell before this marker: create an empty "
                             f"{WORKDIR_MARKER} in it)")
    workdir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"made_by": "sslcell benchmark", "note": "models and scratch files of benchmark "
                                  "runs; sslcell benchmark may replace anything in the task folders here"}) + "\n")


def _failed_paths(md_path: Path, json_path: Path) -> tuple[Path, Path]:
    """Where a run with a failed task writes, beside earlier results: ``<name>_failed.md`` / ``.json``."""
    return md_path.with_name(f"{md_path.stem}_failed.md"), json_path.with_name(f"{json_path.stem}_failed.json")


def _check_ours(path: Path, suite_file: str) -> None:
    """Refuse to replace ``path`` unless this runner wrote it, for a suite file of the same name ``suite_file``
    (another suite file that kept the same ``name:`` would silently replace that suite's results)."""
    if not path.exists():
        return
    ours = path.read_text(errors="replace").startswith(HEADER) if path.suffix == ".md" else _record(path) is not None
    if not ours:
        raise OverwriteError(f"{path} exists and was not written by sslcell benchmark; choose another --out")
    record = _record(path) if path.suffix == ".json" else None
    source = record["suite"].get("source") if record else None
    if isinstance(source, str) and Path(source).name != suite_file:
        raise OverwriteError(f"{path} holds the results of suite file {Path(source).name}, not {suite_file}: give "
                             "this suite another name: (or --out)")


def _record(path: Path) -> dict[str, Any] | None:
    """The run record in JSON file ``path`` if this runner wrote it (a mapping with its keys), else None."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    keys = {"suite", "quick", "started", "seconds", "tasks", "failed"}
    if not (isinstance(record, dict) and keys <= set(record) and isinstance(record["suite"], dict)
            and isinstance(record["tasks"], dict)):
        return None
    return record


def _plots_of(record: dict[str, Any]) -> set[str]:
    """The plot file names a run record lists (anything else in its ``plots`` lists is ignored)."""
    return {plot for task in record["tasks"].values() if isinstance(task, dict)
            for plot in (task.get("plots") if isinstance(task.get("plots"), list) else []) if isinstance(plot, str)}


def _written(staged: Path, task: str) -> bool:
    """Whether a plot that task ``task`` lists was written (a task that lists one it did not write: warned)."""
    if staged.is_file():
        return True
    log.warning("task %s lists the plot %s but did not write it; it is left out of the results", task, staged.name)
    return False


def _check_plots_ours(out: Path, patterns: list[str]) -> None:
    """Refuse, before any work, PNGs in ``out`` that this run could write (``patterns``) but that no results
    record of this runner in ``out`` lists as its plot: they are the user's."""
    existing = {p for pattern in patterns for p in out.glob(pattern)}
    if not existing:
        return
    records = (_record(p) for p in out.glob("*.json"))
    ours = set().union(*(_plots_of(r) for r in records if r is not None))
    foreign = sorted(p.name for p in existing if p.name not in ours)
    if foreign:
        raise OverwriteError(f"{out / foreign[0]} exists and was not written by sslcell benchmark (this run's plots "
                             "are named like it); move it or choose another --out")


def _publish(staged: Path, out: Path, stem: str, failed_run: bool) -> str:
    """Move a task's plot from the staging folder into ``out`` (``<stem>_failed_...`` in a failed run); its name."""
    name = staged.name.replace(stem, f"{stem}_failed", 1) if failed_run else staged.name
    atomic_write(out / name, lambda tmp: shutil.copyfile(staged, tmp))
    return name


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float (nested in dicts and lists) as None: strict JSON has no NaN."""
    import numpy as np

    if isinstance(value, (np.generic, np.ndarray)):
        value = value.tolist()  # a NumPy scalar -> its Python value, an array -> nested lists
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _result_json(result: TaskResult) -> dict[str, Any]:
    out = dataclasses.asdict(result)
    for target, t in zip(out["targets"], result.targets, strict=True):
        target["met"] = t.met
    return out


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-able: {type(value).__name__}")
