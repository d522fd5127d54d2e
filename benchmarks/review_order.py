"""Does "Most uncertain" send the reviewer to the slices that need correcting? Measured on cases with ground truth.

For each case: predict it with the model (its probabilities too), count the wrong voxels of each slice along the
model's slice axis against the ground truth, and review the slices in four orders:

* **most uncertain**: the Correct widget's "Most uncertain" button, pressed again after each slice (the most
  expected errors first, :func:`napari_mamba_seg.interactive.expected_errors_per_slice`);
* **in order**: "Next unreviewed" from slice 0;
* **foreground, in order**: the slices where the prediction shows foreground, in order, then the rest (what a
  reviewer who scrolls to the segmentation does);
* **oracle**: the most wrong voxels first (needs the ground truth; the best any order can do).

The table gives, per order, the share of the case's wrong voxels on the first k reviewed slices (mean over the
cases); a random order covers k / (number of slices) of them on average. Also: Spearman's rank correlation between
the expected and the real wrong voxels per slice.

Cases: the ibsi_sarcoma_mr cases the model never saw (mr-tumour's validation cases, from its card), or
breast-dce's held-back phantoms (seeds 10000 on).

Usage:
    python benchmarks/review_order.py --data ../shared/data/ibsi_sarcoma_mr
    python benchmarks/review_order.py --model breast-dce --phantoms 8
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ORDERS = ("most uncertain", "in order", "foreground, in order", "oracle")
DEFAULT_KS = (1, 3, 5, 10)


def slice_counts(mask: np.ndarray, axis: int) -> np.ndarray:
    """``(shape[axis],)`` the number of True voxels of each slice along ``axis``."""
    return np.moveaxis(mask, axis, 0).reshape(mask.shape[axis], -1).sum(axis=1)


def review_orders(
    expected: np.ndarray, wrong: np.ndarray, foreground: np.ndarray, spreads: Sequence[int] = ()
) -> dict[str, list[int]]:
    """The slice order of each strategy of :data:`ORDERS`, and "most uncertain, spread N" for each N of ``spreads``.

    Args:
        expected: ``(S,)`` expected wrong voxels per slice (the model's).
        wrong: ``(S,)`` real wrong voxels per slice (against the ground truth).
        foreground: ``(S,)`` bool, the prediction shows foreground on the slice.
        spreads: ``spread`` values of :func:`~napari_mamba_seg.interactive.review_order`, in slices.
    """
    from napari_mamba_seg.interactive import ReviewState, review_order

    slices = list(range(len(wrong)))
    spread_orders = {
        f"most uncertain, spread {n}": review_order(ReviewState(0, len(wrong)), expected, spread=n) for n in spreads
    }
    return {
        "most uncertain": review_order(ReviewState(0, len(wrong)), expected),
        **spread_orders,
        "in order": slices,
        "foreground, in order": [s for s in slices if foreground[s]] + [s for s in slices if not foreground[s]],
        "oracle": sorted(slices, key=lambda s: (-wrong[s], s)),
    }


def coverage(order: Sequence[int], wrong: np.ndarray, k: int) -> float:
    """The share of all wrong voxels on the first ``k`` slices of ``order`` (1.0 when nothing is wrong)."""
    total = float(wrong.sum())
    return 1.0 if total == 0 else float(wrong[list(order[:k])].sum()) / total


def measure_case(
    predictor: Any, image: Any, truth: np.ndarray, name: str, ks: Sequence[int], spreads_mm: Sequence[float] = ()
) -> dict[str, Any]:
    """Predict one case and score every order (see the module docstring); ``spreads_mm`` as in ``--spread-mm``."""
    from scipy.stats import spearmanr

    from napari_mamba_seg.inference.predictor import slice_axis_for
    from napari_mamba_seg.interactive import expected_errors_per_slice, slices_within

    spacing = image.geometry.spacing
    axis = slice_axis_for(spacing)
    start = time.perf_counter()
    prediction = predictor.predict(image.array, spacing=spacing)
    seconds = time.perf_counter() - start
    expected = expected_errors_per_slice(prediction.probabilities, axis)
    wrong = slice_counts(prediction.labels != truth, axis)
    foreground = slice_counts(prediction.labels > 0, axis) > 0
    spreads = [slices_within(mm, spacing, axis) for mm in spreads_mm]
    orders = review_orders(expected, wrong, foreground, spreads)
    rho = spearmanr(expected, wrong).statistic if wrong.any() and np.ptp(expected) > 0 else float("nan")
    return {
        "name": name,
        "slices": len(wrong),
        "wrong": int(wrong.sum()),
        "expected": float(expected.sum()),
        "spearman": float(rho),
        "coverage": {order: [coverage(orders[order], wrong, k) for k in ks] for order in orders},
        "spreads": dict(zip(spreads_mm, spreads, strict=True)),
        "seconds": seconds,
    }


def sarcoma_cases(data: Path, names: Sequence[str]) -> Iterator[tuple[str, Any, np.ndarray]]:
    """``(name, image, truth)`` of ibsi_sarcoma_mr cases."""
    from napari_mamba_seg.io import read_image

    for name in names:
        yield name, read_image(data / name / "image.nii.gz"), read_image(data / name / "mask.nii.gz").array[0]


def phantom_cases(count: int) -> Iterator[tuple[str, Any, np.ndarray]]:
    """``(name, image, truth)`` of breast-dce's held-back phantoms (its recipe's seeds 10000 on)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from bundled_models import phantom_case

    from napari_mamba_seg.io import ImageGeometry, MedicalImage

    for seed in range(10_000, 10_000 + count):
        case = phantom_case(seed)
        image = MedicalImage(case.image, ImageGeometry.from_spacing(case.spacing))
        yield case.name, image, case.labels


