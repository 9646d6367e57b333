"""Kind ``crop_augmentation``: sslcell's batched crop augmentation against lightly's ``SimCLRTransform``.

Both sides make two augmented ``size x size`` views of every input crop on the same CPU, in one run, in
interleaved rounds (lightly, sslcell, the information rows, then the next round); each row reports its median
images/s, and the verdict is the median over rounds of the per-round speed-up (each ratio is taken under one load,
so it is robust to a shared machine):

* peer ``lightly``: ``SimCLRTransform(input_size=size)`` on PIL images of the RGB uint8 crops ``(size, size, 3)``,
  per sample, through a torch ``DataLoader`` (batch ``batch_size``, ``workers`` persistent worker processes), as
  lightly's examples do.
* sslcell (the ratio's numerator): the same crops as a uint8 tensor ``(N, 3, size, size)``; per batch: gather, then
  ``two_views(ImageAugment(config), x, mean=..., std=...)`` with the default config at ``output_size=size``, which
  converts and normalises per channel on the way (on CPU inside its compiled kernel,
  :mod:`sslcell.augment.image.cpu_kernel`), in the main process with ``threads`` torch threads (default: as many as
  lightly's workers; the kernel runs ranges of the batch on that many Python threads).
* For information: sslcell with lightly's process layout (the whole-batch augmentation inside ``workers`` DataLoader
  workers, 1 thread each); sslcell with the op set closest to SimCLRTransform's; sslcell on 2-channel uint16 crops
  (which lightly cannot take as they are); and, when the run's device is a GPU, sslcell on that GPU (crops already
  there, a CUDA generator, synchronised at the end).

Throughput counts input images per second (each gives two views); a round is timed from the first batch received to
the last, so worker start-up and pipeline fill are not counted. After the rounds, a breakdown times the ops one by
one on one batch (best of ``breakdown_reps``).

``OMP_WAIT_POLICY``: on a shared, oversubscribed machine OpenMP threads that spin at barriers made a 2-thread run 3x
slower than 1 thread, so the measurement runs in a fresh Python process whose environment has
``OMP_WAIT_POLICY=PASSIVE`` (unless the caller set it): OpenMP reads it once, when torch loads, so it cannot be set in
a process that has imported torch already. The value in force is recorded.

Data (optional; synthetic uniform crops where a role is not given): ``rgb``, crops ``(N, 3, H, W)`` uint8 (e.g.
``chula_rbc12_crops48.npz``), and ``uint16``, crops ``(N, C, H, W)`` uint16 (e.g. ``jurkat_cellcycle_ifc_mlcp.npz``
with ``uint16_channels: [0, 2]``), each resized bilinearly to ``size`` and repeated up to ``n_images``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sslcell.benchmark.child import run_child
from sslcell.benchmark.registry import Context, Table, Target, TaskKind, TaskResult, register
from sslcell.errors import ConfigError

# The ops closest to SimCLRTransform's (crop scale 0.08-1, horizontal flip, brightness / contrast jitter p 0.8, blur
# p 0.5 with sigma 0.1-2); no vertical flip, turns, rotation, gamma or noise.
SIMCLR_LIKE = dict(scale=(0.08, 1.0), vflip=0.0, rot90=False, rotation_degrees=0.0, brightness=0.4, contrast=0.4,
                   gamma=0.0, p_intensity=0.8, blur_p=0.5, blur_sigma=(0.1, 2.0), noise_p=0.0)
DATA_ROLES = ("rgb", "uint16")
ROWS = {  # key -> label, in table order
    "lightly": "lightly SimCLRTransform, RGB uint8 (PIL, per sample, DataLoader workers)",
    "sslcell": "sslcell ImageAugment, RGB uint8, main process (the ratio's numerator)",
    "sslcell_workers": "sslcell ImageAugment, RGB uint8, in DataLoader workers x 1 thread (info)",
    "sslcell_simclr_like": "sslcell ImageAugment, RGB uint8, SimCLR-like op set (info)",
    "sslcell_uint16": "sslcell ImageAugment, 2-channel uint16 (info)",
    "sslcell_cuda": "sslcell ImageAugment, RGB uint8, on the GPU (info)",
}


@dataclass
class CropAugmentationParams:
    """Settings of a ``crop_augmentation`` task (see the module docstring)."""

    n_images: int = 4096  # crops per round
    batch_size: int = 256
    rounds: int = 7  # interleaved rounds; medians are reported
    size: int = 64  # side of the input crops (resized to it) and of the views
    workers: int = 2  # lightly's DataLoader worker processes (and the info row's)
    threads: int = 0  # sslcell's torch threads in the main process; 0: as many as workers
    uint16_channels: list[int] | None = None  # channels of the uint16 crops (None: all)
    augment: dict[str, Any] = field(default_factory=dict)  # ImageAugmentConfig fields over the defaults
    breakdown_reps: int = 15  # the stage breakdown times each stage this many times (best kept); 0: no breakdown
    target: float = 10.0  # speed-up over lightly the run must reach

    def check(self) -> None:
        for name in ("batch_size", "rounds", "size", "workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.target <= 0:
            raise ConfigError(f"target: a speed-up, must be > 0, got {self.target}")
        if self.n_images < 2 * self.batch_size:
            raise ConfigError(f"n_images: must be >= 2 x batch_size = {2 * self.batch_size} (a round is timed from "
                              f"its first batch to its last), got {self.n_images}")
        if self.threads < 0 or self.breakdown_reps < 0:
            raise ConfigError("threads: must be >= 0" if self.threads < 0 else "breakdown_reps: must be >= 0")
        from sslcell.methods.inputs import image_augment_config

        try:
            image_augment_config(self.augment | {"output_size": self.size})
        except ConfigError as err:
            message = str(err).replace("method.augment", "augment").replace("ImageAugmentConfig.", "augment.")
            raise ConfigError(message if message.startswith("augment") else f"augment: {message}") from None


def run(task: Any, ctx: Context) -> TaskResult:
    """Measure in a child process (see the module docstring), then tabulate."""
    from sslcell.inference import default_device

    p: CropAugmentationParams = task.params
    device = default_device(None if ctx.device == "auto" else ctx.device).type
    spec = {"params": dataclasses.asdict(p), "seed": ctx.seed, "device": device, "peers": list(task.peers),
            "data": {role: str(path) for role, path in task.data.items()}}
    policy = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    rounds = iter(ctx.steps(range(p.rounds), desc="augmentation rounds"))

    def on_line(line: str) -> None:
        if line.startswith("round "):
            next(rounds, None)
            ctx.log(line)

    m = run_child(f"{__name__}:measure", spec, ctx.workdir, env={"OMP_WAIT_POLICY": policy}, on_line=on_line)
    for _ in rounds:
        pass
    return _result(p, m)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """The interleaved rounds and the stage breakdown, in this (child) process; JSON-able numbers."""
    p = CropAugmentationParams(**spec["params"])
    seed, data = spec["seed"], spec["data"]

    import numpy as np
    import torch

    from sslcell.augment.image import ImageAugment, ImageAugmentConfig

    torch.set_num_threads(p.threads or p.workers)
    torch.manual_seed(seed)
    rgb, rgb_source = load_crops(data.get("rgb"), p.n_images, p.size, np.uint8, seed, channels=None)
    if rgb.shape[1] != 3:
        raise ConfigError(f"data.rgb: lightly's SimCLRTransform needs RGB crops (N, 3, H, W); got {rgb.shape}")
    u16, u16_source = load_crops(data.get("uint16"), p.n_images, p.size, np.uint16, seed, channels=p.uint16_channels)
    # p.augment was checked in the parent (check()); YAML lists become the tuples the config holds
    config = ImageAugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in p.augment.items()},
                                output_size=p.size)
    augment = ImageAugment(config)
    simclr_config = dataclasses.replace(config, **SIMCLR_LIKE)
    simclr_like = ImageAugment(simclr_config)
    rgb_t, u16_t = torch.from_numpy(rgb), torch.from_numpy(u16)
    generator = torch.Generator().manual_seed(seed)
    for images, aug in ((rgb_t, augment), (rgb_t, simclr_like), (u16_t, augment)):
        for _ in sslcell_batches(images[: 2 * p.batch_size], aug, p.batch_size, generator):
            pass  # warm-up: the compiled kernel for this dtype and config, the allocator
    pipelines: dict[str, Callable[[], Iterable[Any]]] = {}
    if "lightly" in spec["peers"]:
        lightly_loader = _lightly_loader(rgb, p, seed)
        pipelines["lightly"] = lambda: lightly_loader
    pipelines["sslcell"] = lambda: sslcell_batches(rgb_t, augment, p.batch_size, generator)
    worker_loader = torch.utils.data.DataLoader(
        BatchAugmentDataset(rgb_t, augment, seed), batch_size=None, num_workers=p.workers, persistent_workers=True,
        sampler=torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(
            rgb_t, generator=torch.Generator().manual_seed(seed)), p.batch_size, drop_last=False))
    pipelines["sslcell_workers"] = lambda: worker_loader
    pipelines["sslcell_simclr_like"] = lambda: sslcell_batches(rgb_t, simclr_like, p.batch_size, generator)
    pipelines["sslcell_uint16"] = lambda: sslcell_batches(u16_t, augment, p.batch_size, generator)
    if spec["device"] == "cuda":  # last in each round and set up there: the workers above fork before CUDA starts
        gpu: dict[str, Any] = {}

        def cuda_batches() -> Iterator[tuple[Any, Any]]:
            if not gpu:
                gpu.update(images=rgb_t.cuda(), generator=torch.Generator("cuda").manual_seed(seed))
            return sslcell_batches(gpu["images"], augment, p.batch_size, gpu["generator"])

        pipelines["sslcell_cuda"] = cuda_batches
    load_before = os.getloadavg()
    per_round: dict[str, list[float]] = {name: [] for name in pipelines}
    for r in range(p.rounds):
        for name, batches in pipelines.items():
            per_round[name].append(images_per_second(batches(), cuda=name == "sslcell_cuda"))
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.0f} img/s" for k, v in per_round.items()), flush=True)
    load_after = os.getloadavg()
    breakdown = stage_breakdown(rgb_t, config, p.batch_size, seed, p.breakdown_reps) if p.breakdown_reps else {}
    return {"images_per_second": per_round, "stage_ms": breakdown, "load_average": [load_before, load_after],
            "data": {"rgb_uint8": rgb_source, "uint16": u16_source}, "config": dataclasses.asdict(config),
            "simclr_like": dataclasses.asdict(simclr_config),
            "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "gpu": torch.cuda.get_device_name() if spec["device"] == "cuda" else None,
            "versions": _peer_versions("lightly" in spec["peers"])}


def load_crops(path: str | None, n: int, size: int, dtype: Any, seed: int,
               channels: list[int] | None) -> tuple[Any, str]:
    """``(n, C, size, size)`` crops of ``dtype`` from ``path`` (resized bilinearly, repeated up to ``n``), or, without
    a path, uniform random ones (3 channels for uint8, 2 for uint16); and a line saying where they came from."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from sslcell.data.images import CellImages

    if path is None:
        c = 3 if dtype == np.uint8 else 2
        out = np.random.default_rng(seed).integers(0, np.iinfo(dtype).max + 1, (n, c, size, size), dtype=dtype)
        return out, f"synthetic uniform {np.dtype(dtype).name} (no data file given)"
    cells = CellImages.read(path, channels=channels)
    if cells.dtype != dtype:
        raise ConfigError(f"data: {path} holds {cells.dtype} crops; this role needs {np.dtype(dtype).name}")
    take = min(n, len(cells))
    crops = cells.batch(np.arange(take))
    h, w = crops.shape[2:]
    if (h, w) != (size, size):
        up = F.interpolate(torch.from_numpy(crops.astype(np.float32)), size=size, mode="bilinear",
                           align_corners=False)
        crops = up.round().clamp(0, np.iinfo(dtype).max).numpy().astype(dtype)
    out = np.ascontiguousarray(np.concatenate([crops] * -(-n // take))[:n])
    kept = f" channels {', '.join(map(str, channels))}" if channels is not None else ""
    return out, f"{Path(path).name} images[:{take}]{kept}, bilinear {h}x{w} -> {size}x{size}" + (
        f", repeated to {n}" if take < n else "")


def sslcell_batches(images: Any, augment: Any, batch_size: int, generator: Any) -> Iterator[tuple[Any, Any]]:
    """Shuffled batches of raw crops ``images`` (N, C, H, W) -> two views of each, normalised per channel."""
    import torch

    from sslcell.augment.image import two_views

    mean, std = channel_stats(images)
    order = torch.randperm(len(images), generator=generator, device=generator.device).to(images.device)
    for start in range(0, len(images), batch_size):
        yield two_views(augment, images[order[start : start + batch_size]], generator, mean=mean, std=std)


def channel_stats(images: Any) -> tuple[Any, Any]:
    """Per-channel mean and std ``(C,)`` of raw crops (N, C, H, W), as a model's input contract holds them."""
    import torch

    from sslcell.data.images import CellImages

    stats = CellImages.from_array(images.cpu().numpy()).channel_stats()
    return (torch.tensor(stats["mean"], dtype=torch.float32, device=images.device),
            torch.tensor(stats["std"], dtype=torch.float32, device=images.device))


class BatchAugmentDataset:
    """Map-style dataset whose item is a list of indices -> two views of that batch (runs in a DataLoader worker)."""

    def __init__(self, images: Any, augment: Any, seed: int) -> None:
        self.images, self.augment, self.seed = images, augment, seed
        self.mean, self.std = channel_stats(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, indices: list[int]) -> tuple[Any, Any]:
        import torch

        from sslcell.augment.image import two_views

        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + indices[0])
        return two_views(self.augment, self.images[torch.as_tensor(indices)], generator, mean=self.mean, std=self.std)


class PILDataset:
    """Map-style dataset: crop ``i`` of (N, H, W, 3) uint8 as a PIL image, through ``transform`` (lightly's)."""

    def __init__(self, images: Any, transform: Callable[[Any], Any]) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Any:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i]))


