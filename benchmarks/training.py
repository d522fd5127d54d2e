"""Training throughput per architecture: optimizer steps and patches per second through ``Trainer.train_step``.

Every full-size registered architecture with 3 input channels and 4 classes (the breast DCE set-up), random
weights, one fixed batch cut from a synthetic breast phantom: ``--batch-2d`` slices of ``--patch-2d`` for 2D
models, ``--batch-3d`` patches of ``--patch-3d`` for 3D models. Each step is the real training path (forward,
Dice + cross-entropy, backward, gradient clipping, AdamW; on the CPU with oneDNN off, as the trainer runs).
One warm-up step, then the median of ``--steps`` timed steps. The ratio divides the throughput (patches/s) by
the U-Net's of the same dimensionality, measured in the same run.

Usage:
    python benchmarks/training.py                          # CPU, every architecture
    python benchmarks/training.py --models unet vm_unet --steps 3
    python benchmarks/training.py --device cuda --batch-2d 16 --batch-3d 2
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_mamba_seg.bundles import ModelCard
from napari_mamba_seg.models import create_model, get_model_entry, list_models
from napari_mamba_seg.training import Trainer, TrainingCase, TrainingConfig

BASELINES = {2: "unet", 3: "unet_3d"}


def phantom_case(shape: tuple[int, int, int], spacing: tuple[float, float, float] = (2.0, 0.7, 0.7)) -> TrainingCase:
    """One synthetic breast DCE case (3 phases, labels breast/FGT/lesion; muscle folded into background)."""
    from napari_mamba_seg.data import make_phantom

    phantom = make_phantom(shape=shape, spacing=spacing, seed=0)
    labels = np.where(phantom.labels > 3, 0, phantom.labels).astype(np.int64)
    return TrainingCase(phantom.image, labels, spacing=phantom.spacing, name="phantom")


def fixed_batch(trainer: Trainer, batch_size: int) -> dict[str, torch.Tensor]:
    samples = [trainer.dataset[i] for i in range(batch_size)]
    return torch.utils.data.default_collate(samples)


def measure(name: str, case: TrainingCase, args: argparse.Namespace) -> dict[str, Any]:
    """Median seconds per optimizer step of one architecture on a fixed batch."""
    dims = get_model_entry(name).spatial_dims
    patch = tuple(args.patch_2d if dims == 2 else args.patch_3d)
    batch_size = args.batch_2d if dims == 2 else args.batch_3d
    torch.manual_seed(0)
    model = create_model(name, in_channels=3, num_classes=4)
    card = ModelCard(class_names=["background", "breast", "fibroglandular", "lesion"])
    config = TrainingConfig(steps=args.steps + 1, batch_size=batch_size, patch_size=patch, device=args.device)
    trainer = Trainer(model, card, [case], config=config)
    batch = fixed_batch(trainer, batch_size)
    trainer.train_step(batch)  # warm-up: numba/triton compile, allocator
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        trainer.train_step(batch)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {
        "model": name,
        "dims": dims,
        "patch": patch,
        "batch": batch_size,
        "step_s": seconds,
        "patches_per_s": batch_size / seconds,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    throughput = {row["model"]: row["patches_per_s"] for row in rows if "patches_per_s" in row}
    lines = [
        f"{'model':<20} {'dims':>4} {'patch':>12} {'batch':>5} {'s/step':>8} {'patches/s':>10} {'ratio':>6}",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['model']:<20} error: {row['error']}")
            continue
        baseline = throughput.get(BASELINES[row["dims"]])
        ratio = f"{row['patches_per_s'] / baseline:.2f}" if baseline else "-"
        patch = "×".join(map(str, row["patch"]))
        lines.append(
            f"{row['model']:<20} {row['dims']:>3}D {patch:>12} {row['batch']:>5} {row['step_s']:>8.2f} "
            f"{row['patches_per_s']:>10.2f} {ratio:>6}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    parser.add_argument("--models", nargs="*", help="architectures (default: every full-size one)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model (after one warm-up)")
    parser.add_argument("--patch-2d", type=int, nargs=2, default=(256, 256))
    parser.add_argument("--patch-3d", type=int, nargs=3, default=(64, 64, 64))
    parser.add_argument("--batch-2d", type=int, default=2)
    parser.add_argument("--batch-3d", type=int, default=1)
    parser.add_argument("--phantom-shape", type=int, nargs=3, default=(60, 256, 256), metavar=("Z", "Y", "X"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from scan import machine_description

    models = list(args.models or list_models())
    for baseline in BASELINES.values():
        if baseline not in models and any(
            get_model_entry(m).spatial_dims == get_model_entry(baseline).spatial_dims for m in models
        ):
            models.append(baseline)
    case = phantom_case(tuple(args.phantom_shape))
    print(f"# benchmarks/training.py, {datetime.date.today()}, {args.device}: {machine_description(args.device)}")
    rows = []
    for name in models:
        print(f"  {name} ...", file=sys.stderr, flush=True)
        try:
            rows.append(measure(name, case, args))
        except (RuntimeError, ValueError, MemoryError) as error:
            rows.append({"model": name, "error": " ".join(str(error).split())[:200]})
    print(format_table(rows))


if __name__ == "__main__":
    main()