def print_table(rows: list[dict[str, Any]], ks: Sequence[int]) -> None:
    """Per case, then the mean coverage per order, as Markdown."""
    head = " | ".join(f"first {k}" for k in ks)
    print(f"\n| case | slices | wrong voxels | expected | Spearman | {head} (most uncertain / in order / oracle) |")
    print("|---|---|---|---|---|" + "---|" * len(ks))
    for row in rows:
        cells = " | ".join(
            " / ".join(f"{row['coverage'][order][i]:.2f}" for order in ("most uncertain", "in order", "oracle"))
            for i in range(len(ks))
        )
        print(
            f"| {row['name']} | {row['slices']} | {row['wrong']} | {row['expected']:.0f} | {row['spearman']:.2f} | "
            f"{cells} |"
        )
    print(f"\nShare of the wrong voxels on the first k reviewed slices, mean over {len(rows)} cases:\n")
    print(f"| order | {head} |")
    print("|---|" + "---|" * len(ks))
    for order in rows[0]["coverage"]:
        means = [np.mean([row["coverage"][order][i] for row in rows]) for i in range(len(ks))]
        print(f"| {order} | " + " | ".join(f"{m:.2f}" for m in means) + " |")
    randoms = [np.mean([min(k, row["slices"]) / row["slices"] for row in rows]) for k in ks]
    print("| random (expected) | " + " | ".join(f"{m:.2f}" for m in randoms) + " |")
    rhos = [row["spearman"] for row in rows if np.isfinite(row["spearman"])]
    print(
        f"\nSpearman (expected vs real wrong voxels per slice): median {np.median(rhos):.2f}, "
        f"range {min(rhos):.2f} to {max(rhos):.2f}"
    )


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="mr-tumour", help="a bundled model name or a bundle folder")
    parser.add_argument("--data", type=Path, help="the ibsi_sarcoma_mr folder (sarcoma cases)")
    parser.add_argument("--cases", nargs="*", help="default: the model's validation cases (from its card)")
    parser.add_argument("--phantoms", type=int, help="breast-dce's first N held-back phantoms instead of --data")
    parser.add_argument("--k", type=int, nargs="+", default=list(DEFAULT_KS), help="reviewed slices to score")
    parser.add_argument(
        "--spread-mm", type=float, nargs="*", default=[], help="also 'most uncertain' spread by these distances"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args(argv)
    if (args.data is None) == (args.phantoms is None):
        parser.error("give --data (sarcoma cases) or --phantoms N (breast phantoms)")

    import torch

    from napari_mamba_seg.bundles import read_card
    from napari_mamba_seg.inference import PredictionSettings, Predictor

    if args.threads:
        torch.set_num_threads(args.threads)
    predictor = Predictor.from_bundle(args.model, PredictionSettings(device="cpu", return_probabilities=True))
    if args.phantoms is not None:
        cases = phantom_cases(args.phantoms)
    else:
        names = args.cases or read_card(args.model).training_data.split("validation cases:")[1].replace(" ", "")
        cases = sarcoma_cases(args.data, names.split(",") if isinstance(names, str) else names)
    print(
        f"model {args.model}; {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}; {date.today()}",
        flush=True,
    )
    rows = []
    for name, image, truth in cases:
        rows.append(row := measure_case(predictor, image, truth, name, args.k, args.spread_mm))
        print(
            f"  {name}: {row['wrong']} wrong voxels, Spearman {row['spearman']:.2f}, {row['seconds']:.1f} s", flush=True
        )
    print_table(rows, args.k)
    return rows


if __name__ == "__main__":
    main()
