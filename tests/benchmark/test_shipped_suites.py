"""Every suite shipped in benchmarks/suites/ runs end to end with --quick (CI's check that no suite has rotted).

A suite that a kind's own test file already runs with --quick (and checks in detail) is not run twice.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sslcell.benchmark import load_suite, run_suite

REPO = Path(__file__).resolve().parents[2]
SUITES = sorted((REPO / "benchmarks" / "suites").glob("*.yaml"))
SHARED_DATA = REPO.parent / "shared" / "data"


def test_there_are_shipped_suites():
    assert SUITES, "benchmarks/suites/ holds no suite"


def _tested_elsewhere(path: Path) -> str | None:
    for test in sorted(Path(__file__).parent.glob("test_*.py")):
        if test.name != Path(__file__).name and f'"{path.name}"' in test.read_text():
            return test.name
    return None


@pytest.mark.parametrize("path", SUITES, ids=[p.stem for p in SUITES])
def test_suite_runs_quick(path, tmp_path):
    if (other := _tested_elsewhere(path)) is not None:
        pytest.skip(f"{path.name} runs with --quick in {other}")
    if "data_dir" in path.read_text() and not SHARED_DATA.exists():
        pytest.skip(f"{path.name} reads {SHARED_DATA}, which is absent")
    suite = load_suite(path, quick=True, out=tmp_path)
    run = run_suite(suite, progress=False)
    assert not run.errors, run.errors
    record = json.loads(run.json_path.read_text())
    assert record["quick"] is True and set(record["tasks"]) == {t.name for t in suite.tasks}
    for name, result in run.results.items():
        assert result.tables, f"{name}: no table"
        numbers = [v for table in result.tables for row in table.rows for v in row.values()
                   if isinstance(v, float)]
        assert numbers and any(math.isfinite(v) for v in numbers), f"{name}: no finite number in its tables"
        for plot in result.plots:
            assert (tmp_path / plot).stat().st_size > 0, f"{name}: plot {plot} missing"
