"""Where a result came from: hardware, package versions, git commit and the exact command."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from sslcell.provenance import versions

EXTRA_PACKAGES = ("torchvision", "scvi-tools", "tqdm")


def hardware() -> dict[str, Any]:
    """CPU model, cores (all / usable), memory, torch threads and the GPUs torch sees."""
    import torch

    info: dict[str, Any] = {
        "machine": platform.machine(), "system": f"{platform.system()} {platform.release()}",
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _memory_gib(), "torch_threads": torch.get_num_threads(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
    }
    return info


def describe_hardware(info: dict[str, Any]) -> str:
    """One line: ``2 cores of 'AMD EPYC ...', 24 GiB, no GPU``."""
    gpus = ", ".join(info["gpus"]) if info["gpus"] else "no GPU"
    return f"{info['usable_cores']} cores of {info['cpu']!r}, {info['memory_gib']} GiB, {gpus}"


def git_commit(start: Path | None = None) -> dict[str, Any]:
    """The commit of the repository holding ``start`` (default: sslcell's source) and whether it had edits."""
    start = start or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=start, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=start,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown (not a git checkout)", "dirty": None}
    return {"commit": commit, "dirty": bool(dirty)}


def command() -> str:
    """The command line of this process, quoted so it can be pasted back."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("sslcell", "__main__.py")):
        argv[0] = "sslcell"
    elif argv and argv[0].endswith(".py"):  # a script, e.g. benchmarks/bench_loader.py
        argv[0] = f"python {os.path.relpath(argv[0]) if os.path.isabs(argv[0]) else argv[0]}"
        return argv[0] + (" " + shlex.join(argv[1:]) if argv[1:] else "")
    return shlex.join(argv)


def provenance(seed: int) -> dict[str, Any]:
    """Everything a JSON result records about its run."""
    return {"seed": seed, "command": command(), "cwd": os.getcwd(), "git": git_commit(),
            "versions": versions() | {k: v for k, v in versions(EXTRA_PACKAGES).items() if k != "python"},
            "hardware": hardware()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None
