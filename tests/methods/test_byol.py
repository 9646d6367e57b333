"""BYOL's momentum (EMA) target update, through the method's own Lightning training step.

A real ``Trainer.fit`` of a few steps: ``SSLModule.training_step`` calls ``MomentumMethod.before_step``, which moves
each target network towards its online network with a momentum cosine-annealed from ``method.momentum`` to 1
(lightly's ``cosine_schedule``). The expected target is recomputed here from copies taken before each step.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from lightly.utils.scheduler import cosine_schedule
from torch.utils.data import DataLoader

from sslcell.methods import build_method
from tests.conftest import tiny_image_recipe, tiny_recipe

MAX_STEPS = 3  # one epoch of three batches; the schedule's total is the planned number of optimiser steps
MOMENTUM = 0.5  # far from 1, so that a wrong or missing update is far outside the tolerance
EXPECTED_MOMENTUM = [0.5, 0.75, 1.0]  # 1 - (1 - 0.5) * (cos(pi * step / 2) + 1) / 2 for steps 0, 1, 2
PAIRS = [("encoder", "encoder_momentum"), ("projection", "projection_momentum")]  # (online, target)
N_GENES, C, S = 30, 4, 16


def _expression():
    config = tiny_recipe("byol", method={"momentum": MOMENTUM}, optim={"lr": 1e-2})
    contract = {"modality": "expression", "genes": [f"g{i}" for i in range(N_GENES)], "target_sum": 1e4,
                "counts_are_log_normalized": False}
    g = torch.Generator().manual_seed(0)
    data = torch.poisson(torch.rand(48, N_GENES, generator=g) * 5, generator=g)  # (48, G) counts
    return config, contract, data


def _image():
    config = tiny_image_recipe("byol", "resnet", method={"momentum": MOMENTUM}, optim={"lr": 1e-2})
    contract = {"modality": "image", "channel_names": ["brightfield", "dna", "darkfield", "actin"],
                "channel_mean": [100.0] * C, "channel_std": [10.0] * C, "image_size": [S, S], "dtype": "uint16"}
    data = torch.randint(0, 400, (48, C, S, S), generator=torch.Generator().manual_seed(0)).to(torch.uint16)
    return config, contract, data


def _params(model, name: str) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in getattr(model, name).named_parameters()}


class _Record(pl.Callback):
    """Copies of the online and target parameters just before and just after each training batch."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append({
            "global_step": pl_module.global_step,
            "total": trainer.estimated_stepping_batches,
            "before": {name: _params(pl_module, name) for pair in PAIRS for name in pair},
        })

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = self.steps[-1]
        step["after"] = {name: _params(pl_module, name) for pair in PAIRS for name in pair}
        step["target_grads"] = [p.grad for _, target in PAIRS for p in getattr(pl_module, target).parameters()]
        step["optimised"] = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}


@pytest.mark.parametrize("make", [_expression, _image], ids=["expression", "image"])
def test_target_is_the_ema_of_the_online_network_through_training_step(make):
    config, contract, data = make()
    assert config.method.momentum == MOMENTUM
    torch.manual_seed(0)
    model = build_method(config, contract)
    initial = {target: _params(model, target) for _, target in PAIRS}
    record = _Record()
    trainer = pl.Trainer(max_steps=MAX_STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[record])
    trainer.fit(model, DataLoader(data, batch_size=16))

    assert [s["global_step"] for s in record.steps] == list(range(MAX_STEPS))
    target_ids = {id(p) for _, target in PAIRS for p in getattr(model, target).parameters()}
    for step in record.steps:
        s = step["global_step"]
        assert step["total"] == MAX_STEPS
        momentum = cosine_schedule(s, MAX_STEPS, config.method.momentum, 1.0)
        assert momentum == pytest.approx(EXPECTED_MOMENTUM[s])
        for online, target in PAIRS:
            before_online, before_target = step["before"][online], step["before"][target]
            after_online, after_target = step["after"][online], step["after"][target]
            assert before_online.keys() == before_target.keys() == after_target.keys()
            # (2) the target moved by exactly one EMA step towards the online network as it was before the step
            for k, t in before_target.items():
                expected = t * momentum + before_online[k] * (1.0 - momentum)
                torch.testing.assert_close(after_target[k], expected, rtol=1e-6, atol=1e-7, msg=f"{target}.{k}")
            # the optimiser did step the online network (so the EMA check above is not vacuous) ...
            assert any(not torch.equal(after_online[k], before_online[k]) for k in before_online), online
            if s > 0 and EXPECTED_MOMENTUM[s] != MOMENTUM:
                # ... and the check tells the scheduled momentum from the unscheduled start value
                assert any(
                    not torch.allclose(after_target[k], t * MOMENTUM + before_online[k] * (1.0 - MOMENTUM),
                                       rtol=1e-6, atol=1e-7)
                    for k, t in before_target.items()
                ), target
        # (3) the target gets no gradient and is not among the optimiser's parameters
        assert all(g is None for g in step["target_grads"])
        assert not target_ids & step["optimised"]
    assert all(not p.requires_grad for _, target in PAIRS for p in getattr(model, target).parameters())

    # (1) the targets changed over the run (step 0 cannot move them: online and target start equal)
    assert step is record.steps[-1]
    for _, target in PAIRS:
        final = _params(model, target)
        changed = [k for k, p in initial[target].items() if not torch.equal(final[k], p)]
        assert changed and len(changed) >= len(final) // 2, (target, changed)
