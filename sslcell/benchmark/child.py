"""Run one function of a task module in a fresh Python process: timings and memory free of the runner's state.

A speed or memory measurement should not see what the runner has loaded or allocated (other task kinds, Lightning,
earlier tasks' tensors), nor the thread pools it has warmed. :func:`run_child` starts ``python -c`` with a small
launcher that loads the task's module from its file, under its own name, without running the package's
``__init__`` (which imports every task kind, some with Lightning: seconds of start-up per child, and memory a probe
would count); DataLoader workers that unpickle its classes import it the ordinary way.

Many short children that all import the same heavy libraries (torch, Lightning: ~8 s per start on two cores) pass
``preload``: they are forked from a zygote, a process started once per set of modules and environment, which has
imported those modules and nothing else (no tensor allocated, no thread pool started, no CUDA). Each child is still
a process of its own, loads the task's module by file as above, and leaves nothing behind for the next; but a forked
process counts the preloaded libraries' pages only as it touches them, so its memory figures are lower than a fresh
process's: measurements whose memory is reported use it only under ``--quick``, and say so (:func:`preloaded_note`).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
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


# The zygote: imports the modules named in its arguments, then, for each request line on stdin (JSON: the _CHILD
# arguments, the caller's working directory, the files for the child's stdout and stderr), forks a child that runs
# it as _CHILD would (stdin from /dev/null: the request pipe is not the child's), waits for it, and answers its
# exit code on stdout.
_ZYGOTE = """
import importlib, json, os, sys, traceback
for name in sys.argv[1:]:
    importlib.import_module(name)
sys.stdout.flush()
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["out"], os.O_WRONLY | os.O_CREAT |
                                    os.O_TRUNC), (2, request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
                opened = os.open(path, flags, 0o666)
                os.dup2(opened, fd)
                os.close(opened)
            sys.stdin = open(0, closefd=False)
            os.chdir(request["cwd"])
            sys.argv = ["-c", *request["argv"]]
            exec(compile(request["child"], "<sslcell child>", "exec"), {"__name__": "__main__"})
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""
_ZYGOTES: dict[tuple, tuple[subprocess.Popen, Path]] = {}


def preloaded_note(what: str, modules: str) -> str:
    """The results' note for ``--quick`` runs whose ``what`` (probe, entry) forked from a zygote of ``modules``."""
    return (f"--quick: each {what} was forked from a process that had imported {modules} once; such a process counts "
            "library pages only as it touches them, so its memory figures are lower than a fresh process's (a full "
            f"run starts each {what} afresh).")


def run_child(target: str, spec: dict[str, Any], workdir: Path, *, env: dict[str, str] | None = None,
              on_line: Callable[[str], None] | None = None, preload: tuple[str, ...] = ()) -> dict[str, Any]:
    """Call ``target`` (``"module:function"``) with the JSON-able ``spec`` in a fresh Python process; its result.

    The function returns a JSON-able dict, passed back through a file in ``workdir``; each line it prints goes to
    ``on_line`` (as it is printed; with ``preload``, when the child ends). ``env`` is added to this process's
    environment (e.g. variables read when a library loads). ``preload``: modules imported once, by a zygote the
    child is forked from (see the module's docstring). Raises ``RuntimeError`` with the end of the child's stderr if
    it fails.
    """
    import importlib

    module, function = target.split(":")
    path = importlib.import_module(module).__file__
    workdir.mkdir(parents=True, exist_ok=True)
    stem = workdir / function
    spec_path, result_path, out_path, err_path = (
        stem.with_suffix(s) for s in (".spec.json", ".result.json", ".stdout", ".stderr"))
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    argv = [module, str(path), function, str(spec_path), str(result_path)]
    environment = os.environ | (env or {})
    if preload:
        code = _run_forked(argv, out_path, err_path, preload, environment)
        for line in out_path.read_text(errors="replace").splitlines() if on_line is not None else ():
            on_line(line)
    else:
        command = [sys.executable, "-c", _CHILD, *argv]
        with open(err_path, "w") as err, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True,
                                                          env=environment) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                if on_line is not None:
                    on_line(line.rstrip("\n"))
        code = proc.returncode
    if code != 0 or not result_path.exists():
        tail = err_path.read_text(errors="replace").strip().splitlines()[-15:]
        raise RuntimeError(f"{target} failed in its own process (exit code {code}):\n" + "\n".join(tail))
    return json.loads(result_path.read_text())


def _run_forked(argv: list[str], out: Path, err: Path, preload: tuple[str, ...], environment: dict[str, str]) -> int:
    """Run the child ``argv`` forked from the zygote of ``preload`` and ``environment`` (started on first use, and
    kept until a child needs another, or this process exits); its exit code."""
    key = (sys.executable, tuple(preload), tuple(sorted(environment.items())))
    proc, log = _ZYGOTES.get(key, (None, Path()))
    if proc is None or proc.poll() is not None:
        _stop_zygotes()  # one at a time: each holds its preloaded modules in memory
        handle, name = tempfile.mkstemp(prefix="sslcell_zygote_", suffix=".stderr")
        with os.fdopen(handle, "w") as zygote_err:
            proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE, *preload], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=zygote_err, text=True, env=environment,
                                    start_new_session=True)
        log = Path(name)
        _ZYGOTES[key] = proc, log
    assert proc.stdin is not None and proc.stdout is not None
    request = {"argv": argv, "child": _CHILD, "cwd": os.getcwd(), "out": str(out), "err": str(err)}
    try:
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()
        answer = proc.stdout.readline()
    except BrokenPipeError:
        answer = ""
    except BaseException:  # interrupted while the child runs: its answer would be read by the next call
        _stop_zygotes(kill=True)
        raise
    if not answer:  # the zygote died: most likely a preloaded module failed to import
        proc.wait()
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        _stop_zygotes()
        raise RuntimeError(f"the process preloading {list(preload)} exited (code {proc.returncode}):\n"
                           + "\n".join(tail))
    return int(answer)


@atexit.register
def _stop_zygotes(kill: bool = False) -> None:
    """End every zygote (``kill``: at once, with the child it runs) and remove its log."""
    for proc, log in _ZYGOTES.values():
        if kill:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its own process group: the zygote and the child it runs
            except ProcessLookupError:
                pass
        for pipe in (proc.stdin, proc.stdout):
            try:
                if pipe is not None:
                    pipe.close()  # the zygote's loop ends at the end of its input
            except OSError:
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.unlink(missing_ok=True)
    _ZYGOTES.clear()
