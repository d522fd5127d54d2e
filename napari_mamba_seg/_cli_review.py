"""``napari-mamba-seg predict --review-report``: which cases and slices of a batch to review first.

For every input segmented, the number of wrong voxels the model expects (from its probabilities:
:func:`napari_mamba_seg.interactive.expected_errors_per_slice`), in voxels and in mL, and the first slices of the
Correct widget's "Most uncertain" order (spread :data:`~napari_mamba_seg.interactive.DEFAULT_SPREAD_MM`). A 2D
image has no volume and no slices to choose: those columns stay empty. The CSV lists the cases the model is least
sure of first; it is rewritten (atomically) after each case, so an interrupted batch keeps the rows of the cases
written.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REVIEW_REPORT_NAME = "review.csv"
"""The report's file name in the output folder."""
REVIEW_SLICES = 5
"""How many slices each row proposes."""
COLUMNS = (
    "input",
    "labels",
    "slice_axis",
    "expected_wrong_voxels",
    "expected_wrong_ml",
    "foreground_ml",
    "slices_to_review",
)


@dataclass
class ReviewReport:
    """The rows of ``<output folder>/review.csv``, kept sorted and written after each case.

    Attributes:
        path: The CSV file.
        overwrite: Whether an existing report (from an earlier run) may be replaced.
        rows: One dict of :data:`COLUMNS` per case.

    Raises:
        FileExistsError: The report exists and ``overwrite`` is False (checked when created, before any case runs).
    """

    path: Path
    overwrite: bool = False
    rows: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.path.exists() and not self.overwrite:
            raise FileExistsError(
                f"{self.path} already exists; refusing to overwrite. Use another output folder or --overwrite."
            )

    def add(self, source: Path, labels: Path, image: Any, prediction: Any, axis: int | str = "auto") -> None:
        """Add the row of one segmented case and rewrite the file.

        Args:
            source: The input.
            labels: The labels file written for it.
            image: The :class:`~napari_mamba_seg.io.MedicalImage` read.
            prediction: Its :class:`~napari_mamba_seg.inference.Prediction`, with probabilities.
            axis: The slice axis ("auto": the coarsest spacing, as 2D models slice).
        """
        self.rows.append(review_row(source, labels, image, prediction, axis))
        self.rows.sort(key=lambda row: (-row["expected_wrong_voxels"], str(row["input"])))
        self.write()

    def write(self) -> None:
        """Write every row (atomically: a crash leaves the previous file or the new one)."""
        from napari_mamba_seg.io._atomic import atomic_output

        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({**row, "expected_wrong_voxels": f"{row['expected_wrong_voxels']:.1f}"})
        with atomic_output(self.path, overwrite=True, suffix=".csv") as temporary:
            temporary.write_text(text.getvalue(), encoding="utf-8")


def review_row(source: Path, labels: Path, image: Any, prediction: Any, axis: int | str = "auto") -> dict[str, Any]:
    """The report row of one case (see :class:`ReviewReport`).

    Raises:
        ValueError: The prediction has no probabilities (predict with ``return_probabilities=True``).
    """
    from napari_mamba_seg.inference.predictor import slice_axis_for
    from napari_mamba_seg.interactive import (
        DEFAULT_SPREAD_MM,
        ReviewState,
        expected_errors_per_slice,
        review_order,
        slices_within,
    )

    if prediction.probabilities is None:
        raise ValueError("the review report needs the model's probabilities: predict with return_probabilities=True")
    spacing = image.geometry.spacing
    voxel_ml = math.prod(float(s) for s in spacing) / 1000.0
    foreground_ml = int((prediction.labels > 0).sum()) * voxel_ml
    if len(spacing) == 2:  # one slice: nothing to choose between
        axis, order = "", []
        total = float(expected_errors_per_slice(prediction.probabilities, 0).sum())
    else:
        axis = slice_axis_for(spacing, axis)
        expected = expected_errors_per_slice(prediction.probabilities, axis)
        spread = slices_within(DEFAULT_SPREAD_MM, spacing, axis)
        order = review_order(ReviewState(axis, len(expected)), expected, spread=spread)[:REVIEW_SLICES]
        total = float(expected.sum())
    return {
        "input": str(source),
        "labels": str(labels),
        "slice_axis": axis,
        "expected_wrong_voxels": total,
        "expected_wrong_ml": "" if axis == "" else f"{total * voxel_ml:.3f}",
        "foreground_ml": "" if axis == "" else f"{foreground_ml:.3f}",
        "slices_to_review": " ".join(str(index) for index in order),
    }
