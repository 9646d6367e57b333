"""Kinds ``train_step`` and ``embed_throughput``: the shipped suite with --quick, the lightly reference's sizes, the
timing, FLOP, GPU-share and ratio arithmetic, and the errors of bad settings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sslcell.benchmark import load_suite
from sslcell.benchmark.registry import TASKS, Context
from sslcell.benchmark.tasks import _lightly_reference as lightly_ref
from sslcell.benchmark.tasks.train_speed import (
    StepClock,
    _train_result,
    peak_bf16_flops,
    step_flops,
    synthetic_crops,
    union_seconds,
)
from sslcell.cli import main
from sslcell.config import RecipeConfig, load_config
from sslcell.encoders.image import build_image_encoder
from sslcell.errors import ConfigError
from sslcell.methods import build_method
from sslcell.methods.contracts import ImageContract

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "benchmarks" / "suites" / "train_speed.yaml"


def test_suite_quick_run(tmp_path):
    assert main(["benchmark", str(SUITE), "--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0
    record = json.loads((tmp_path / "train_speed_quick.json").read_text())
    assert not record["failed"]
    train = record["tasks"]["train_step"]
    measured = train["raw"]["recipes"]
    assert set(measured) == {"image_mae_patch8", "image_simclr"}
    for name, m in measured.items():
        ips = m["images_per_second"]
        assert set(ips) == {"sslcell", "lightly"} and all(v > 0 and math.isfinite(v) for s in ips.values() for v in s)
        assert m["ratio"] == pytest.approx(ips["sslcell"][0] / ips["lightly"][0])  # one quick round
        flops, params = m["flops_per_step"], m["trainable_parameters"]
        assert flops["sslcell"] > 0 and params["sslcell"] > 1_000_000
        assert flops["lightly"] == pytest.approx(flops["sslcell"], rel=0.02), name  # the same network and batch
        assert abs(params["lightly"] - params["sslcell"]) <= 192, name  # lightly's unused mask token at most
    assert measured["image_mae_patch8"]["label"] == "MAE ViT-Tiny (patch 8)"
    assert measured["image_simclr"]["label"] == "SimCLR ResNet-18"
    targets = {t["name"]: t for t in train["targets"]}
    assert len(targets) == 2 and all(t["goal"] == 1.0 and math.isfinite(t["value"]) for t in targets.values())
    rows = train["tables"][0]["rows"]
    assert len(rows) == 4 and "MFU %" not in rows[0]  # no MFU / GPU share on CPU
    embed = record["tasks"]["embed"]["tables"][0]["rows"]
    assert [r["data"] for r in embed] == ["crops in memory", "crops in memory", ".h5ad in memory", ".h5ad backed"]
    for row in embed:
        assert row["tl.embed cells/s"] > 0 and row["plain loop cells/s"] > 0 and math.isfinite(row["x plain loop"])
        assert row["max |difference|"] < 1e-4  # both sides compute the same embedding
    md = (tmp_path / "train_speed_quick.md").read_text()
    assert "lightly reference loop" in md and "tl.embed cells/s" in md


def _image_config(path: str, **encoder_options) -> RecipeConfig:
    config = load_config(REPO / "configs" / path)
    config.encoder.options.update(encoder_options)
    return config


@pytest.mark.parametrize(("path", "options"), [("image_simclr.yaml", {}), ("image_mae.yaml", {"patch_size": 8})])
def test_lightly_reference_is_the_same_network(path, options):
    config = _image_config(path, **options)
    contract = ImageContract(("r", "g", "b"), (0.0,) * 3, (1.0,) * 3, (32, 32))
    model = build_method(config, contract)
    encoder = build_image_encoder(config.encoder.name, 3, 32, **config.encoder.options)
    reference = lightly_ref.build_reference(config, encoder, 3, 32)
    ours = sum(p.numel() for p in model.parameters() if p.requires_grad)
    theirs = sum(p.numel() for p in reference.model.parameters() if p.requires_grad)
    unused = reference.model.backbone.mask_token.numel() if config.method.name == "mae" else 0
    assert theirs - unused == ours
    images = torch.from_numpy(synthetic_crops(4, 32, 0)).permute(0, 2, 3, 1).numpy()
    batch = torch.utils.data.default_collate([lightly_ref.PILCrops(images, reference.transform)[i] for i in range(4)])
    loss = reference.step(reference.model, batch, torch.device("cpu"))
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_lightly_reference_refuses_what_it_cannot_mirror():
    assert lightly_ref.supported(_image_config("image_byol.yaml")) is not None
    assert lightly_ref.supported(load_config(REPO / "configs" / "expression_mae.yaml")) is not None
    with pytest.raises(ConfigError, match="no lightly reference"):
        lightly_ref.build_reference(_image_config("image_byol.yaml"), nn.Identity(), 3, 32)
    with pytest.raises(ConfigError, match="3 channels"):
        lightly_ref.build_reference(_image_config("image_simclr.yaml"), nn.Identity(), 2, 32)


def test_synthetic_crops():
    a = synthetic_crops(600, 32, 1)  # more than one chunk of 512
    assert a.shape == (600, 3, 32, 32) and a.dtype == np.uint8
    assert np.array_equal(a, synthetic_crops(600, 32, 1)) and not np.array_equal(a, synthetic_crops(600, 32, 2))
    centre, corner = a[:, :, 12:20, 12:20].mean(), a[:, :, :4, :4].mean()
    assert centre > corner + 30  # a cell in the middle of a dark background


def test_step_clock_times_the_steps_after_warmup():
    clock = StepClock(warmup=2, steps=3, profile_steps=4, device=torch.device("cpu"))
    assert clock.total == 5  # no profiling without CUDA
    done = [clock.step_done() for _ in range(5)]
    assert done == [False, False, False, False, True]
    assert clock.seconds >= 0 and math.isnan(clock.gpu_busy)
    assert clock.images_per_second(8) == pytest.approx(24 / clock.seconds)


def test_union_seconds_counts_overlaps_once():
    assert union_seconds([(20, 30), (0, 10), (5, 15), (12, 14)]) == pytest.approx(25e-9)
    assert union_seconds([]) == 0.0


def test_peak_by_device_name():
    assert peak_bf16_flops("NVIDIA H200") == 989.4e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756.5e12
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_bf16_flops("NVIDIA L40S") == 362.05e12  # not L4's
    assert math.isnan(peak_bf16_flops("Some GPU"))


def test_step_flops_counts_forward_and_backward():
    layer = nn.Linear(8, 4, bias=False)
    x = torch.randn(16, 8)
    assert step_flops(lambda: layer(x).sum()) == 2 * (2 * 16 * 8 * 4)  # forward, and the weight's gradient


def _measured(gpu: str | None) -> dict:
    settings = {"batch_size": 4, "workers": 2, "n_images": 64, "bf16": gpu is not None, "steps": 3, "warmup": 1,
                "rounds": 3, "profile_steps": 2 if gpu else 0, "size": 64}
    recipe = {"label": "SimCLR ResNet-18", "images_per_second": {"lightly": [10.0, 10.0, 40.0],
                                                                 "sslcell": [10.0, 30.0, 20.0]},
              "gpu_busy": {"sslcell": 0.5, "lightly": 0.25} if gpu else {}, "profile_errors": {},
              "flops_per_step": {"sslcell": 4e12, "lightly": 4e12},
              "trainable_parameters": {"sslcell": 7, "lightly": 7}, "lightly_model": "resnet"}
    return {"recipes": {"image_simclr": recipe}, "settings": settings, "device": "cuda" if gpu else "cpu",
            "gpu": gpu, "peak_bf16_flops": peak_bf16_flops(gpu) if gpu else math.nan, "has_peer": True,
            "torch_threads": 2, "omp_wait_policy": "PASSIVE",
            "versions": {"torch": "t", "torchvision": "tv", "lightly": "l"}}


def test_train_result_target_is_the_median_per_round_ratio():
    result = _train_result(_measured(None))
    (target,) = result.targets
    assert target.value == pytest.approx(1.0)  # ratios 1, 3, 0.5; the ratio of the medians would be 2
    assert target.goal == 1.0 and target.met
    sslcell_row = next(r for r in result.tables[0].rows if r["side"].startswith("sslcell"))
    assert sslcell_row["images/s (median)"] == 20.0 and sslcell_row["x lightly (median per round)"] == 1.0
    assert any("not applicable" in note for note in result.notes)


def test_train_result_on_a_gpu_gives_mfu_and_busy_share():
    result = _train_result(_measured("NVIDIA H200"))
    rows = {r["side"].split()[0]: r for r in result.tables[0].rows}
    # 4 TFLOP per step of 4 images at 20 images/s = 20 TFLOP/s of 989.4
    assert rows["sslcell"]["MFU %"] == pytest.approx(100 * 4e12 * 20 / 4 / 989.4e12)
    assert rows["sslcell"]["GPU busy %"] == 50.0 and rows["lightly"]["GPU busy %"] == 25.0
    assert "NVIDIA H200" in result.tables[0].title


def _suite(tmp_path: Path, text: str):
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    return load_suite(path, out=tmp_path / "out")


@pytest.mark.parametrize(("params", "field"), [
    ("{kind: train_step, params: {precision: fp16}}", "params.precision"),
    ("{kind: train_step, params: {warmup: 0}}", "params.warmup"),
    ("{kind: train_step, params: {batch_size: 1}}", "params.batch_size"),
    ("{kind: embed_throughput, params: {sources: [disk]}}", "params.sources"),
])
def test_bad_params_name_the_field(tmp_path, params, field):
    with pytest.raises(ConfigError, match=f"tasks\\[0\\].{field}"):
        _suite(tmp_path, f"tasks:\n  - {params}\n")


def test_a_recipe_without_a_lightly_reference_is_refused(tmp_path):
    suite = _suite(tmp_path, f"tasks:\n  - {{kind: train_step, recipes: [{REPO}/configs/image_byol.yaml], "
                             "peers: [lightly]}\n")
    ctx = Context(seed=0, quick=True, workdir=tmp_path, out_dir=tmp_path, prefix="x", device="cpu")
    with pytest.raises(ConfigError, match=r"recipes\[0\]: no lightly reference for image_byol"):
        TASKS["train_step"].run(suite.tasks[0], ctx)