def _lightly_loader(rgb: Any, p: CropAugmentationParams, seed: int) -> Any:
    import numpy as np
    import torch
    from lightly.transforms import SimCLRTransform

    hwc = np.ascontiguousarray(rgb.transpose(0, 2, 3, 1))  # PIL wants (H, W, 3)
    return torch.utils.data.DataLoader(
        PILDataset(hwc, SimCLRTransform(input_size=p.size)), batch_size=p.batch_size, shuffle=True,
        num_workers=p.workers, persistent_workers=True, generator=torch.Generator().manual_seed(seed))


def images_per_second(batches: Iterable[Any], cuda: bool = False,
                      clock: Callable[[], float] = time.perf_counter) -> float:
    """Input images per second from the first batch received to the last (batches are pairs of views ``(B, ...)``);
    with ``cuda``, the GPU's queued work is waited for at both ends."""
    import torch

    n, start = 0, None
    for views in batches:
        if start is None:
            if cuda:
                torch.cuda.synchronize()
            start = clock()
            continue
        n += views[0].shape[0]
    if cuda:
        torch.cuda.synchronize()
    if start is None or n == 0:
        raise ValueError("a round needs at least two batches")
    return n / (clock() - start)


def stage_breakdown(images: Any, config: Any, batch_size: int, seed: int, reps: int) -> dict[str, float]:
    """Milliseconds (best of ``reps``) per stage of one two-view batch of ``batch_size`` crops, same threads.

    First the functional ops, each on the float batch of ``2 * batch_size`` views (each returns a copy); then
    ``two_views`` of the raw batch with the ops switched on one by one (the differences are what each op costs
    inside the fused pipeline); the last line is the call the rounds time.
    """
    import torch

    from sslcell.augment.image import (
        ImageAugment,
        gaussian_blur,
        gaussian_noise,
        intensity_jitter,
        random_resized_crop_flip_rotate,
        two_views,
    )

    c, g = config, torch.Generator().manual_seed(seed)
    mean, std = channel_stats(images)
    raw = images[:batch_size]
    x = (raw.float() - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    views = torch.cat([x, x])

    def geometry() -> Any:
        return random_resized_crop_flip_rotate(views, c.output_size, c.scale, c.ratio, c.hflip, c.vflip, c.rot90,
                                               c.rotation_degrees, c.padding_mode, g, rotation_p=c.rotation_p)

    y = geometry()
    off = dict(brightness=0.0, contrast=0.0, gamma=0.0, blur_p=0.0, noise_p=0.0)
    only = {what: ImageAugment(dataclasses.replace(c, **changes)) for what, changes in (
        ("geometry", off), ("geometry + intensity", dict(blur_p=0.0, noise_p=0.0)),
        ("geometry + intensity + blur", dict(noise_p=0.0)), ("all", {}))}
    stages: dict[str, Callable[[], Any]] = {
        "raw -> float, normalise in torch (the rounds fuse it into two_views)":
            lambda: raw.float().sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1)),
        f"crop + flips + rot90 + rotation (rotation_p {c.rotation_p})": geometry,
        "intensity (gamma, contrast, brightness)": lambda: intensity_jitter(y, c.brightness, c.contrast, c.gamma,
                                                                            c.p_intensity, g),
        f"blur (p {c.blur_p})": lambda: gaussian_blur(y, c.blur_sigma, c.blur_p, g),
        f"noise (p {c.noise_p})": lambda: gaussian_noise(y, c.noise_std, c.noise_p, g),
        "copy of the views (each functional op above makes one)": y.clone,
        **{f"two_views of the raw batch, {what}" + (" (what the rounds time)" if what == "all" else ""):
           (lambda a=a: two_views(a, raw, g, mean=mean, std=std)) for what, a in only.items()},
    }
    out = {}
    for name, fn in stages.items():
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[name] = 1000 * min(times)
    return out


