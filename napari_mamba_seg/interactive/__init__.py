"""Pure-array correction tools for label arrays: clean-up, slice propagation and interpolation, click refinement,
review tracking and undo records.

Only numpy and scipy are imported here (no torch, napari or Qt), so the napari widgets, the command line and the
tests drive the same code. Label arrays are integer ``(z, y, x)`` or ``(y, x)`` arrays, 0 = background, class k =
value k; ``axis`` is the slice axis.

Every tool reads the labels, never modifies them, and returns an :class:`Edit` (None when nothing changes): the
bounding box of the changed voxels with their values before and after. The caller applies it in place and keeps it
for undo::

    stack = UndoStack()
    edit = fill_holes(layer.data, label=2, axis=0)
    if edit is not None:
        stack.apply(layer.data, edit)   # edit.apply(layer.data) + stack.push(edit)
        layer.refresh()
    ...
    stack.undo(layer.data); layer.refresh()

Tools:

* :func:`fill_holes`, :func:`remove_small_islands`, :func:`keep_largest_component` (clean-up);
* :func:`propagate_slice` (copy a slice, optionally model-guided), :func:`interpolate_slices` (shape interpolation
  between two annotated slices);
* :func:`refine_with_clicks` (positive and negative clicks on the model's probabilities);
* :class:`ReviewState` (reviewed slices; its ``trusted_mask`` is what fine-tuning trains on);
* :func:`expected_errors_per_slice`, :func:`review_order`, :func:`most_uncertain_unreviewed` (which slice to review
  next: the one where the model expects the most wrong voxels);
* :class:`Edit` and :class:`UndoStack`;
* :class:`CorrectionJournal` (crash-safe autosave of the edits and the review state, restored after a crash).
"""

from napari_mamba_seg.interactive.cleanup import fill_holes, keep_largest_component, remove_small_islands
from napari_mamba_seg.interactive.clicks import DEFAULT_MIN_CLICK_PROBABILITY, refine_with_clicks
from napari_mamba_seg.interactive.edits import DEFAULT_UNDO_BYTES, Edit, UndoStack
from napari_mamba_seg.interactive.journal import (
    RECOVERY_ROOT_ENV,
    CorrectionJournal,
    JournalError,
    JournalInfo,
    RestoredCorrections,
    default_recovery_root,
    discard_journal,
    journal_key,
)
from napari_mamba_seg.interactive.propagation import interpolate_slices, propagate_slice
from napari_mamba_seg.interactive.review import REVIEW_METADATA_KEY, ReviewState
from napari_mamba_seg.interactive.uncertainty import (
    DEFAULT_SPREAD_MM,
    SPREAD_FLOOR,
    expected_errors_per_slice,
    most_uncertain_unreviewed,
    review_order,
    slices_within,
)

__all__ = [
    "DEFAULT_MIN_CLICK_PROBABILITY",
    "DEFAULT_SPREAD_MM",
    "DEFAULT_UNDO_BYTES",
    "RECOVERY_ROOT_ENV",
    "REVIEW_METADATA_KEY",
    "SPREAD_FLOOR",
    "CorrectionJournal",
    "Edit",
    "JournalError",
    "JournalInfo",
    "RestoredCorrections",
    "ReviewState",
    "UndoStack",
    "default_recovery_root",
    "discard_journal",
    "expected_errors_per_slice",
    "fill_holes",
    "interpolate_slices",
    "journal_key",
    "keep_largest_component",
    "most_uncertain_unreviewed",
    "propagate_slice",
    "refine_with_clicks",
    "remove_small_islands",
    "review_order",
    "slices_within",
]
