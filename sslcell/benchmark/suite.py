"""Suite files: YAML listing tasks x recipes x baselines x peers, validated with messages that name the field.

.. code-block:: yaml

    name: crops                      # default: the file's stem
    description: fate and cell type from crops
    seed: 0
    data_dir: ../../../shared/data   # relative data paths resolve here (default: this file's folder); --data overrides
    out: ../results                  # where tables, plots and the JSON go (relative to this file); --out overrides
    tasks:
      - name: chula                  # unique; names the output files
        kind: crop_classification    # a registered kind (sslcell benchmark --list)
        data: chula_rbc12_crops48.npz
        params: {label_key: label, group_key: image_id}
        recipes:                     # pretraining recipes: a YAML path (relative to this file), or a mapping
          - ../configs/chula_simclr.yaml
          - {name: mae, config: ../configs/chula_mae.yaml, finetune: ../configs/chula_finetune.yaml}
        baselines: [pixel_pca, random_encoder, supervised_cnn]
        peers: []
        quick: {max_cells: 256}      # added to the kind's own --quick settings
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sslcell._warn import warn_user
from sslcell.benchmark.registry import TaskKind, check_names, task_kind
from sslcell.config import RecipeConfig, from_dict, load_config, read_yaml
from sslcell.errors import ConfigError

SUITE_FIELDS = ("name", "description", "seed", "data_dir", "out", "tasks")
TASK_FIELDS = ("name", "kind", "data", "params", "recipes", "baselines", "peers", "quick")


@dataclass
class RecipeSpec:
    """A pretraining recipe of a task: its config, where it came from, and optional fine-tuning settings."""

    name: str
    config: RecipeConfig
    source: str  # the YAML path, or "inline"
    finetune: dict[str, Any] | None = None


@dataclass
class TaskSpec:
    """One task of a suite, validated: ``params`` is the kind's parameter dataclass (``--quick`` applied)."""

    name: str
    kind: TaskKind
    params: Any
    data: dict[str, Path] = field(default_factory=dict)  # role -> existing path ("data" for a single file)
    recipes: list[RecipeSpec] = field(default_factory=list)
    baselines: list[str] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)
    where: str = field(default="", repr=False)  # its place in the suite file ("tasks[2]"), for errors
    param_sets: tuple[Any, ...] = field(default=(), repr=False, compare=False)  # full and --quick, both checked

    @property
    def path(self) -> Path:
        """The single data file (``data: file.h5ad``)."""
        if "data" not in self.data:
            raise ConfigError(f"task {self.name}: expects one data file (data: <path>), got roles {sorted(self.data)}")
        return self.data["data"]


@dataclass
class Suite:
    name: str
    description: str
    seed: int
    tasks: list[TaskSpec]
    source: Path
    out: Path
    quick: bool
    only: list[str] | None = None  # the tasks selected at load time (--only); None: all
    recipes: list[str] | None = None  # the recipes kept at load time (--recipes); None: all

    def describe(self) -> dict[str, Any]:
        """JSON-able summary of what runs (kinds, resolved parameters, data, recipes, baselines, peers)."""
        return {
            "name": self.name, "source": str(self.source), "seed": self.seed, "quick": self.quick,
            "tasks": [{
                "name": t.name, "kind": t.kind.name, "params": dataclasses.asdict(t.params),
                "data": {k: str(v) for k, v in t.data.items()},
                "recipes": [{"name": r.name, "source": r.source, "finetune": r.finetune} for r in t.recipes],
                "baselines": t.baselines, "peers": t.peers,
            } for t in self.tasks],
        }


def load_suite(path: str | Path, *, quick: bool = False, data_dir: str | Path | None = None,
               out: str | Path | None = None, only: list[str] | None = None,
               recipes: list[str] | None = None) -> Suite:
    """Read and validate a suite file; ``data_dir`` / ``out`` override the file's own (the CLI's --data / --out).

    ``only``: keep just these tasks (the others are not validated, so their data need not exist here).
    ``recipes``: keep just these recipes (by name) in every kept task; baselines and peers still run. Every kept
    task must have at least one of them.
    """
    path = Path(path)
    values = read_yaml(path, "suite")
    try:
        suite = _suite(values, path, quick=quick, data_dir=data_dir, out=out, only=only)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if recipes:
        _keep_recipes(suite, list(dict.fromkeys(recipes)))
    try:
        _check_tasks(suite)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return suite


