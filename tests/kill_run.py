"""Run a tiny pretraining in a fresh process with one torch thread (a helper of tests/test_resume.py).

    python tests/kill_run.py DATA OUT METHOD WORKERS WHERE [MAX_STEPS]
WHERE: ``step:N`` (SIGKILL right after optimiser step N and any checkpoint written then), ``sigterm:N`` (SIGTERM
there: the run stops after that batch and exits 143), ``epoch_end:E`` (right
after the checkpoint written at the end of epoch E), ``never`` (an uninterrupted run) or ``resume``. Every run of
a comparison happens in such a process, so none inherits another test's process state.
"""

from __future__ import annotations

import os
import signal
import sys

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


if __name__ == "__main__":
    torch.set_num_threads(1)
    data, out, method, workers, where = sys.argv[1:6]
    config = recipe(method, int(workers), max_steps=int(sys.argv[6]) if len(sys.argv) > 6 else -1)
    try:
        if where == "resume":
            pretrain(config, data, out, resume=True)
        else:
            pretrain(config, data, out, callbacks=[] if where == "never" else [Kill(where)])
    except RunInterrupted as err:
        print(err, file=sys.stderr)
        sys.exit(143)
