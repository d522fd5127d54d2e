"""Fine-tuning on a simulated clinician's corrections (issue 7's protocol), per case and on average.

For each case of ibsi_sarcoma_mr that the starting model never saw (mr-tumour's validation cases): predict it, let
a simulated clinician replace ``k`` slices by the ground truth and mark them reviewed (the worst slice, most voxels
wrong, of each of ``k`` equal parts of the tumour's extent: corrections spread over the tumour),
fine-tune on those slices only (:func:`napari_mamba_seg.training.finetune.finetune`; one of them held out for the
safety net), and measure the 3D Dice on the case's *other* slices before, after the fine-tune, and with the model
the safety net keeps active. Wall time per fine-tune included.

Usage:
    python benchmarks/finetune_protocol.py --data ../shared/data/ibsi_sarcoma_mr
    python benchmarks/finetune_protocol.py --data ../shared/data/ibsi_sarcoma_mr --cases STS_004 --steps 20
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def worst_slices(prediction: np.ndarray, truth: np.ndarray, axis: int, k: int) -> list[int]:
    """What the simulated clinician corrects: the tumour's extent along ``axis`` (slices where the ground truth or the
    prediction has tumour) cut into ``k`` equal parts, and in each part the slice with the most wrong voxels."""
    wrong = np.moveaxis(prediction != truth, axis, 0).reshape(prediction.shape[axis], -1).sum(1)
    present = np.flatnonzero(np.moveaxis((truth == 1) | (prediction == 1), axis, 0).reshape(len(wrong), -1).any(1))
    if present.size < k:
        present = np.arange(len(wrong))
    parts = np.array_split(present, k)
    return sorted(int(part[np.argmax(wrong[part])]) for part in parts if part.size)


def dice_outside(prediction: np.ndarray, truth: np.ndarray, axis: int, excluded: list[int]) -> float:
    """Tumour Dice over the slices not in ``excluded`` (1.0 when both are empty there)."""
    from napari_mamba_seg.training.metrics import dice_per_class

    left_out = np.zeros(prediction.shape[axis], bool)
    left_out[excluded] = True
    ignore = np.broadcast_to(np.expand_dims(left_out, [a for a in range(prediction.ndim) if a != axis]), truth.shape)
    return float(np.nan_to_num(dice_per_class(prediction, truth, 2, ignore=ignore)[1], nan=1.0))


def run_case(model: str, image, truth: np.ndarray, name: str, k: int, settings) -> dict:
    from napari_mamba_seg.inference import PredictionSettings, Predictor
    from napari_mamba_seg.interactive import ReviewState
    from napari_mamba_seg.training.finetune import CorrectedStudy, finetune

    spacing = image.geometry.spacing
    axis = int(np.argmax(spacing))
    predictor = Predictor.from_bundle(model, PredictionSettings(device="cpu"))
    prediction = predictor.predict(image).labels
    slices = worst_slices(prediction, truth, axis, k)
    corrected = prediction.copy()
    for index in slices:
        region = [slice(None)] * truth.ndim
        region[axis] = index
        corrected[tuple(region)] = truth[tuple(region)]
    study = CorrectedStudy(image.array, corrected, ReviewState(axis, truth.shape[axis], set(slices)), spacing, name)
    started = time.perf_counter()
    outcome = finetune(model, [study], settings)
    seconds = time.perf_counter() - started
    tuned = Predictor(outcome.model, outcome.card, PredictionSettings(device="cpu")).predict(image).labels
    before = dice_outside(prediction, truth, axis, slices)
    after = dice_outside(tuned, truth, axis, slices)
    return {
        "case": name,
        "slices": slices,
        "before": before,
        "after": after,
        "kept": after if outcome.activate else before,
        "activated": outcome.activate,
        "holdout": (outcome.before, outcome.after),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="the ibsi_sarcoma_mr folder")
    parser.add_argument("--model", default="mr-tumour")
    parser.add_argument("--cases", nargs="*", help="default: the model's validation cases (from its card)")
    parser.add_argument("--k", type=int, default=3, help="corrected slices per case")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()

    import torch

    from napari_mamba_seg.bundles import read_card
    from napari_mamba_seg.io import read_image
    from napari_mamba_seg.training.finetune import FineTuneSettings

    if args.threads:
        torch.set_num_threads(args.threads)
    cases = args.cases or read_card(args.model).training_data.split("validation cases:")[1].replace(" ", "").split(",")
    settings = FineTuneSettings(steps=args.steps, lr=args.lr, batch_size=args.batch_size, device="cpu")
    print(
        f"model {args.model}, k={args.k}, steps {args.steps}, lr {args.lr:g}, batch {args.batch_size}; "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}; {date.today()}"
    )
    print(
        "| case | corrected slices | Dice before | after fine-tune | kept (safety net) | activated | "
        "held-out Dice before → after | fine-tune (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for name in cases:
        image = read_image(args.data / name / "image.nii.gz")
        truth = read_image(args.data / name / "mask.nii.gz").array[0]
        row = run_case(args.model, image, truth, name, args.k, settings)
        rows.append(row)
        print(
            f"| {name} | {row['slices']} | {row['before']:.3f} | {row['after']:.3f} | {row['kept']:.3f} | "
            f"{'yes' if row['activated'] else 'no'} | {row['holdout'][0]:.3f} → {row['holdout'][1]:.3f} | "
            f"{row['seconds']:.1f} |",
            flush=True,
        )
    before = np.mean([r["before"] for r in rows])
    kept = np.mean([r["kept"] for r in rows])
    low = [r for r in rows if r["before"] < 0.70]
    print(
        f"\nmean Dice before {before:.3f}, after (safety net) {kept:.3f}, gain {kept - before:+.3f}; "
        f"max fine-tune time {max(r['seconds'] for r in rows):.1f} s"
    )
    if low:
        gain = np.mean([r["kept"] - r["before"] for r in low])
        print(f"cases starting below 0.70: {len(low)}, mean gain {gain:+.3f}")
    worst = min(r["kept"] - r["before"] for r in rows)
    print(f"largest drop after the safety net: {min(0.0, worst):+.3f}")


if __name__ == "__main__":
    main()
