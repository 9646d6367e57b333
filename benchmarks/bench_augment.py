"""Speed of sslcell's batched image augmentation against lightly's SimCLRTransform (PIL, per sample).

Both produce two augmented 64 x 64 views of every input image on the same CPU, in one run, in
interleaved rounds (lightly round, sslcell round, ...); we report the median images/s per side
and, as the verdict, the median over rounds of the per-round speed-up (robust to machine load):

* lightly: ``SimCLRTransform(input_size=64)`` on PIL images of 64 x 64 RGB uint8 crops, through a
  torch ``DataLoader`` (batch 256, 2 worker processes, persistent), as lightly's examples do.
* sslcell (the ratio is taken on this one): the same uint8 crops as a ``(N, 3, 64, 64)``
  tensor; per batch: gather, ``two_views(ImageAugment(...), x, mean=..., std=...)`` with the
  default config, which converts and normalises per channel on the way (on CPU inside its
  compiled kernel, :mod:`sslcell.augment._cpu_kernel`), in the main process with
  ``torch.get_num_threads()`` threads (default: as many as lightly's workers; the kernel runs
  ranges of the batch on that many Python threads). Default config since ``rotation_p`` was
  added: half of the crops get the small rotation (before: all of them); since the noise bank:
  the noise of a batch is read from one bank of draws (see
  ``sslcell.augment.image.gaussian_noise``).
* For information: sslcell with the same process layout as lightly (the whole-batch
  augmentation runs inside 2 DataLoader workers with 1 thread each), and sslcell on 2-channel
  uint16 crops (which lightly cannot take as is).

Throughput is input images per second (each giving two views). Each round is timed from the
first batch received to the last, so worker start-up and pipeline fill are not counted.
The script sets ``OMP_WAIT_POLICY=PASSIVE`` (unless set): on a shared, oversubscribed machine
OpenMP threads that spin at barriers made the 2-thread run 3x slower than 1 thread.

    python benchmarks/bench_augment.py --n-images 4096 --rounds 7 --seed 0
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see docstring

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sslcell.augment.image import (
    ImageAugment,
    ImageAugmentConfig,
    gaussian_blur,
    gaussian_noise,
    intensity_jitter,
    random_resized_crop_flip_rotate,
    two_views,
)

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SIZE = 64
# For information: the ops closest to SimCLRTransform's (crop scale 0.08-1, horizontal flip,
# brightness/contrast jitter p 0.8, blur p 0.5 with sigma 0.1-2); no rotations, gamma or noise.
SIMCLR_LIKE = dict(output_size=SIZE, scale=(0.08, 1.0), vflip=0.0, rot90=False,
                   rotation_degrees=0.0, brightness=0.4, contrast=0.4, gamma=0.0, p_intensity=0.8,
                   blur_p=0.5, blur_sigma=(0.1, 2.0), noise_p=0.0)


def load_rgb_uint8(n: int, seed: int) -> tuple[np.ndarray, str]:
    """(n, 64, 64, 3) uint8 RGB crops: Chula RBC-12 crops resized 48 -> 64, else synthetic."""
    path = DATA / "chula_rbc12_crops48.npz"
    if path.exists():
        crops = np.load(path)["images"][:n]  # (n, 3, 48, 48) uint8
        up = F.interpolate(torch.from_numpy(crops).float(), size=SIZE, mode="bilinear",
                           align_corners=False)
        out = up.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        source = f"{path.name} images[:{n}], bilinear 48->64"
    else:
        out = np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
        source = "synthetic uniform uint8 (shared data not found)"
    if len(out) < n:
        out = np.concatenate([out] * (n // len(out) + 1))[:n]
    return out, source


def load_two_channel_uint16(n: int, seed: int) -> tuple[torch.Tensor, str]:
    """(n, 2, 64, 64) uint16 crops: Jurkat IFC brightfield + darkfield resized 40 -> 64."""
    path = DATA / "jurkat_cellcycle_ifc_mlcp.npz"
    if path.exists():
        crops = np.load(path)["images"][:n][:, [0, 2]].astype(np.float32)
        up = F.interpolate(torch.from_numpy(crops), size=SIZE, mode="bilinear", align_corners=False)
        out = up.round().clamp(0, 65535).numpy().astype(np.uint16)
        source = f"{path.name} images[:{n}] channels 0, 2, bilinear 40->64"
    else:
        out = np.random.default_rng(seed).integers(0, 65536, (n, 2, SIZE, SIZE), dtype=np.uint16)
        source = "synthetic uniform uint16 (shared data not found)"
    if len(out) < n:
        out = np.concatenate([out] * (n // len(out) + 1))[:n]
    return torch.from_numpy(out), source  # torch.uint16


class PILDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, transform) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i]))


class BatchAugmentDataset(torch.utils.data.Dataset):
    """Item = a list of indices -> two augmented views of that batch (runs in a worker)."""

    def __init__(self, images: torch.Tensor, augment: ImageAugment, seed: int) -> None:
        self.images, self.augment, self.seed = images, augment, seed
        self.mean, self.std = channel_stats(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, indices: list[int]):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + indices[0])
        x = self.images[torch.as_tensor(indices)]
        return two_views(self.augment, x, generator, mean=self.mean, std=self.std)


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (C,) of (N, C, H, W) images."""
    flat = images.float().transpose(0, 1).flatten(1)
    return flat.mean(1), flat.std(1)