def _keep_recipes(suite: Suite, names: list[str]) -> None:
    for task in suite.tasks:
        kept = [r for r in task.recipes if r.name in names]
        if not kept:
            raise ConfigError(f"--recipes: task {task.name} of suite {suite.name} has none of {names}; its recipes "
                              f"are {[r.name for r in task.recipes]} (choose the task with --only)")
        task.recipes = kept
    every = {r.name for t in suite.tasks for r in t.recipes}
    suite.recipes = [n for n in names if n in every]
    missing = [n for n in names if n not in every]
    if missing:
        raise ConfigError(f"--recipes: no kept task of suite {suite.name} has a recipe named {missing[0]!r}")


def _suite(values: Any, path: Path, *, quick: bool, data_dir, out, only) -> Suite:
    _mapping(values, "suite", SUITE_FIELDS)
    here = path.resolve().parent
    if data_dir is not None:
        base, base_is = Path(data_dir).expanduser(), f"--data {data_dir}"
        if not base.is_dir():
            raise ConfigError(f"--data: no such folder: {data_dir} (the folder where the suite's relative data "
                              "paths resolve)")
    elif values.get("data_dir") is not None:
        base = here / _string(values["data_dir"], "data_dir")
        base_is = f"the suite's data_dir, {base}"
    else:  # like out and recipe paths: beside the suite file
        base, base_is = here, f"the suite file's folder, {here} (no data_dir or --data given)"
    out_dir = Path(out) if out is not None else here / _string(values.get("out", "results"), "out")
    seed = values.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed: expected an integer >= 0, got {seed!r}")
    tasks_raw = values.get("tasks")
    if not isinstance(tasks_raw, list) or not tasks_raw:
        raise ConfigError("tasks: expected a non-empty list of tasks")
    names = [t.get("name", t.get("kind")) if isinstance(t, dict) else None for t in tasks_raw]
    for i, (raw, name) in enumerate(zip(tasks_raw, names, strict=True)):  # names before they are compared
        if name is not None:
            _string(name, f"tasks[{i}].{'name' if 'name' in raw else 'kind'}")
    for i, name in enumerate(names):
        if name is not None and names.index(name) != i:
            raise ConfigError(f"tasks[{i}].name: {name!r} is used twice (task names name the output files)")
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ConfigError(f"--only: no task named {unknown[0]!r}; the suite's tasks are {names}")
    kept = [i for i, name in enumerate(names) if not only or name in only]
    tasks = [_task(tasks_raw[i], f"tasks[{i}]", here, (base, base_is), quick) for i in kept]
    if data_dir is not None and not any(_relative_paths(tasks_raw[i].get("data")) for i in kept):
        warn_user(f"--data {data_dir} is not used: no {'kept ' if only else ''}task of {path.name} reads a relative "
                  "data path (each makes its own data or names an absolute path)")
    return Suite(name=_file_name(values.get("name", _stem_name(path)), "name"),
                 description=_string(values.get("description", ""), "description"),
                 seed=seed, tasks=tasks, source=path, out=out_dir, quick=quick,
                 only=[t.name for t in tasks] if only else None)


