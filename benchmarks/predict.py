"""Whole-volume prediction: time per volume for every architecture beside the U-Net baseline, and peak memory.

Two measurements, each configuration in its own child process (so peak resident memory is that run's own,
read from ``getrusage`` in the child after the prediction):

1. **Time per volume**: a 256×256×60 three-phase volume (spacing 2 × 0.7 × 0.7 mm, like a breast DCE study),
   every full-size registered architecture with 3 input channels and 4 classes (random weights: time and memory
   do not depend on the values). 2D models predict slice-wise along the coarse axis (60 slices of 256²); 3D
   models use sliding windows of ``--patch-3d`` with overlap 0.5 and Gaussian blending. The ratio column divides
   by the U-Net baseline of the same dimensionality (``unet`` for 2D, ``unet_3d`` for 3D), measured in the same
   run. One warm-up prediction on a small volume first (numba compiles the CPU scan once per process).
2. **Memory**: a 512×512×200 single-channel volume (issue 4 acceptance 3: peak resident memory under 4 GB on
   the CPU) with ``--memory-models`` (default ``vm_unet``), labels only.

Usage:
    python benchmarks/predict.py                         # both tables, CPU, every architecture (tens of minutes)
    python benchmarks/predict.py --models unet vm_unet --skip-memory
    python benchmarks/predict.py --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BASELINES = {2: "unet", 3: "unet_3d"}
MEMORY_LIMIT_MB = 4096
SPACING = (2.0, 0.7, 0.7)


def run_child(config: dict[str, Any]) -> dict[str, Any]:
    """Build the model, predict one random volume, return time, plan and peak resident memory (this process)."""
    import numpy as np
    import torch

    from napari_mamba_seg.bundles import ModelCard
    from napari_mamba_seg.inference import PredictionSettings, Predictor
    from napari_mamba_seg.models import create_model, get_model_entry

    torch.manual_seed(0)
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    name, channels = config["model"], config["channels"]
    dims = get_model_entry(name).spatial_dims
    model = create_model(name, in_channels=channels, num_classes=config["classes"])
    patch = config["patch_2d"] if dims == 2 else config["patch_3d"]
    card = ModelCard(patch_size=list(patch), class_names=[f"class {i}" for i in range(config["classes"])])
    settings = PredictionSettings(device=config["device"], axis="auto", tile_size=None)
    predictor = Predictor(model, card, settings)

    rng = np.random.default_rng(0)
    warm = rng.standard_normal((channels, 2, 64, 64) if dims == 2 else (channels, 32, 32, 32), dtype=np.float32)
    predictor.predict(warm, SPACING)  # numba / triton compile, allocator warm-up

    image = rng.standard_normal((channels, *config["shape"]), dtype=np.float32)
    plan = predictor.plan(image.shape, SPACING)
    start = time.perf_counter()
    prediction = predictor.predict(image, SPACING)
    seconds = time.perf_counter() - start
    if config["device"].startswith("cuda"):
        torch.cuda.synchronize()
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    assert prediction.labels.shape == tuple(config["shape"])
    return {
        "model": name,
        "dims": dims,
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb,
        "mode": plan.mode,
        "steps": plan.num_steps,
        "batch": plan.batch_size,
        "tile": list(plan.tile_size),
        "estimated_peak_mb": plan.estimated_peak_mb,
    }


def measure(config: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in a fresh child process; a failure becomes a row with the error."""
    result = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(config)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model": config["model"], "error": tail}
    return json.loads(result.stdout.strip().splitlines()[-1])


def speed_rows(args: argparse.Namespace, models: list[str]) -> list[dict[str, Any]]:
    base = _base_config(args)
    rows = []
    for name in models:
        print(f"  timing {name} ...", file=sys.stderr, flush=True)
        rows.append(measure({**base, "model": name, "channels": 3, "shape": list(args.speed_shape)}))
    times = {row["model"]: row.get("seconds") for row in rows}
    for row in rows:
        baseline = BASELINES.get(row.get("dims", 0))
        if "seconds" in row and times.get(baseline):
            row["ratio"] = row["seconds"] / times[baseline]
    return rows


def memory_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    base = _base_config(args)
    rows = []
    for name in args.memory_models:
        print(f"  memory {name} ...", file=sys.stderr, flush=True)
        rows.append(measure({**base, "model": name, "channels": 1, "shape": list(args.memory_shape)}))
    return rows


def _base_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "device": args.device,
        "threads": args.threads,
        "classes": 4,
        "patch_2d": list(args.patch_2d),
        "patch_3d": list(args.patch_3d),
    }


def format_speed_table(rows: list[dict[str, Any]], shape: tuple[int, ...]) -> str:
    lines = [
        f"Time per {'×'.join(map(str, shape))} three-phase volume (4 classes); ratio = time / U-Net of the same dims",
        f"{'model':<20} {'dims':>4} {'mode':>7} {'steps':>6} {'batch':>5} {'tile':>14} {'s/volume':>9} "
        f"{'ratio':>6} {'peak RSS MB':>11}",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['model']:<20} error: {row['error']}")
            continue
        ratio = f"{row['ratio']:.2f}" if "ratio" in row else "-"
        tile = "×".join(map(str, row["tile"]))
        lines.append(
            f"{row['model']:<20} {row['dims']:>3}D {row['mode']:>7} {row['steps']:>6} {row['batch']:>5} {tile:>14} "
            f"{row['seconds']:>9.1f} {ratio:>6} {row['peak_rss_mb']:>11.0f}"
        )
    return "\n".join(lines)


def format_memory_table(rows: list[dict[str, Any]], shape: tuple[int, ...]) -> str:
    lines = [
        f"Peak resident memory, {'×'.join(map(str, shape))} single-channel volume, labels only "
        f"(limit {MEMORY_LIMIT_MB} MB)",
        f"{'model':<20} {'s/volume':>9} {'peak RSS MB':>11} {'estimated MB':>12} {'under limit':>11}",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['model']:<20} error: {row['error']}")
            continue
        under = "yes" if row["peak_rss_mb"] < MEMORY_LIMIT_MB else "NO"
        lines.append(
            f"{row['model']:<20} {row['seconds']:>9.1f} {row['peak_rss_mb']:>11.0f} {row['estimated_peak_mb']:>12.0f} "
            f"{under:>11}"
        )
    return "\n".join(lines)


def default_models() -> list[str]:
    from napari_mamba_seg.models import list_models

    return list_models()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    parser.add_argument("--models", nargs="*", help="architectures to time (default: every full-size one)")
    parser.add_argument("--speed-shape", type=int, nargs=3, default=(60, 256, 256), metavar=("Z", "Y", "X"))
    parser.add_argument("--patch-2d", type=int, nargs=2, default=(256, 256))
    parser.add_argument("--patch-3d", type=int, nargs=3, default=(64, 128, 128))
    parser.add_argument("--memory-models", nargs="*", default=["vm_unet"])
    parser.add_argument("--memory-shape", type=int, nargs=3, default=(200, 512, 512), metavar=("Z", "Y", "X"))
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from scan import machine_description

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# benchmarks/predict.py, {datetime.date.today()}, {args.device}: {machine_description(args.device)}")
    if not args.skip_speed:
        models = args.models or default_models()
        for baseline in BASELINES.values():  # the ratio needs the baseline in the same run
            if baseline not in models:
                models.append(baseline)
        print(format_speed_table(speed_rows(args, models), tuple(args.speed_shape)))
        print()
    if not args.skip_memory:
        print(format_memory_table(memory_rows(args), tuple(args.memory_shape)))


if __name__ == "__main__":
    main()