def time_loader(batches) -> float:
    """Images per second from the first batch received to the last."""
    n, start = 0, None
    for views in batches:
        if start is None:
            start = time.perf_counter()
            continue
        n += views[0].shape[0]
    return n / (time.perf_counter() - start)


def sslcell_batches(images: torch.Tensor, augment: ImageAugment, batch_size: int,
                    generator: torch.Generator):
    """Gather uint8/uint16 batches; two views of each, converted and normalised per channel."""
    mean, std = channel_stats(images)
    order = torch.randperm(len(images), generator=generator)
    for start in range(0, len(images), batch_size):
        x = images[order[start : start + batch_size]]
        yield two_views(augment, x, generator, mean=mean, std=std)


def stage_breakdown(images: torch.Tensor, config: ImageAugmentConfig, batch_size: int,
                    seed: int, reps: int = 15) -> dict[str, float]:
    """Milliseconds (best of ``reps``) per stage of one two-view batch, same threads as the run.

    First the functional ops, each on the batch of ``2 * batch_size`` views (each returns a
    copy); then ``two_views`` with the ops switched on one by one (the differences are what each
    op costs inside the fused, chunked pipeline); the last line is the whole ``two_views`` call
    the rounds time.
    """
    c = config
    g = torch.Generator().manual_seed(seed)
    mean, std = channel_stats(images)
    u8 = images[:batch_size]
    x = (u8.float() - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    views = torch.cat([x, x])
    y = random_resized_crop_flip_rotate(views, c.output_size, c.scale, c.ratio, c.hflip, c.vflip,
                                        c.rot90, c.rotation_degrees, c.padding_mode, g,
                                        rotation_p=c.rotation_p)
    off = dict(brightness=0.0, contrast=0.0, gamma=0.0, blur_p=0.0, noise_p=0.0)
    geometry = ImageAugment(dataclasses.replace(c, **off))
    intensity = ImageAugment(dataclasses.replace(c, blur_p=0.0, noise_p=0.0))
    blur = ImageAugment(dataclasses.replace(c, noise_p=0.0))
    augment = ImageAugment(c)
    stages = {
        "uint8 -> float, normalise in torch (info: the rounds fuse it into two_views)":
            lambda: u8.float().sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1)),
        f"crop + flips + rot90 + rotation (rotation_p {c.rotation_p}: rotated crops by "
        "per-pixel taps, the others separable)": lambda: random_resized_crop_flip_rotate(
            views, c.output_size, c.scale, c.ratio, c.hflip, c.vflip, c.rot90, c.rotation_degrees,
            c.padding_mode, g, rotation_p=c.rotation_p),
        "intensity (gamma, contrast, brightness)": lambda: intensity_jitter(
            y, c.brightness, c.contrast, c.gamma, c.p_intensity, g),
        f"blur (p {c.blur_p})": lambda: gaussian_blur(y, c.blur_sigma, c.blur_p, g),
        f"noise (p {c.noise_p})": lambda: gaussian_noise(y, c.noise_std, c.noise_p, g),
        "copy of the views (the functional ops above each make one)": lambda: y.clone(),
        "two_views of the uint8 batch, geometry only": lambda: two_views(
            geometry, u8, g, mean=mean, std=std),
        "two_views of the uint8 batch, geometry + intensity": lambda: two_views(
            intensity, u8, g, mean=mean, std=std),
        "two_views of the uint8 batch, geometry + intensity + blur": lambda: two_views(
            blur, u8, g, mean=mean, std=std),
        "two_views(ImageAugment) of the uint8 batch, all of the above (what the rounds time, "
        "conversion included)": lambda: two_views(augment, u8, g, mean=mean, std=std),
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