def _task(values: Any, where: str, here: Path, data_base: tuple[Path, str], quick: bool) -> TaskSpec:
    _mapping(values, where, TASK_FIELDS)
    if "kind" not in values:
        raise ConfigError(f"{where}.kind: missing (the kind of task, e.g. crop_classification)")
    kind = task_kind(_string(values["kind"], f"{where}.kind"), f"{where}.kind")
    name = _file_name(values.get("name", kind.name), f"{where}.name")
    params = dict(_mapping(_or_empty(values.get("params")), f"{where}.params"))
    # both read and checked, whichever runs: a suite that passes --quick must not fail the full run, nor the reverse
    full_parsed = _params(kind, params, f"{where}.params")
    quick_values = {**kind.quick, **_mapping(_or_empty(values.get("quick")), f"{where}.quick")}
    quick_parsed = _params(kind, {**params, **quick_values}, f"{where}.quick")
    parsed = quick_parsed if quick else full_parsed
    data = _data(values.get("data"), f"{where}.data", *data_base)
    if kind.needs_data and not data:
        raise ConfigError(f"{where}.data: task kind {kind.name} needs a data file")
    recipes_raw = values.get("recipes") or []
    if recipes_raw and not kind.takes_recipes:
        raise ConfigError(f"{where}.recipes: task kind {kind.name} takes no recipes")
    if not isinstance(recipes_raw, list):
        raise ConfigError(f"{where}.recipes: expected a list, got {recipes_raw!r}")
    recipes = [_recipe(r, f"{where}.recipes[{i}]", here) for i, r in enumerate(recipes_raw)]
    baselines = check_names(_strings(values.get("baselines"), f"{where}.baselines"), kind.baselines, "baseline",
                            f"{where}.baselines", kind.name)
    for checked, at in ((full_parsed, "params"), (quick_parsed, "quick")):  # what refers to the task's entries
        if hasattr(checked, "check_entries"):
            checked.check_entries([r.name for r in recipes], baselines, task=where, params=f"{where}.{at}")
    taken = {**{b: "a baseline" for b in kind.baselines}, **{p: "a peer" for p in kind.peers}}
    for i, recipe in enumerate(recipes):  # a recipe's name keys its embedding, scores and folder in the task
        if recipe.name in taken:
            raise ConfigError(f"{where}.recipes[{i}].name: {recipe.name!r} is already {taken[recipe.name]}'s name "
                              f"in task kind {kind.name}; give the recipe another name")
        taken[recipe.name] = f"recipes[{i}]"
    for i, recipe in enumerate(recipes):
        if kind.modality and recipe.config.modality != kind.modality:
            raise ConfigError(f"{where}.recipes[{i}]: {recipe.name!r} is a recipe for {recipe.config.modality} data; "
                              f"task kind {kind.name} reads {kind.modality} data")
    if data and not kind.data_roles:
        raise ConfigError(f"{where}.data: task kind {kind.name} reads no data (it makes its own); remove data")
    unknown = sorted(set(data) - set(kind.data_roles))
    if unknown:
        spot = f"{where}.data" + ("" if unknown == ["data"] else f".{unknown[0]}")
        wanted = ("one file (data: <path>)" if kind.data_roles == ("data",) else
                  f"the roles {list(kind.data_roles)} (data: {{role: <path>}})")
        raise ConfigError(f"{spot}: task kind {kind.name} reads {wanted}")
    spec = TaskSpec(
        name=name, kind=kind, params=parsed, data=data, recipes=recipes,
        baselines=baselines,
        peers=check_names(_strings(values.get("peers"), f"{where}.peers"), kind.peers,
                          "peer", f"{where}.peers", kind.name),
    )
    spec.where, spec.param_sets = where, (full_parsed, quick_parsed)  # for _check_tasks, once recipes are kept
    return spec


def _check_tasks(suite: Suite) -> None:
    """Each kept task's own checks across its fields and its data (``check_task``), for the full and the --quick
    settings, on the recipes --recipes kept: before any task runs."""
    for task in suite.tasks:
        if task.kind.check_task is None:
            continue
        full, *quick = task.param_sets or (task.params,)
        for params in (full, *quick):
            try:
                task.kind.check_task(dataclasses.replace(task, params=params))
            except ConfigError as err:
                message = str(err) if params is full else _as_quick(str(err), full, params)
                raise ConfigError(f"{task.where}.{message}") from None


def _as_quick(message: str, full: Any, quick: Any) -> str:
    """A check's message about the --quick settings (the full ones passed): ``params.<field>`` names ``quick.<field>``
    where the quick value differs; otherwise the message says that the quick settings made it fail."""
    if message.startswith("params."):
        name = re.split(r"[.:\[ ]", message[len("params."):], maxsplit=1)[0]
        if getattr(full, name, None) != getattr(quick, name, None):
            return "quick." + message[len("params."):]
    return f"{message} (with the task's --quick settings: the kind's quick defaults and its quick: block)"


def _relative_paths(values: Any) -> list[str]:
    """The relative paths among a task's validated ``data`` (a path, or a mapping of role -> path)."""
    paths = [values] if isinstance(values, str) else list((values or {}).values())
    return [v for v in paths if not Path(v).expanduser().is_absolute()]