def median_ratio(numerator: list[float], denominator: list[float]) -> tuple[float, list[float]]:
    """Median over rounds of ``numerator[r] / denominator[r]``, and the per-round ratios."""
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return statistics.median(ratios), ratios


def _result(p: CropAugmentationParams, m: dict[str, Any]) -> TaskResult:
    ips = m["images_per_second"]
    has_peer = "lightly" in ips
    rows = []
    for key, label in ROWS.items():
        if key not in ips:
            continue
        row = {"pipeline": label, "images/s (median)": statistics.median(ips[key]),
               "rounds": ", ".join(f"{v:.0f}" for v in ips[key])}
        if has_peer:
            row["x lightly (median per round)"] = median_ratio(ips[key], ips["lightly"])[0]
        rows.append(row)
    columns = ["pipeline", "images/s (median)", *(["x lightly (median per round)"] if has_peer else []), "rounds"]
    tables = [Table(f"Images/s ({p.n_images} crops of {p.size} x {p.size}, batch {p.batch_size}, two views each, "
                    f"{p.rounds} interleaved rounds)", columns, rows)]
    if m["stage_ms"]:
        tables.append(Table(
            f"Where the time goes: sslcell, default config, one batch of {p.batch_size} crops = {2 * p.batch_size} "
            f"views, best of {p.breakdown_reps}, after the rounds, same threads",
            ["stage", "ms"], [{"stage": k, "ms": v} for k, v in m["stage_ms"].items()]))
    targets, raw = [], dict(m)
    if has_peer:
        ratio, per_round = median_ratio(ips["sslcell"], ips["lightly"])
        targets.append(Target("sslcell / lightly images/s, RGB uint8 (median of per-round ratios)", ratio,
                              p.target, unit="x"))
        raw |= {"speedup": ratio, "speedup_per_round": per_round}
    loaded = max(m["load_average"][0][0], m["load_average"][1][0]) > (os.cpu_count() or 1)
    return TaskResult(tables=tables, targets=targets, notes=_notes(p, m, loaded), raw=raw)


