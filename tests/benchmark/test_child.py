"""run_child: a fresh process per call, with or without a zygote that preloads modules."""

from __future__ import annotations

import os
import signal
import time

import pytest

from sslcell.benchmark import child
from sslcell.benchmark.child import run_child

TARGET = "tests.benchmark.child_targets"


@pytest.mark.parametrize("preload", [(), ("colorsys",)])
def test_each_call_is_a_fresh_process_with_its_output_and_environment(tmp_path, preload):
    lines: list[str] = []
    runs = [run_child(f"{TARGET}:where", {"i": i}, tmp_path / str(i), env={"OMP_WAIT_POLICY": "PASSIVE"},
                      on_line=lines.append, preload=preload) for i in range(2)]
    assert [r["echo"] for r in runs] == [{"i": 0}, {"i": 1}]
    assert [r["calls"] for r in runs] == [1, 1]  # nothing left behind by the first child
    assert len({r["pid"] for r in runs} | {os.getpid()}) == 3
    assert all(r["omp"] == "PASSIVE" for r in runs)
    assert lines == ["first line", "second line"] * 2
    if preload:  # both forked from one zygote, which imported colorsys
        assert runs[0]["parent"] == runs[1]["parent"] != os.getpid() and all(r["colorsys"] for r in runs)
    else:
        assert {r["parent"] for r in runs} == {os.getpid()}


@pytest.mark.parametrize("preload", [(), ("colorsys",)])
def test_a_failing_child_raises_with_its_traceback(tmp_path, preload):
    with pytest.raises(RuntimeError, match=r"(?s)child_targets:fail failed in its own process \(exit code 1\).*"
                                           r"KeyError: 'seed'"):
        run_child(f"{TARGET}:fail", {}, tmp_path, preload=preload)
    assert run_child(f"{TARGET}:fail", {"seed": 3}, tmp_path, preload=preload) == {"seed": 3}  # the zygote lives on


def test_a_module_the_zygote_cannot_import_is_named(tmp_path):
    with pytest.raises(RuntimeError, match=r"(?s)preloading \['no_such_module_for_sslcell'\] exited.*"
                                           "ModuleNotFoundError"):
        run_child(f"{TARGET}:where", {}, tmp_path, preload=("no_such_module_for_sslcell",))
    assert run_child(f"{TARGET}:where", {}, tmp_path, preload=("colorsys",))["colorsys"]


def test_one_zygote_at_a_time(tmp_path):
    run_child(f"{TARGET}:where", {}, tmp_path, preload=("colorsys",))
    (first, _), = child._ZYGOTES.values()
    run_child(f"{TARGET}:where", {}, tmp_path, preload=("colorsys",), env={"SSLCELL_TEST": "1"})
    assert first.poll() is not None and len(child._ZYGOTES) == 1  # another environment: the first one stopped


@pytest.mark.parametrize("preload", [(), ("colorsys",)])
def test_a_child_runs_in_the_callers_folder_and_reads_no_request_pipe(tmp_path, monkeypatch, preload):
    run_child(f"{TARGET}:cwd", {}, tmp_path / "first", preload=preload)  # a zygote started in another folder
    monkeypatch.chdir(tmp_path)
    assert run_child(f"{TARGET}:cwd", {}, tmp_path / "w", preload=preload)["cwd"] == str(tmp_path)
    assert run_child(f"{TARGET}:read_stdin", {}, tmp_path / "w", preload=preload) == {"got": ""}  # no deadlock
    with pytest.raises(RuntimeError, match=r"exit code 3"):
        run_child(f"{TARGET}:stop", {"code": 3}, tmp_path / "w", preload=preload)


def test_an_interrupted_call_leaves_no_answer_for_the_next(tmp_path):
    def interrupt(*_):
        raise TimeoutError("interrupted")

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.alarm(1)
        with pytest.raises(TimeoutError):
            run_child(f"{TARGET}:sleep", {"seconds": 30}, tmp_path / "a", preload=("colorsys",))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert child._ZYGOTES == {}  # killed with the child it ran
    start = time.perf_counter()
    assert run_child(f"{TARGET}:sleep", {"seconds": 0.5}, tmp_path / "b", preload=("colorsys",)) == {"slept": 0.5}
    assert time.perf_counter() - start >= 0.5