def machine() -> dict:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"cpu_model": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def versions() -> dict:
    import lightly
    import PIL
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "lightly": lightly.__version__, "pillow": PIL.__version__, "numpy": np.__version__}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-images", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="lightly DataLoader workers")
    parser.add_argument("--threads", type=int, default=None,
                        help="sslcell torch intra-op threads (default: --workers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=10.0, help="speed-up needed to PASS")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "augment")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or args.workers)
    torch.manual_seed(args.seed)

    from lightly.transforms import SimCLRTransform

    rgb, rgb_source = load_rgb_uint8(args.n_images, args.seed)
    u16, u16_source = load_two_channel_uint16(args.n_images, args.seed)
    loader = torch.utils.data.DataLoader(
        PILDataset(rgb, SimCLRTransform(input_size=SIZE)), batch_size=args.batch_size,
        shuffle=True, num_workers=args.workers, persistent_workers=args.workers > 0,
        generator=torch.Generator().manual_seed(args.seed),
    )
    config = ImageAugmentConfig(output_size=SIZE)
    augment = ImageAugment(config)
    rgb_tensor = torch.from_numpy(rgb).permute(0, 3, 1, 2).contiguous()  # (N, 3, 64, 64) uint8
    generator = torch.Generator().manual_seed(args.seed)
    for _ in sslcell_batches(rgb_tensor[: 2 * args.batch_size], augment, args.batch_size,
                             generator):
        pass  # warm-up (allocator, kernels)

    load_before = os.getloadavg()
    worker_loader = torch.utils.data.DataLoader(
        BatchAugmentDataset(rgb_tensor, augment, args.seed), batch_size=None,
        sampler=torch.utils.data.BatchSampler(
            torch.utils.data.RandomSampler(
                rgb_tensor, generator=torch.Generator().manual_seed(args.seed)),
            args.batch_size, drop_last=False),
        num_workers=args.workers, persistent_workers=args.workers > 0,
    )
    simclr_like = ImageAugment(ImageAugmentConfig(**SIMCLR_LIKE))
    rounds = {"lightly": [], "sslcell_rgb_uint8": [], "sslcell_rgb_uint8_workers": [],
              "sslcell_rgb_uint8_simclr_like": [], "sslcell_2ch_uint16": []}
    for r in range(args.rounds):
        rounds["lightly"].append(time_loader(loader))
        rounds["sslcell_rgb_uint8"].append(
            time_loader(sslcell_batches(rgb_tensor, augment, args.batch_size, generator)))
        rounds["sslcell_rgb_uint8_workers"].append(time_loader(worker_loader))
        rounds["sslcell_rgb_uint8_simclr_like"].append(
            time_loader(sslcell_batches(rgb_tensor, simclr_like, args.batch_size, generator)))
        rounds["sslcell_2ch_uint16"].append(
            time_loader(sslcell_batches(u16, augment, args.batch_size, generator)))
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.0f} img/s" for k, v in rounds.items()),
              flush=True)
    load_after = os.getloadavg()
    breakdown = stage_breakdown(rgb_tensor, config, args.batch_size, args.seed)

    median = {k: statistics.median(v) for k, v in rounds.items()}
    per_round = [s / ref for s, ref in zip(rounds["sslcell_rgb_uint8"], rounds["lightly"], strict=True)]
    ratio = statistics.median(per_round)  # rounds are interleaved: each ratio under one load
    result = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "versions": versions(),
        "seed": args.seed,
        "n_images": args.n_images,
        "batch_size": args.batch_size,
        "lightly_workers": args.workers,
        "sslcell_torch_threads": torch.get_num_threads(),
        "sslcell_threads": "ImageAugment's compiled CPU kernel (numba, releases the GIL) on ranges "
                           "of the batch in torch.get_num_threads() Python threads",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_before_after": [load_before, load_after],
        "data": {"rgb_uint8": rgb_source, "two_channel_uint16": u16_source},
        "sslcell_config": dataclasses.asdict(config),
        "lightly_transform": f"SimCLRTransform(input_size={SIZE}) (defaults otherwise)",
        "images_per_second_rounds": rounds,
        "images_per_second_median": median,
        "speedup_rgb_per_round": per_round,
        "speedup_rgb": ratio,
        "target": args.target,
        "verdict": "PASS" if ratio >= args.target else "MISS",
        "simclr_like_config": SIMCLR_LIKE,
        "stage_ms_per_batch": breakdown,
        "note": (
            "The machine was shared with other work during the run (load average above the core "
            "count): absolute images/s are lower than on a quiet machine; the ratio per "
            "interleaved round is the robust figure."
            if max(load_before[0], load_after[0]) > (os.cpu_count() or 1) else ""
        ),
    }
    write(result, args.out)
    print(f"sslcell / lightly = {ratio:.1f}x -> {result['verdict']}")
    return result


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    m, med, rounds = result["machine"], result["images_per_second_median"], result["images_per_second_rounds"]
    rows = [
        ("lightly SimCLRTransform, RGB uint8 (PIL, DataLoader)", "lightly"),
        ("sslcell ImageAugment, RGB uint8 (main process, the ratio's numerator)", "sslcell_rgb_uint8"),
        ("sslcell ImageAugment, RGB uint8, in 2 DataLoader workers x 1 thread (info)",
         "sslcell_rgb_uint8_workers"),
        ("sslcell ImageAugment, RGB uint8, SimCLR-like op set (info)",
         "sslcell_rgb_uint8_simclr_like"),
        ("sslcell ImageAugment, 2-channel uint16 (info)", "sslcell_2ch_uint16"),
    ]
    lines = [
        "# Image augmentation speed: sslcell vs lightly",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {m['cores']} cores, {m['cpu_model']}, {m['platform']}, Python {m['python']}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + "  ",
        f"Seed: {result['seed']}; {result['n_images']} images of 64 x 64, batch {result['batch_size']}, "
        f"two 64 x 64 views per image; {len(rounds['lightly'])} interleaved rounds, median reported.  ",
        f"Parallelism: lightly DataLoader with {result['lightly_workers']} worker processes; "
        f"sslcell in the main process with torch.get_num_threads() = {result['sslcell_torch_threads']} "
        f"(OMP_WAIT_POLICY={result['omp_wait_policy']}): {result['sslcell_threads']}.  ",
        "Load average (1, 5, 15 min) before / after: "
        + " / ".join(", ".join(f"{x:.2f}" for x in la) for la in result["load_average_before_after"]),
        "",
        *([result["note"], ""] if result["note"] else []),
        f"Data: RGB {result['data']['rgb_uint8']}; uint16 {result['data']['two_channel_uint16']}.",
        "",
        "| pipeline | images/s (median) | rounds |",
        "|---|---:|---|",
    ]
    for label, key in rows:
        lines.append(f"| {label} | {med[key]:.0f} | {', '.join(f'{x:.0f}' for x in rounds[key])} |")
    lines += [
        "",
        f"**Speed-up (RGB, sslcell / lightly, median of the per-round ratios "
        f"{', '.join(f'{r:.1f}' for r in result['speedup_rgb_per_round'])}): "
        f"{result['speedup_rgb']:.1f}x; target {result['target']:.0f}x: {result['verdict']}**",
        "",
        "Images/s counts input images per second, each producing two views. Each round is timed",
        "from the first batch received, so worker start-up is not counted for either side.",
        f"lightly: {result['lightly_transform']}: random resized crop (scale 0.08-1), horizontal flip,",
        "colour jitter (p 0.8), random grayscale (p 0.2), gaussian blur (p 0.5), to tensor, normalise.",
        "sslcell ops (config below, the defaults at output size 64): crop + flips + 90-degree turns",
        "+ rotation as one bilinear resampling, per-channel gamma / contrast / brightness, blur,",
        "noise, all of one crop in one compiled loop nest while it is in cache (numba, on CPU; the",
        "torch pipeline on a GPU); the uint8 (or uint16) batch is converted to float and normalised",
        "per channel inside that resampling, within the timed loop. Semantic changes of the",
        "defaults behind these numbers: `rotation_p` = 0.5, i.e. half of the crops get the small",
        "rotation (before this field existed every crop did); the noise of a batch is read at",
        "distinct random offsets from one bank of D + max(3 D, B) normal draws, D = C x H x W",
        "(i.i.d. within a sample, shifted overlapping windows across samples; before, every sample",
        "drew its own).",
        "",
        "sslcell config: `" + json.dumps(result["sslcell_config"]) + "`  ",
        "SimCLR-like op set (info): `" + json.dumps(result["simclr_like_config"]) + "`",
        "",
        f"Where the time goes (sslcell, default config, one batch of {result['batch_size']} images = "
        f"{2 * result['batch_size']} views, best of 15, after the rounds, same threads): the",
        "functional ops on the whole float batch, then `two_views` of the uint8 batch with the ops",
        "added one by one (the differences are each op's cost inside the fused kernel):",
        "",
        "| stage | ms |",
        "|---|---:|",
        *[f"| {k} | {v:.1f} |" for k, v in result["stage_ms_per_batch"].items()],
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