def _notes(p: CropAugmentationParams, m: dict[str, Any], loaded: bool) -> list[str]:
    threads = p.threads or p.workers
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    notes = [
        f"Measured: input crops per second, each giving two {p.size} x {p.size} views; each round is timed from the "
        "first batch received to the last (worker start-up and pipeline fill not counted); rows run one after another "
        "within each round, and the speed-up is the median of the per-round ratios.",
        f"Parallelism: lightly in a DataLoader with {p.workers} worker processes; sslcell in the main process with "
        f"{m['torch_threads']} torch threads (its compiled CPU kernel, numba, releases the GIL and runs ranges of the "
        f"batch on that many Python threads); the info row 'in DataLoader workers' runs the whole-batch augmentation "
        f"in {p.workers} workers x 1 thread, lightly's layout. Measured in a child process with "
        f"OMP_WAIT_POLICY={m['omp_wait_policy']} (OpenMP threads spinning at barriers made a {threads}-thread run 3x "
        "slower than 1 thread on a shared machine; the variable only takes effect before torch loads).",
        f"lightly: SimCLRTransform(input_size={p.size}) with its defaults: random resized crop (scale 0.08-1), "
        "horizontal flip, colour jitter (p 0.8), random grayscale (p 0.2), gaussian blur (p 0.5), to tensor, "
        f"normalise; per sample on PIL images. Versions: {versions}.",
        "sslcell: crop + flips + 90-degree turns + rotation as one bilinear resampling, per-channel gamma / contrast "
        "/ brightness, blur and noise, all of one crop in one compiled loop nest while it is in cache (numba on CPU; "
        "the torch pipeline on a GPU); the raw uint8 / uint16 batch is converted to float and normalised per "
        "channel inside that resampling, within the timed loop. Defaults behind these numbers: rotation_p = 0.5 "
        "(half of the crops get the small rotation); the noise of a batch is read at distinct random offsets from "
        "one bank of normal draws (see sslcell.augment.image.gaussian_noise). Config: `"
        + json.dumps(m["config"]) + "`; SimCLR-like op set (info): `" + json.dumps(m["simclr_like"]) + "`.",
        f"Data: RGB {m['data']['rgb_uint8']}; uint16 {m['data']['uint16']}."
        + (f" GPU row on {m['gpu']}." if m["gpu"] else ""),
        "Load average (1, 5, 15 min) before / after the rounds: "
        + " / ".join(", ".join(f"{x:.2f}" for x in la) for la in m["load_average"]) + "."
        + (" The machine was busy with other work (load above the core count): absolute images/s are lower than on "
           "a quiet machine; the per-round ratio is the robust figure." if loaded else ""),
    ]
    return notes


def _peer_versions(lightly: bool) -> dict[str, str]:
    import PIL
    import torch
    import torchvision

    out = {"torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__}
    if lightly:
        import lightly as lightly_package

        out["lightly"] = lightly_package.__version__
    return out


register(TaskKind(
    name="crop_augmentation", params=CropAugmentationParams, run=run,
    summary="images/s of sslcell's batched crop augmentation (two views) vs lightly's SimCLRTransform (PIL, per "
            "sample, DataLoader workers), interleaved rounds; target: median per-round speed-up",
    peers=("lightly",),
    quick={"n_images": 512, "batch_size": 64, "rounds": 1, "breakdown_reps": 1},
    data_roles=DATA_ROLES,  # each optional: data: {rgb: <uint8 RGB crops>, uint16: <uint16 crops>}
))
