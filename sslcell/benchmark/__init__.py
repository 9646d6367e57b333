"""Benchmark suites: YAML files of tasks x recipes x baselines x peers, one runner, committed results.

``sslcell benchmark benchmarks/suites/speed.yaml [--quick] [--out DIR] [--data DIR]`` or::

    from sslcell.benchmark import load_suite, run_suite
    run = run_suite(load_suite("my_suite.yaml", quick=True))

Task kinds live in :mod:`sslcell.benchmark.tasks` (one module each) and register themselves in
:data:`sslcell.benchmark.registry.TASKS`.
"""

from sslcell.benchmark.registry import TASKS, Context, Table, Target, TaskKind, TaskResult, register
from sslcell.benchmark.runner import SuiteRun, run_suite
from sslcell.benchmark.suite import RecipeSpec, Suite, TaskSpec, load_suite

__all__ = ["TASKS", "Context", "RecipeSpec", "Suite", "SuiteRun", "Table", "Target", "TaskKind", "TaskResult",
           "TaskSpec", "load_suite", "register", "run_suite"]
