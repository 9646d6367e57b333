"""Run one function of a task module in a fresh Python process: timings and memory free of the runner's state.

A speed or memory measurement should not see what the runner has loaded or allocated (other task kinds, Lightning,
earlier tasks' tensors), nor the thread pools it has warmed. :func:`run_child` starts ``python -c`` with a small
launcher that loads the task's module from its file, under its own name, without running the package's
``__init__`` (which imports every task kind, some with Lightning: seconds of start-up per child, and memory a probe
would count); DataLoader workers that unpickle its classes import it the ordinary way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

_CHILD = """
import importlib.util, json, sys
name, path, function, spec_path, result_path = sys.argv[1:]
spec = importlib.util.spec_from_file_location(name, path)
module = sys.modules[name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
result = getattr(module, function)(json.loads(open(spec_path).read()))
with open(result_path, "w") as f:
    json.dump(result, f)
"""


def run_child(target: str, spec: dict[str, Any], workdir: Path, *, env: dict[str, str] | None = None,
              on_line: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Call ``target`` (``"module:function"``) with the JSON-able ``spec`` in a fresh Python process; its result.

    The function returns a JSON-able dict, passed back through a file in ``workdir``; each line it prints goes to
    ``on_line``. ``env`` is added to this process's environment (e.g. variables read when a library loads). Raises
    ``RuntimeError`` with the end of the child's stderr if it fails.
    """
    import importlib

    module, function = target.split(":")
    path = importlib.import_module(module).__file__
    workdir.mkdir(parents=True, exist_ok=True)
    stem = workdir / function
    spec_path, result_path, err_path = (stem.with_suffix(s) for s in (".spec.json", ".result.json", ".stderr"))
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    command = [sys.executable, "-c", _CHILD, module, str(path), function, str(spec_path), str(result_path)]
    with open(err_path, "w") as err, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True,
                                                      env=os.environ | (env or {})) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if on_line is not None:
                on_line(line.rstrip("\n"))
    if proc.returncode != 0 or not result_path.exists():
        tail = err_path.read_text(errors="replace").strip().splitlines()[-15:]
        raise RuntimeError(f"{target} failed in its own process (exit code {proc.returncode}):\n" + "\n".join(tail))
    return json.loads(result_path.read_text())
