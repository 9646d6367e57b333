"""Markdown for a suite's results: one section per task, its tables, targets and plots."""

from __future__ import annotations

import math
from typing import Any

from sslcell.benchmark.registry import Table, TaskResult


def markdown(suite_name: str, description: str, record: dict[str, Any], results: dict[str, TaskResult],
             errors: dict[str, str], durations: dict[str, float], hardware_line: str) -> str:
    """The whole results file of one run."""
    git = record["git"]
    lines = [f"# Benchmark suite: {suite_name}{' (--quick)' if record['quick'] else ''}", ""]
    if description:
        lines += [description, ""]
    lines += [
        "```", record["command"], "```", "",
        f"Hardware: {hardware_line}. sslcell {record['versions'].get('sslcell')} at commit "
        f"{git['commit'][:12]}{' (with local edits)' if git.get('dirty') else ''}, torch "
        f"{record['versions'].get('torch')}, seed {record['seed']}. Started {record['started']}; "
        f"{record['seconds']:.0f} s in all. The JSON beside this file has every number and setting.", "",
    ]
    for name, result in results.items():
        lines += [f"## {name}", "", f"Ran in {durations[name]:.0f} s.", ""]
        for table in result.tables:
            lines += table_markdown(table)
        if result.targets:
            lines += ["| target | value | goal | met |", "|---|---|---|---|"]
            for t in result.targets:
                op = ">=" if t.higher_is_better else "<="
                lines.append(f"| {t.name} | {_fmt(t.value)}{t.unit} | {op} {_fmt(t.goal)}{t.unit} | "
                             f"{'yes' if t.met else '**NO**'} |")
            lines.append("")
        for plot in result.plots:
            lines += [f"![{name}]({plot})", ""]
        for note in result.notes:
            lines += [note, ""]
    for name, message in errors.items():
        lines += [f"## {name}", "", f"**Failed**: {message}", ""]
    return "\n".join(lines).rstrip() + "\n"


def table_markdown(table: Table) -> list[str]:
    lines = [f"**{table.title}**", ""] if table.title else []
    lines.append("| " + " | ".join(table.columns) + " |")
    lines.append("|" + "|".join("---" for _ in table.columns) + "|")
    for row in table.rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in table.columns) + " |")
    lines.append("")
    if table.note:
        lines += [table.note, ""]
    return lines


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3f}"
    return str(value)
