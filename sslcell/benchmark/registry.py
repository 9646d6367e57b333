"""What a benchmark task is: its kind, parameters, baselines and peers, and what it returns.

A *task kind* (``crop_classification``, ``train_step``, ...) is registered once with :func:`register`; a suite
(:mod:`sslcell.benchmark.suite`) lists tasks of these kinds. Each kind declares the parameters it takes (a
dataclass with defaults, validated with messages that name the field), the tiny settings of ``--quick``, the
baselines and peers it knows, and a ``run(task, ctx)`` that returns a :class:`TaskResult`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sslcell.errors import ConfigError


@dataclass
class Table:
    """One result table: ``rows`` are mappings from the ``columns`` to numbers or strings."""

    title: str
    columns: list[str]
    rows: list[dict[str, Any]]
    note: str = ""


@dataclass
class Target:
    """A goal checked in the run: ``value >= goal`` (``higher_is_better``) or ``value <= goal``."""

    name: str
    value: float
    goal: float
    higher_is_better: bool = True
    unit: str = ""

    @property
    def met(self) -> bool:
        if not math.isfinite(self.value):
            return False
        return self.value >= self.goal if self.higher_is_better else self.value <= self.goal


@dataclass
class TaskResult:
    """What a task leaves: tables, targets, plot file names (inside the run's output folder), notes, raw numbers."""

    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """The run a task executes in.

    ``workdir`` is the task's own scratch folder, ``out_dir`` where its plots go (name them after ``prefix``),
    ``quick`` whether the tiny settings are in force. ``steps`` wraps an iterable in the run's progress bar.
    ``resume``: read back what an earlier run left in ``workdir`` (:class:`~sslcell.benchmark.fit_store.FitStore`).
    """

    seed: int
    quick: bool
    workdir: Path
    out_dir: Path
    prefix: str
    device: str = "auto"
    resume: bool = False
    steps: Callable[..., Iterator[Any]] = field(default=lambda items, desc="": iter(items))

    def log(self, message: str) -> None:
        import logging

        logging.getLogger("sslcell.benchmark").info(message)


@dataclass(frozen=True)
class TaskKind:
    """A registered kind of task."""

    name: str
    params: type  # a dataclass; every field has a default
    run: Callable[[Any, Context], TaskResult]  # run(task: suite.TaskSpec, ctx)
    summary: str
    baselines: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()
    needs_data: bool = False
    takes_recipes: bool = False
    quick: dict[str, Any] = field(default_factory=dict)  # params overrides under --quick
    modality: str | None = None  # "expression" / "image": the only recipes it takes; None: either, or its own check
    data_roles: tuple[str, ...] = ("data",)  # the roles of data: it reads ("data": one file); (): none, makes its own
    check_task: Callable[[Any], None] | None = None  # check_task(task: suite.TaskSpec) at load time: ConfigError

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self.params):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise TypeError(f"task kind {self.name}: parameter {f.name} needs a default")


TASKS: dict[str, TaskKind] = {}


def register(kind: TaskKind) -> TaskKind:
    """Add ``kind`` to :data:`TASKS` (one name, one kind)."""
    if kind.name in TASKS and TASKS[kind.name] is not kind:
        raise ValueError(f"task kind {kind.name!r} is registered twice")
    TASKS[kind.name] = kind
    return kind


def task_kind(name: str, where: str) -> TaskKind:
    """The registered kind ``name``, or a :class:`ConfigError` naming ``where`` and the known kinds."""
    from sslcell.benchmark import tasks  # noqa: F401  (registers the shipped kinds)

    if name not in TASKS:
        raise ConfigError(f"{where}: unknown task kind {name!r}; known kinds: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def check_names(given: Iterable[str], known: tuple[str, ...], what: str, where: str, kind: str) -> list[str]:
    """``given`` as a list, each checked against ``known`` (an error names the entry and lists the choices)."""
    out = []
    for i, name in enumerate(given):
        if name not in known:
            choices = ", ".join(known) if known else "none"
            raise ConfigError(f"{where}[{i}]: unknown {what} {name!r} for task kind {kind}; known: {choices}")
        out.append(name)
    return out


def describe_kinds() -> str:
    """Text for ``sslcell benchmark --list``: each kind, what it measures, its parameters, baselines and peers."""
    from sslcell.benchmark import tasks  # noqa: F401

    lines = []
    for name in sorted(TASKS):
        kind = TASKS[name]
        lines.append(f"{name}: {kind.summary}")
        params = ", ".join(f"{f.name}={_default(f)!r}" for f in dataclasses.fields(kind.params))
        lines.append(f"    params: {params or '-'}")
        lines.append(f"    baselines: {', '.join(kind.baselines) or '-'}; peers: {', '.join(kind.peers) or '-'}"
                     f"{'; takes recipes' if kind.takes_recipes else ''}{'; needs data' if kind.needs_data else ''}")
    return "\n".join(lines) if lines else "no task kinds registered"


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
