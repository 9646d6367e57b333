"""Functions that tests/benchmark/test_child.py runs in child processes (run_child loads this file by path)."""

from __future__ import annotations

import os
import sys
from typing import Any

CALLS: list[int] = []  # grows in a child that calls twice; a fresh child starts with it empty


def where(spec: dict[str, Any]) -> dict[str, Any]:
    CALLS.append(1)
    print("first line")
    print("second line")
    return {"pid": os.getpid(), "parent": os.getppid(), "calls": len(CALLS), "echo": spec,
            "colorsys": "colorsys" in sys.modules, "omp": os.environ.get("OMP_WAIT_POLICY")}


def fail(spec: dict[str, Any]) -> dict[str, Any]:
    return {"seed": spec["seed"]}  # KeyError without it


def read_stdin(spec: dict[str, Any]) -> dict[str, Any]:
    import subprocess

    return {"got": subprocess.run(["head", "-c", "1"], capture_output=True, text=True, timeout=20).stdout}


def cwd(spec: dict[str, Any]) -> dict[str, Any]:
    return {"cwd": os.getcwd()}


def sleep(spec: dict[str, Any]) -> dict[str, Any]:
    import time

    time.sleep(spec["seconds"])
    return {"slept": spec["seconds"]}


def stop(spec: dict[str, Any]) -> dict[str, Any]:
    sys.exit(spec["code"])
