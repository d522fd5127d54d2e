"""Every tool only reads its inputs: it runs on read-only arrays and leaves them bit for bit as they were."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from label_shapes import ball, disk

from napari_mamba_seg.interactive import (
    Edit,
    fill_holes,
    interpolate_slices,
    keep_largest_component,
    propagate_slice,
    refine_with_clicks,
    remove_small_islands,
)

SHAPE = (8, 24, 24)


def _inputs() -> tuple[np.ndarray, np.ndarray]:
    """Labels with work for every tool (holes, islands, annotated slices) and matching probabilities."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[ball(SHAPE, (4, 12, 12), 3.5)] = 1
    labels[4, 12, 12] = 0  # a hole
    labels[0, 20:22, 20:22] = 1  # an island
    labels[1][disk(SHAPE[1:], (6, 6), 3)] = 2
    labels[6][disk(SHAPE[1:], (6, 6), 5)] = 2
    probabilities = np.zeros((3, *SHAPE), np.float32)
    probabilities[2][:, 14:, 14:] = 0.9
    probabilities[0] = 1 - probabilities[2]
    return labels, probabilities


TOOLS: dict[str, Callable[[np.ndarray, np.ndarray], Edit | None]] = {
    "fill_holes": lambda labels, probabilities: fill_holes(labels),
    "fill_holes_per_slice": lambda labels, probabilities: fill_holes(labels, axis=0),
    "remove_small_islands": lambda labels, probabilities: remove_small_islands(labels, 5),
    "keep_largest_component": lambda labels, probabilities: keep_largest_component(labels),
    "propagate_slice": lambda labels, probabilities: propagate_slice(labels, 0, 1, 2),
    "propagate_guided": lambda labels, probabilities: propagate_slice(
        labels, 0, 1, 2, probabilities=probabilities, grow_voxels=20
    ),
    "interpolate_slices": lambda labels, probabilities: interpolate_slices(labels, 0, 1, 6, label=2),
    "refine_with_clicks": lambda labels, probabilities: refine_with_clicks(
        labels, probabilities, [(3, 18, 18)], [(4, 10, 12)], 2
    ),
}


@pytest.mark.parametrize("tool", TOOLS.values(), ids=TOOLS.keys())
def test_tools_leave_their_read_only_inputs_untouched(tool: Callable) -> None:
    labels, probabilities = _inputs()
    expected_labels, expected_probabilities = labels.copy(), probabilities.copy()
    labels.flags.writeable = False
    probabilities.flags.writeable = False
    edit = tool(labels, probabilities)
    assert isinstance(edit, Edit) and edit.num_changed > 0
    assert labels.tobytes() == expected_labels.tobytes()
    assert probabilities.tobytes() == expected_probabilities.tobytes()
    work = expected_labels.copy()  # and the edit round-trips on a writable copy
    edit.apply(work)
    assert work.tobytes() != expected_labels.tobytes()
    edit.revert(work)
    assert work.tobytes() == expected_labels.tobytes()
