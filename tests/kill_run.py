"""Run tiny pretrainings, each in a fresh forked process with one torch thread (a helper of tests/test_resume.py).

    python tests/kill_run.py JOBS.json

JOBS.json holds a list of chains, each a list of runs ``{"data", "out", "method", "workers", "where", "max_steps",
"log"}`` done one after another (a killed run, then its resume). ``where``: ``step:N`` (SIGKILL right after
optimiser step N and any checkpoint written then), ``sigterm:N`` (SIGTERM there: the run stops after that batch and
exits 143), ``epoch_end:E`` (right after the checkpoint written at the end of epoch E), ``never`` (an uninterrupted
run) or ``resume``. The driver imports torch and Lightning once, then forks a child per run before training anything,
so no run inherits another's process state (or a test's); two chains run at a time, one thread each. Each run's
stdout and stderr go to its ``log``; the exit statuses (negative: killed by that signal, as ``subprocess`` reports
them) are written to JOBS.json's ``.done`` file as a list per chain; a killed run's last checkpoint, as the kill
left it, is copied to its log's name + ``.ckpt`` before the resume.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import traceback
from pathlib import Path

import pytorch_lightning as pl
import torch

from sslcell.errors import RunInterrupted
from sslcell.train import pretrain
from tests.conftest import tiny_image_recipe, tiny_recipe


def recipe(method: str, workers: int, max_epochs: int = 3, every: int = 4, max_steps: int = -1):
    """``method``: an expression method, or ``image_<method>`` (a tiny ResNet on crops)."""
    train = {"max_epochs": max_epochs, "checkpoint_every_n_steps": every, "max_steps": max_steps}
    if method.startswith("image_"):
        return tiny_image_recipe(method.removeprefix("image_"), data={"num_workers": workers, "batch_size": 16},
                                 train=train)
    return tiny_recipe(method, data={"num_workers": workers}, train=train)


class Kill(pl.Callback):
    def __init__(self, where: str) -> None:
        kind, value = where.split(":")
        self.kind, self.value = kind, int(value)

    def on_train_batch_end(self, trainer, *args) -> None:
        if self.kind in ("step", "sigterm") and trainer.global_step == self.value:
            os.kill(os.getpid(), signal.SIGKILL if self.kind == "step" else signal.SIGTERM)

    def on_train_epoch_end(self, trainer, module) -> None:
        if self.kind == "epoch_end" and trainer.current_epoch == self.value:
            os.kill(os.getpid(), signal.SIGKILL)


def train(job: dict) -> int:
    """One run, in the forked child; its exit status."""
    config = recipe(job["method"], int(job["workers"]), max_steps=int(job["max_steps"]))
    try:
        if job["where"] == "resume":
            pretrain(config, job["data"], job["out"], resume=True)
        else:
            pretrain(config, job["data"], job["out"], callbacks=[] if job["where"] == "never" else [Kill(job["where"])])
    except RunInterrupted as err:
        print(err, file=sys.stderr)
        return 143
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def start(job: dict) -> int:
    """Fork a child that runs ``job`` with its output in ``job["log"]``; its pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        code = train(job)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(jobs_file: Path, parallel: int = 2) -> None:
    chains = json.loads(jobs_file.read_text())
    codes: list[list[int]] = [[] for _ in chains]
    waiting, running = list(range(len(chains))), {}  # running: pid -> chain
    while waiting or running:
        while waiting and len(running) < parallel:
            chain = waiting.pop(0)
            running[start(chains[chain][0])] = chain
        pid, status = os.wait()
        chain = running.pop(pid)
        codes[chain].append(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
        job = chains[chain][len(codes[chain]) - 1]
        last = Path(job["out"]) / "checkpoints" / "last.ckpt"
        if job["where"] not in ("never", "resume") and last.is_file():  # as the kill left it, before any resume
            shutil.copyfile(last, job["log"] + ".ckpt")
        if len(codes[chain]) < len(chains[chain]):
            running[start(chains[chain][len(codes[chain])])] = chain
    jobs_file.with_suffix(".done").write_text(json.dumps(codes))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
