"""Fine-tuning on a simulated clinician's corrections (issue 7's protocol), per case and on average.

For each case of ibsi_sarcoma_mr that the starting model never saw (mr-tumour's validation cases): predict it, let
a simulated clinician replace ``k`` slices by the ground truth and mark them reviewed (the worst slice, most voxels
wrong, of each of ``k`` equal parts of the tumour's extent: corrections spread over the tumour; or, with ``--choose
uncertain``, the ``k`` slices the Correct widget's "Most uncertain" button shows, chosen without the ground truth),
fine-tune on those slices only (:func:`napari_mamba_seg.training.finetune.finetune`; one of them held out for the
safety net; the prediction is given as the study's ``predicted``, so ``changed_weight`` can weigh the corrected
voxels up), and measure the 3D Dice on the case's *other* slices before, after the fine-tune, and with the model
the safety net keeps active. Wall time per fine-tune included. The "judge" column says whether the safety net
decided right: activated and not worse on the other slices, or not activated and worse.

Several settings can be compared in one run (each case is predicted once): every ``--variant`` is a comma-separated
list of :class:`~napari_mamba_seg.training.finetune.FineTuneSettings` fields applied on top of the other options.

Usage:
    python benchmarks/finetune_protocol.py --data ../shared/data/ibsi_sarcoma_mr
    python benchmarks/finetune_protocol.py --data ../shared/data/ibsi_sarcoma_mr --cases STS_004 --steps 20
    python benchmarks/finetune_protocol.py --data ../shared/data/ibsi_sarcoma_mr --cases STS_004 STS_036 \\
        --variant lr=3e-5 --variant lr=1e-4,changed_weight=3 --variant lr=3e-4,freeze_encoder=true,steps=60
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
from datetime import date
from pathlib import Path
from typing import Any

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


@dataclasses.dataclass
class CorrectedCase:
    """A case predicted by the starting model and corrected on ``slices`` by the simulated clinician."""

    name: str
    image: Any
    truth: np.ndarray
    axis: int
    prediction: np.ndarray
    slices: list[int]
    corrected: np.ndarray


def uncertain_slices(probabilities: np.ndarray, axis: int, k: int, spread: int = 0) -> list[int]:
    """What a clinician who presses "Most uncertain" ``k`` times corrects: the first ``k`` slices of
    :func:`~napari_mamba_seg.interactive.review_order` by expected wrong voxels (no ground truth needed)."""
    from napari_mamba_seg.interactive import ReviewState, expected_errors_per_slice, review_order

    expected = expected_errors_per_slice(probabilities, axis)
    return sorted(review_order(ReviewState(axis, len(expected)), expected, spread=spread)[:k])


def correct_case(
    model: str, image, truth: np.ndarray, name: str, k: int, choose: str = "worst", spread_mm: float = 0.0
) -> CorrectedCase:
    """Predict ``image`` with ``model`` and replace ``k`` of its slices by ``truth``: :func:`worst_slices` (``choose``
    "worst") or :func:`uncertain_slices` ("uncertain", spread by ``spread_mm``)."""
    from napari_mamba_seg.inference import PredictionSettings, Predictor
    from napari_mamba_seg.interactive import slices_within

    axis = int(np.argmax(image.geometry.spacing))
    settings = PredictionSettings(device="cpu", return_probabilities=choose == "uncertain")
    prediction = Predictor.from_bundle(model, settings).predict(image)
    if choose == "uncertain":
        spread = slices_within(spread_mm, image.geometry.spacing, axis)
        slices = uncertain_slices(prediction.probabilities, axis, k, spread)
    elif choose == "worst":
        slices = worst_slices(prediction.labels, truth, axis, k)
    else:
        raise ValueError(f"choose must be 'worst' or 'uncertain', got {choose!r}")
    prediction = prediction.labels
    corrected = prediction.copy()
    for index in slices:
        region = [slice(None)] * truth.ndim
        region[axis] = index
        corrected[tuple(region)] = truth[tuple(region)]
    return CorrectedCase(name, image, truth, axis, prediction, slices, corrected)


def finetune_case(model: str, case: CorrectedCase, settings) -> dict:
    """Fine-tune ``model`` on the corrected slices of ``case``; Dice on the other slices before, after and kept."""
    from napari_mamba_seg.inference import PredictionSettings, Predictor
    from napari_mamba_seg.interactive import ReviewState
    from napari_mamba_seg.training.finetune import CorrectedStudy, finetune

    review = ReviewState(case.axis, case.truth.shape[case.axis], set(case.slices))
    spacing = case.image.geometry.spacing
    study = CorrectedStudy(case.image.array, case.corrected, review, spacing, case.name, case.prediction)
    started = time.perf_counter()
    outcome = finetune(model, [study], settings)
    seconds = time.perf_counter() - started
    tuned = Predictor(outcome.model, outcome.card, PredictionSettings(device="cpu")).predict(case.image).labels
    before = dice_outside(case.prediction, case.truth, case.axis, case.slices)
    after = dice_outside(tuned, case.truth, case.axis, case.slices)
    held_out = outcome.provenance["studies"][0]["holdout_slices"]
    wrong = [int(np.take(labels != case.truth, held_out, axis=case.axis).sum()) for labels in (case.prediction, tuned)]
    by_errors = wrong[1] <= wrong[0]  # what a judge that counts wrong voxels on the held-out slices would decide
    return {
        "case": case.name,
        "slices": case.slices,
        "before": before,
        "after": after,
        "kept": after if outcome.activate else before,
        "activated": outcome.activate,
        "judge_right": outcome.activate == (after >= before),
        "holdout": (outcome.before, outcome.after),
        "holdout_wrong": tuple(wrong),
        "kept_by_errors": after if by_errors else before,
        "errors_judge_right": by_errors == (after >= before),
        "steps": outcome.card.metrics.get("steps"),
        "seconds": seconds,
    }


def run_case(model: str, image, truth: np.ndarray, name: str, k: int, settings) -> dict:
    """:func:`correct_case` then :func:`finetune_case` for one setting."""
    return finetune_case(model, correct_case(model, image, truth, name, k), settings)


def parse_variant(text: str, base) -> Any:
    """``"lr=1e-4,changed_weight=3,freeze_encoder=true"`` applied to the FineTuneSettings ``base``."""
    fields = {field.name: field for field in dataclasses.fields(base)}
    changes: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"--variant {text!r}: unknown setting {key!r}; known: {', '.join(fields)}")
        current = getattr(base, key)
        if value.lower() == "none":
            changes[key] = None
        elif isinstance(current, bool):
            changes[key] = value.lower() in ("1", "true", "yes", "on")
        elif isinstance(current, int) or key == "epochs":
            changes[key] = int(value)
        elif isinstance(current, float):
            changes[key] = float(value)
        else:
            changes[key] = value
    return dataclasses.replace(base, **changes)


def describe(settings, base) -> str:
    """The settings that differ from ``base`` (or "base")."""
    changed = [
        f"{f.name}={getattr(settings, f.name)}"
        for f in dataclasses.fields(settings)
        if getattr(settings, f.name) != getattr(base, f.name)
    ]
    return ", ".join(changed) or "base"


def print_table(rows: list[dict]) -> None:
    print(
        "| case | corrected slices | Dice before | after fine-tune | kept (safety net) | activated | judge right | "
        "held-out Dice before → after | steps | fine-tune (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['case']} | {row['slices']} | {row['before']:.3f} | {row['after']:.3f} | {row['kept']:.3f} | "
            f"{'yes' if row['activated'] else 'no'} | {'yes' if row['judge_right'] else 'no'} | "
            f"{row['holdout'][0]:.3f} → {row['holdout'][1]:.3f} | {row['steps']} | {row['seconds']:.1f} |"
        )


def summary(rows: list[dict]) -> str:
    before = np.mean([r["before"] for r in rows])
    after = np.mean([r["after"] for r in rows])
    kept = np.mean([r["kept"] for r in rows])
    low = [r for r in rows if r["before"] < 0.70]
    parts = [
        f"mean Dice before {before:.3f}, after fine-tune {after:.3f}, kept (safety net) {kept:.3f}, "
        f"gain {kept - before:+.3f}"
    ]
    if low:
        gain = np.mean([r["kept"] - r["before"] for r in low])
        raw = np.mean([r["after"] - r["before"] for r in low])
        parts.append(f"cases below 0.70: {len(low)}, mean gain {gain:+.3f} kept ({raw:+.3f} before the safety net)")
    parts.append(f"largest drop kept {min(0.0, min(r['kept'] - r['before'] for r in rows)):+.3f}")
    parts.append(f"judge right {sum(r['judge_right'] for r in rows)}/{len(rows)}")
    parts.append(f"max fine-tune {max(r['seconds'] for r in rows):.1f} s")
    by_errors = np.mean([r["kept_by_errors"] for r in rows])
    parts.append(
        f"a judge counting wrong voxels on the held-out slices instead: right "
        f"{sum(r['errors_judge_right'] for r in rows)}/{len(rows)}, gain kept {by_errors - before:+.3f}, largest drop "
        f"{min(0.0, min(r['kept_by_errors'] - r['before'] for r in rows)):+.3f}; held-out wrong voxels before → after: "
        + ", ".join(f"{r['case']} {r['holdout_wrong'][0]} → {r['holdout_wrong'][1]}" for r in rows)
    )
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, type=Path, help="the ibsi_sarcoma_mr folder")
    parser.add_argument("--model", default="mr-tumour")
    parser.add_argument("--cases", nargs="*", help="default: the model's validation cases (from its card)")
    parser.add_argument("--k", type=int, default=3, help="corrected slices per case")
    parser.add_argument(
        "--choose",
        choices=("worst", "uncertain"),
        default="worst",
        help="which slices the simulated clinician corrects: the worst of k parts of the tumour (needs the ground "
        "truth), or the k that 'Most uncertain' shows (default: worst)",
    )
    parser.add_argument("--spread-mm", type=float, default=0.0, help="with --choose uncertain: the spread in mm")
    parser.add_argument("--steps", type=int, help="default: FineTuneSettings'")
    parser.add_argument("--epochs", type=int, help="epochs instead of steps")
    parser.add_argument("--lr", type=float, help="default: FineTuneSettings'")
    parser.add_argument("--batch-size", type=int, help="default: FineTuneSettings'")
    parser.add_argument(
        "--changed-weight", type=float, help="weight of the corrected voxels (default: FineTuneSettings')"
    )
    parser.add_argument("--freeze-encoder", action="store_true")
    parser.add_argument(
        "--anchor",
        action=argparse.BooleanOptionalAction,
        help="rehearse the parent's prediction on unreviewed slices (default: FineTuneSettings')",
    )
    parser.add_argument(
        "--defer-to-corrections",
        action=argparse.BooleanOptionalAction,
        help="the anchor leaves out where the corrections showed the parent wrong (default: FineTuneSettings')",
    )
    parser.add_argument("--no-augmentation", action="store_true")
    parser.add_argument("--holdout-every", type=int, help="default: FineTuneSettings'")
    parser.add_argument("--seed", type=int, help="default: FineTuneSettings'")
    parser.add_argument("--variant", action="append", help="settings to compare, e.g. lr=1e-4,changed_weight=3")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()

    import torch

    from napari_mamba_seg.bundles import read_card
    from napari_mamba_seg.io import read_image
    from napari_mamba_seg.training.finetune import FineTuneSettings

    if args.threads:
        torch.set_num_threads(args.threads)
    cases = args.cases or read_card(args.model).training_data.split("validation cases:")[1].replace(" ", "").split(",")
    given = {
        "steps": args.steps,
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "changed_weight": args.changed_weight,
        "holdout_every": args.holdout_every,
        "seed": args.seed,
        "freeze_encoder": args.freeze_encoder or None,
        "anchor": args.anchor,
        "defer_to_corrections": args.defer_to_corrections,
        "augment": False if args.no_augmentation else None,
    }
    base = FineTuneSettings(device="cpu", **{key: value for key, value in given.items() if value is not None})
    variants = [parse_variant(text, base) for text in args.variant] if args.variant else [base]
    print(
        f"model {args.model}, k={args.k}, {args.choose} slices (spread {args.spread_mm} mm); base settings {base}; "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}; {date.today()}",
        flush=True,
    )
    rows: list[list[dict]] = [[] for _ in variants]
    for name in cases:
        image = read_image(args.data / name / "image.nii.gz")
        truth = read_image(args.data / name / "mask.nii.gz").array[0]
        case = correct_case(args.model, image, truth, name, args.k, args.choose, args.spread_mm)
        for number, settings in enumerate(variants):  # interleaved: every setting on a case before the next case
            rows[number].append(row := finetune_case(args.model, case, settings))
            print(
                f"  {name} [{describe(settings, base)}]: {row['before']:.3f} -> {row['after']:.3f}, kept "
                f"{row['kept']:.3f}, held-out {row['holdout'][0]:.3f} -> {row['holdout'][1]:.3f}, "
                f"{row['seconds']:.1f} s",
                flush=True,
            )
    for settings, variant_rows in zip(variants, rows, strict=True):
        print(f"\n### {describe(settings, base)}\n")
        print_table(variant_rows)
        print(f"\n{summary(variant_rows)}")
    if len(variants) > 1:
        print("\n| setting | " + " | ".join(cases) + " | mean gain kept | gain < 0.70 kept | judge right | max s |")
        print("|---|" + "---|" * (len(cases) + 4))
        for settings, variant_rows in zip(variants, rows, strict=True):
            cells = [f"{r['before']:.3f}→{r['after']:.3f}{'' if r['activated'] else ' (no)'}" for r in variant_rows]
            gain = np.mean([r["kept"] - r["before"] for r in variant_rows])
            low = [r["kept"] - r["before"] for r in variant_rows if r["before"] < 0.70]
            right = sum(r["judge_right"] for r in variant_rows)
            print(
                f"| {describe(settings, base)} | " + " | ".join(cells) + f" | {gain:+.3f} | "
                f"{np.mean(low) if low else float('nan'):+.3f} | {right}/{len(variant_rows)} | "
                f"{max(r['seconds'] for r in variant_rows):.0f} |"
            )


if __name__ == "__main__":
    main()