def _data(values: Any, where: str, base: Path, base_is: str) -> dict[str, Path]:
    if values is None:
        return {}
    if not isinstance(values, (str, dict)):
        raise ConfigError(f"{where}: expected a path, or a mapping of role -> path; got {values!r}")
    roles = {"data": values} if isinstance(values, str) else _mapping(values, where)
    out = {}
    for role, value in roles.items():
        spot = where if isinstance(values, str) else f"{where}.{role}"
        if not _string(value, spot).strip():
            raise ConfigError(f"{spot}: an empty path")
        p = Path(value).expanduser()
        p = Path(os.path.normpath(p if p.is_absolute() else base / p))  # 'suites/../../data' reads as 'data'
        if not p.exists():
            raise ConfigError(f"{spot}: no such file or folder: {p} (a relative path is read in {base_is})")
        out[role] = p
    return out


def _recipe(value: Any, where: str, here: Path) -> RecipeSpec:
    if isinstance(value, str):
        value = {"config": value}
    _mapping(value, where, ("name", "config", "finetune"))
    if "config" not in value:
        raise ConfigError(f"{where}.config: missing (a recipe YAML path or mapping)")
    config_value = value["config"]
    if isinstance(config_value, str):
        source = here / config_value
        try:
            config = load_config(source)
        except ConfigError as err:
            raise ConfigError(f"{where}.config: {err}") from None
        default_name = _stem_name(Path(config_value))
    else:
        source, default_name = "inline", f"recipe{where.rsplit('[', 1)[-1].rstrip(']')}"
        try:
            config = RecipeConfig.from_dict(_mapping(config_value, f"{where}.config"))
        except ConfigError as err:
            raise ConfigError(f"{where}.config.{err}") from None
    finetune = value.get("finetune")
    if isinstance(finetune, str):
        try:
            finetune = read_yaml(here / finetune, "fine-tuning settings")
        except ConfigError as err:
            raise ConfigError(f"{where}.finetune: {err}") from None
    if finetune is not None:
        from sslcell.classify.finetune import FinetuneConfig

        try:
            FinetuneConfig.from_dict(_mapping(finetune, f"{where}.finetune"))
        except ConfigError as err:
            raise ConfigError(f"{where}.finetune.{err}") from None
    return RecipeSpec(name=_file_name(value.get("name", default_name), f"{where}.name"), config=config,
                      source=str(source), finetune=finetune)


def _or_empty(value: Any) -> Any:
    """An absent mapping (``params:`` left empty is YAML's null) as ``{}``; anything else as given, to be checked."""
    return {} if value is None else value


def _params(kind: Any, values: dict, where: str) -> Any:
    """``kind.params`` built from ``values`` and checked; errors name ``where`` and the field. Every seed (a field
    named ``seed``/``*_seed``, or ``seeds``) is an integer >= 0, as the suite's own."""
    parsed = from_dict(kind.params, values, where)
    for f in dataclasses.fields(parsed):
        if f.name == "seed" or f.name.endswith("_seed") or f.name == "seeds":
            value = getattr(parsed, f.name)
            for i, seed in enumerate(value if f.name == "seeds" else [value]):
                if isinstance(seed, int) and seed < 0:
                    spot = f"{where}.{f.name}" + (f"[{i}]" if f.name == "seeds" else "")
                    raise ConfigError(f"{spot}: expected an integer >= 0, got {seed}")
    check = getattr(parsed, "check", None)
    if check is not None:
        try:
            check()
        except ConfigError as err:
            raise ConfigError(f"{where}.{err}") from None
    return parsed


def _stem_name(path: Path) -> str:
    """A file's stem as a default name: characters other than letters, digits, '-' and '_' become '_'."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in path.stem)


def _file_name(value: Any, where: str) -> str:
    """A suite, task or recipe name: it names output files and folders, so letters, digits, '-' and '_' only."""
    name = _string(value, where)
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"{where}: {name!r} may hold only letters, digits, '-' and '_' (it names files)")
    return name


def _mapping(value: Any, where: str, allowed: tuple[str, ...] | None = None) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    odd = [key for key in value if not isinstance(key, str)]
    if odd:
        raise ConfigError(f"{where}.{odd[0]}: field names are text, got {type(odd[0]).__name__} {odd[0]!r}")
    if allowed is not None:
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown field; valid fields are {list(allowed)}")
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _strings(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list of names, got {value!r}")
    return [_string(v, f"{where}[{i}]") for i, v in enumerate(value)]
