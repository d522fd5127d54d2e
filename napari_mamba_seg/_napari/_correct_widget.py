"""Dock widget "Correct": review slices, refine with clicks, propagate, clean up, with undo for each operation.

napari's brush, eraser and fill stay the main tools (napari's own history covers them). This widget calls the
pure-array tools of :mod:`napari_mamba_seg.interactive` on the chosen Labels layer's data, applies the returned
:class:`~napari_mamba_seg.interactive.Edit` in place and keeps it on an undo stack per layer. The model's
probabilities (for click refinement, model-guided propagation and the most uncertain slice) are computed in a
worker thread from the model and image layers the Segment widget recorded in the layer's metadata, once per layer.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Labels, Points
from napari.utils.notifications import show_error
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_mamba_seg._napari._layer_data import METADATA_KEY, recovery_key
from napari_mamba_seg._napari._segment import model_input_from_layers, segmentation_job
from napari_mamba_seg._napari._segment_widget import RESULT_KEY
from napari_mamba_seg._napari._status import StatusLine, layer_key
from napari_mamba_seg._napari._workers import start_job
from napari_mamba_seg.interactive import (
    DEFAULT_SPREAD_MM,
    REVIEW_METADATA_KEY,
    CorrectionJournal,
    Edit,
    JournalError,
    ReviewState,
    UndoStack,
    default_recovery_root,
    expected_errors_per_slice,
    fill_holes,
    interpolate_slices,
    keep_largest_component,
    propagate_slice,
    refine_with_clicks,
    remove_small_islands,
    review_order,
    slices_within,
)

if TYPE_CHECKING:
    import napari

POSITIVE_CLICKS = "positive clicks"
NEGATIVE_CLICKS = "negative clicks"


class CorrectWidget(QWidget):
    """Correction tools for one Labels layer; every operation can be undone."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.undo_stacks: dict[str, UndoStack] = {}
        self.probabilities: dict[tuple[str, str], np.ndarray] = {}
        """The model's probabilities per (layer, model): a re-segmentation with a new version makes them stale."""
        self.journals: dict[str, CorrectionJournal] = {}
        self._journalled_layers: set[str] = set()
        self.pending_recovery: dict[str, Any] = {}
        self.worker: Any = None
        self._build()
        self._refresh_layers()
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self.viewer.dims.events.current_step.connect(self._show_review)

    # ------------------------------------------------------------------------------------------------ form

    def _build(self) -> None:
        self.labels_box = QComboBox()
        self.labels_box.currentIndexChanged.connect(self._show_review)
        self.labels_box.currentIndexChanged.connect(self._look_for_recovery)
        self.only_selected = QCheckBox("only the selected label")
        self.only_selected.setToolTip("apply clean-up and propagation to the layer's selected label only")

        self.review_text = QLabel()
        self.spread_mm = QDoubleSpinBox()
        self.spread_mm.setRange(0.0, 200.0)
        self.spread_mm.setDecimals(1)
        self.spread_mm.setValue(DEFAULT_SPREAD_MM)
        self.spread_mm.setSuffix(" mm")
        self.spread_mm.setToolTip(
            "Most uncertain first looks this far from the reviewed slices (0: anywhere). Spread-out slices teach a "
            "fine-tune more (neighbours repeat each other's errors); 0 finds the most errors in the fewest slices."
        )
        spread_row = QWidget()
        spread_layout = QHBoxLayout(spread_row)
        spread_layout.setContentsMargins(0, 0, 0, 0)
        spread_layout.addWidget(QLabel("Most uncertain at least"))
        spread_layout.addWidget(self.spread_mm)
        spread_layout.addWidget(QLabel("from reviewed slices"))
        review_extra = QWidget()
        review_extra_layout = QVBoxLayout(review_extra)
        review_extra_layout.setContentsMargins(0, 0, 0, 0)
        review_extra_layout.addWidget(spread_row)
        review_extra_layout.addWidget(self.review_text)
        review = self._group(
            "Review",
            [
                ("Mark slice reviewed", self.mark_reviewed),
                ("Unmark", self.unmark_reviewed),
                ("Next unreviewed", self.go_to_next_unreviewed),
                ("Most uncertain", self.go_to_most_uncertain),
            ],
            extra=review_extra,
        )
        clicks = self._group(
            "Clicks",
            [("Add click layers", self.add_click_layers), ("Refine from clicks", self.refine_from_clicks)],
        )
        propagate = self._group(
            "Propagate",
            [
                ("Copy to next slice", lambda: self.propagate(+1)),
                ("Copy to previous slice", lambda: self.propagate(-1)),
                ("Interpolate between reviewed", self.interpolate_reviewed),
            ],
        )
        self.min_voxels = QSpinBox()
        self.min_voxels.setRange(1, 10_000_000)
        self.min_voxels.setValue(50)
        self.min_voxels.setSuffix(" voxels")
        cleanup = self._group(
            "Clean up",
            [
                ("Fill holes", self.fill_holes),
                ("Remove islands smaller than", self.remove_islands),
                ("Keep largest component", self.keep_largest),
            ],
            extra=self.min_voxels,
        )
        self.undo_button = QPushButton("Undo")
        self.undo_button.clicked.connect(self.undo)
        self.redo_button = QPushButton("Redo")
        self.redo_button.clicked.connect(self.redo)
        history = QHBoxLayout()
        history.addWidget(self.undo_button)
        history.addWidget(self.redo_button)
        self.status = StatusLine()

        self.recovery_text = QLabel()
        self.recovery_text.setWordWrap(True)
        self.restore_button = QPushButton("Restore")
        self.restore_button.clicked.connect(self.restore_journal)
        self.discard_button = QPushButton("Discard")
        self.discard_button.clicked.connect(self.discard_journal)
        self.recovery_box = QGroupBox("Unsaved corrections found")
        recovery = QGridLayout(self.recovery_box)
        recovery.addWidget(self.recovery_text, 0, 0, 1, 2)
        recovery.addWidget(self.restore_button, 1, 0)
        recovery.addWidget(self.discard_button, 1, 1)
        self.recovery_box.setVisible(False)

        form = QFormLayout()
        form.addRow("Labels layer", self.labels_box)
        form.addRow("", self.only_selected)
        layout = QVBoxLayout(self)
        layout.addWidget(self.recovery_box)
        layout.addLayout(form)
        for group in (review, clicks, propagate, cleanup):
            layout.addWidget(group)
        layout.addLayout(history)
        layout.addWidget(self.status)
        layout.addStretch(1)
        self._update_history_buttons()

    def _group(
        self, title: str, buttons: list[tuple[str, Callable[[], Any]]], extra: QWidget | None = None
    ) -> QGroupBox:
        box = QGroupBox(title)
        grid = QGridLayout(box)
        self.buttons = getattr(self, "buttons", {})
        for index, (text, slot) in enumerate(buttons):
            button = QPushButton(text)
            button.clicked.connect(lambda _checked=False, slot=slot: slot())
            grid.addWidget(button, index // 2, index % 2)
            self.buttons[text] = button
        if extra is not None:
            grid.addWidget(extra, (len(buttons) + 1) // 2, 0, 1, 2)
        return box

    def _refresh_layers(self, event: Any = None) -> None:
        """List the Labels layers; a newly added one (e.g. a segmentation just made) becomes the chosen one."""
        current = self.labels_box.currentText()
        added = getattr(event, "value", None)
        if getattr(event, "type", "") == "inserted" and isinstance(added, Labels):
            current = added.name
        self.labels_box.blockSignals(True)
        self.labels_box.clear()
        for layer in self.viewer.layers:
            if isinstance(layer, Labels):
                self.labels_box.addItem(layer.name)
        index = self.labels_box.findText(current)
        self.labels_box.setCurrentIndex(index if index >= 0 else self.labels_box.count() - 1)
        self.labels_box.blockSignals(False)
        self._show_review()
        self._look_for_recovery()

    # ----------------------------------------------------------------------------------------- the layer

    def labels_layer(self) -> Labels:
        """The chosen Labels layer; ValueError when there is none."""
        name = self.labels_box.currentText()
        if not name or name not in self.viewer.layers:
            raise ValueError("no Labels layer: segment an image first, or add a Labels layer")
        layer = self.viewer.layers[name]
        if np.asarray(layer.data).ndim != 3:
            raise ValueError(
                f"layer {name!r} has shape {layer.data.shape}; the correction tools work on 3D label volumes"
            )
        return layer

    def slice_axis_and_index(self, layer: Labels) -> tuple[int, int]:
        """The layer axis napari slices through now (the first not displayed) and the current slice on it."""
        offset = self.viewer.dims.ndim - layer.ndim
        hidden = [axis - offset for axis in self.viewer.dims.not_displayed if axis - offset >= 0]
        if not hidden:
            raise ValueError("napari shows the volume in 3D; switch to 2D view to work slice by slice")
        axis = hidden[0]
        data_point = layer.world_to_data(self.viewer.dims.point)
        index = round(float(data_point[axis]))
        if not 0 <= index < layer.data.shape[axis]:
            raise ValueError(f"the current slice {index} lies outside layer {layer.name!r}")
        return axis, index

    def _selected_label(self, layer: Labels) -> int | None:
        return int(layer.selected_label) if self.only_selected.isChecked() else None

    # ------------------------------------------------------------------------------------------- review

    def review_state(self, layer: Labels, axis: int) -> ReviewState:
        """The layer's review state along ``axis`` (a new one when none is stored or it was for another axis)."""
        record = layer.metadata.get(REVIEW_METADATA_KEY)
        if record is not None:
            state = ReviewState.from_dict(record)
            if state.axis == axis:
                state.check_fits(layer.data.shape)
                return state
        return ReviewState.for_shape(layer.data.shape, axis)

    def _store_review(self, layer: Labels, state: ReviewState) -> None:
        layer.metadata = {**layer.metadata, REVIEW_METADATA_KEY: state.to_dict()}
        journal = self._journal(layer)
        if journal is not None:
            journal.record_review(state)
        self._show_review()

    def mark_reviewed(self) -> None:
        """Mark the current slice as reviewed (stored in the layer's metadata)."""
        self._guarded(lambda: self._set_review(True))

    def unmark_reviewed(self) -> None:
        """Mark the current slice as not reviewed."""
        self._guarded(lambda: self._set_review(False))

    def _set_review(self, reviewed: bool) -> None:
        layer = self.labels_layer()
        axis, index = self.slice_axis_and_index(layer)
        state = self.review_state(layer, axis)
        state.mark(index) if reviewed else state.unmark(index)
        self._store_review(layer, state)

    def go_to_next_unreviewed(self) -> None:
        """Move napari to the next slice not yet reviewed."""

        def go() -> None:
            layer = self.labels_layer()
            axis, index = self.slice_axis_and_index(layer)
            target = self.review_state(layer, axis).next_unreviewed(index)
            if target is None:
                self._say("every slice is reviewed")
                return
            self._go_to_slice(layer, axis, target)

        self._guarded(go)

    def go_to_most_uncertain(self) -> None:
        """Move napari to the unreviewed slice where the model expects the most wrong voxels, first looking farther
        than the spread (default :data:`~napari_mamba_seg.interactive.DEFAULT_SPREAD_MM`) from the reviewed slices.

        The expected errors come from the model's probabilities (computed in a worker once per layer and model):
        :func:`~napari_mamba_seg.interactive.expected_errors_per_slice` and
        :func:`~napari_mamba_seg.interactive.review_order`.
        """

        def go() -> None:
            layer = self.labels_layer()
            axis, _index = self.slice_axis_and_index(layer)

            def jump(probabilities: np.ndarray) -> None:
                scores = expected_errors_per_slice(probabilities, axis)
                review = self.review_state(layer, axis)
                spread_mm = self.spread_mm.value()
                spread = slices_within(spread_mm, layer.scale, axis)
                order = review_order(review, scores, spread=spread)
                if not order:
                    self._say("every slice is reviewed")
                    return
                target = order[0]
                self._go_to_slice(layer, axis, target)
                far = spread > 0 and bool(review.reviewed) and all(abs(target - i) > spread for i in review.reviewed)
                among = f"more than {spread_mm:g} mm from a reviewed slice" if far else "all"
                self._say(
                    f"slice {target}: the model expects about {scores[target]:.0f} wrong voxels here, the most of the "
                    f"unreviewed slices ({among}; {len(order)} unreviewed)"
                )

            self._with_probabilities(layer, jump)

        self._guarded(go)

    def _go_to_slice(self, layer: Labels, axis: int, index: int) -> None:
        offset = self.viewer.dims.ndim - layer.ndim
        world = layer.data_to_world(np.eye(layer.ndim)[axis] * index)
        self.viewer.dims.set_point(axis + offset, float(world[axis]))

    def _show_review(self, *_: Any) -> None:
        try:
            layer = self.labels_layer()
            axis, index = self.slice_axis_and_index(layer)
            state = self.review_state(layer, axis)
        except ValueError:
            self.review_text.setText("")
            return
        mark = "reviewed" if state.is_reviewed(index) else "not reviewed"
        done = state.num_slices - state.remaining
        text = f"slice {index}: {mark}; {done} of {state.num_slices} reviewed, {state.remaining} remaining"
        cached = self.probabilities.get(_probabilities_key(layer))
        if cached is not None and cached.shape[1:] == layer.data.shape:  # known once computed for another tool
            expected = expected_errors_per_slice(np.take(cached, [index], axis=axis + 1), axis)[0]
            text += f"; the model expects about {expected:.0f} wrong voxels here"
        self.review_text.setText(text)

    # ----------------------------------------------------------------------------------------- clicks

    def add_click_layers(self) -> None:
        """Add the positive and negative click Points layers on the Labels layer's grid."""

        def add() -> None:
            layer = self.labels_layer()
            for name, colour in ((POSITIVE_CLICKS, "lime"), (NEGATIVE_CLICKS, "magenta")):
                if name not in self.viewer.layers:
                    self.viewer.add_points(
                        np.empty((0, layer.ndim)),
                        name=name,
                        scale=layer.scale,
                        translate=layer.translate,
                        face_color=colour,
                        size=4,
                    )
            self.viewer.layers.selection.active = self.viewer.layers[POSITIVE_CLICKS]
            self.viewer.layers[POSITIVE_CLICKS].mode = "add"
            self._say("click on what the label misses (positive) or on a wrong region (negative), then Refine")

        self._guarded(add)

    def refine_from_clicks(self) -> None:
        """Add the model's region at positive clicks and remove regions at negative ones (selected label)."""

        def refine() -> None:
            layer = self.labels_layer()
            positive, negative = self._clicks(layer)
            if not positive and not negative:
                raise ValueError("no clicks: press 'Add click layers' and click in the positive or negative layer")

            def apply(probabilities: np.ndarray) -> None:
                axis, _index = self.slice_axis_and_index(layer)
                edit = refine_with_clicks(
                    layer.data, probabilities, positive, negative, int(layer.selected_label), axis=axis
                )
                self._apply(layer, edit)
                for name in (POSITIVE_CLICKS, NEGATIVE_CLICKS):
                    self.viewer.layers[name].data = np.empty((0, layer.ndim))

            self._with_probabilities(layer, apply)

        self._guarded(refine)

    def _clicks(self, layer: Labels) -> tuple[list[np.ndarray], list[np.ndarray]]:
        clicks = []
        for name in (POSITIVE_CLICKS, NEGATIVE_CLICKS):
            points = self.viewer.layers[name] if name in self.viewer.layers else None  # noqa: SIM401 (no .get)
            if not isinstance(points, Points):
                clicks.append([])
                continue
            world = [points.data_to_world(p) for p in points.data]
            clicks.append([np.asarray(layer.world_to_data(p)) for p in world])
        return clicks[0], clicks[1]

    def _with_probabilities(self, layer: Labels, then: Callable[[np.ndarray], None]) -> None:
        """Call ``then(probabilities)`` now when cached, else after the model has computed them in a worker."""
        cached = self.probabilities.get(_probabilities_key(layer))
        if cached is not None and cached.shape[1:] == layer.data.shape:
            then(cached)
            return
        record = layer.metadata.get(RESULT_KEY)
        if not record:
            raise ValueError(
                f"layer {layer.name!r} was not made by the Segment widget, so no model is known for it: segment the "
                "image with the Segment widget first (or correct with napari's brush)"
            )
        missing = [name for name in record["image_layers"] if name not in self.viewer.layers]
        if missing:
            raise ValueError(f"the image layers {missing} this segmentation came from are gone; open them again")
        model_input = model_input_from_layers([self.viewer.layers[name] for name in record["image_layers"]])
        if model_input.image.shape[1:] != layer.data.shape:
            raise ValueError(
                f"layer {layer.name!r} has shape {layer.data.shape} but its image {model_input.image.shape[1:]}; "
                "the correction tools need labels on the image's grid"
            )
        if self.worker is not None:
            raise ValueError("the model is still computing; wait for it to finish")
        job = segmentation_job(record["model"], "auto", model_input, probabilities=True)
        self._say("computing the model's probabilities (once per layer)…")

        def store(result: Any) -> None:
            self.probabilities[_probabilities_key(layer)] = result.probabilities
            self._guarded(lambda: then(result.probabilities))

        self.worker = start_job(
            job,
            on_progress=lambda update: self._say(f"model: {update.stage} {update.message}"),
            on_result=store,
            on_failure=lambda error: self._fail(str(error) or type(error).__name__),
            on_finished=self._job_finished,
        )

    def _job_finished(self) -> None:
        self.worker = None

    # --------------------------------------------------------------------------------------- propagate

    def propagate(self, step: int) -> None:
        """Copy the current slice's labels onto the next (``step=+1``) or previous (-1) slice and go there."""

        def copy() -> None:
            layer = self.labels_layer()
            axis, index = self.slice_axis_and_index(layer)
            target = index + step
            if not 0 <= target < layer.data.shape[axis]:
                raise ValueError(f"slice {index} is the {'last' if step > 0 else 'first'} one; nothing to copy onto")
            cached = self.probabilities.get(_probabilities_key(layer))
            probabilities = cached if cached is not None and cached.shape[1:] == layer.data.shape else None
            edit = propagate_slice(
                layer.data, axis, index, target, probabilities=probabilities, label=self._selected_label(layer)
            )
            self._apply(layer, edit)
            self._go_to_slice(layer, axis, target)

        self._guarded(copy)

    def interpolate_reviewed(self) -> None:
        """Shape-interpolate every gap between two consecutive reviewed slices (one undo step)."""

        def interpolate() -> None:
            layer = self.labels_layer()
            axis, _index = self.slice_axis_and_index(layer)
            reviewed = sorted(self.review_state(layer, axis).reviewed)
            pairs = [(a, b) for a, b in itertools.pairwise(reviewed) if b - a > 1]
            if not pairs:
                raise ValueError("mark at least two slices reviewed with unreviewed slices between them")
            result = np.array(layer.data, copy=True)
            for start, end in pairs:
                edit = interpolate_slices(result, axis, start, end, label=self._selected_label(layer))
                if edit is not None:
                    edit.apply(result)
            self._apply(layer, Edit.between(layer.data, result, f"interpolate {len(pairs)} gap(s)"))

        self._guarded(interpolate)

    # ----------------------------------------------------------------------------------------- clean-up

    def fill_holes(self) -> None:
        """Fill the holes of each class (or the selected label), slice by slice."""

        def run() -> None:
            layer = self.labels_layer()
            axis, _index = self.slice_axis_and_index(layer)
            self._apply(layer, fill_holes(layer.data, label=self._selected_label(layer), axis=axis))

        self._guarded(run)

    def remove_islands(self) -> None:
        """Remove the connected pieces smaller than the chosen number of voxels."""

        def run() -> None:
            layer = self.labels_layer()
            edit = remove_small_islands(layer.data, self.min_voxels.value(), label=self._selected_label(layer))
            self._apply(layer, edit)

        self._guarded(run)

    def keep_largest(self) -> None:
        """Keep only the largest connected component of each class (or the selected label)."""

        def run() -> None:
            layer = self.labels_layer()
            self._apply(layer, keep_largest_component(layer.data, label=self._selected_label(layer)))

        self._guarded(run)

    # ----------------------------------------------------------------------------------------- autosave

    def _journal_key(self, layer: Labels) -> str:
        return recovery_key(layer.metadata, tuple(layer.data.shape), layer.name)

    def _journal(self, layer: Labels) -> CorrectionJournal | None:
        """The layer's recovery journal, started at its first change (None while a recovery offer is pending).

        Every operation of this widget, every review mark and every napari brush, fill or polygon stroke is recorded
        durably before the next one; after a crash, choosing the same layer of the same image offers the restore.
        """
        key = layer_key(layer)
        if key in self.pending_recovery:
            raise ValueError("unsaved corrections of this layer were found: restore or discard them first")
        journal = self.journals.get(key)
        if journal is not None and not journal.folder.is_dir():  # discarded because the layer was saved: a new one
            del self.journals[key]
            journal = None
        if journal is None:
            try:
                journal = CorrectionJournal.start(
                    default_recovery_root(),
                    self._journal_key(layer),
                    np.asarray(layer.data),
                    description={
                        "layer": layer.name,
                        "source": str(layer.metadata.get(METADATA_KEY, {}).get("source")),
                    },
                )
            except (OSError, JournalError) as error:
                show_error(f"Mamba Segmentation: autosave is off for {layer.name!r}: {error}")
                return None
            self.journals[key] = journal
            if key not in self._journalled_layers:
                self._journalled_layers.add(key)
                layer.events.paint.connect(lambda event, layer=layer: self._journal_paint(layer, event))
        return journal

    def _journal_paint(self, layer: Labels, event: Any) -> None:
        """Journal a napari brush, fill or polygon stroke (a new journal, if needed, starts from the painted data:
        replaying the stroke on it changes nothing)."""
        try:
            journal = self._journal(layer)
            if journal is not None:
                _record_paint(journal, event)
        except (ValueError, OSError, JournalError) as error:
            self._fail(f"this stroke is not autosaved: {error}")

    def _look_for_recovery(self, *_: Any) -> None:
        """Offer to restore the journal of the chosen layer when one was left by an earlier session."""
        try:
            layer = self.labels_layer()
        except ValueError:
            self.recovery_box.setVisible(False)
            return
        key = layer_key(layer)
        if key in self.journals:
            self.recovery_box.setVisible(key in self.pending_recovery)
            return
        try:
            info = CorrectionJournal.find(default_recovery_root(), self._journal_key(layer))
        except (OSError, JournalError):
            info = None
        if info is None or info.num_records == 0:
            self.recovery_box.setVisible(False)
            return
        self.pending_recovery[key] = info
        when = info.last_change.strftime("%Y-%m-%d %H:%M")
        self.recovery_text.setText(
            f"{info.num_edits} change(s) and review marks of {layer.name!r}, last at {when}, were not saved "
            "(napari closed or crashed). Restore them into the layer, or discard them?"
        )
        self.recovery_box.setVisible(True)

    def restore_journal(self) -> None:
        """Replace the layer's labels and review state by the journalled ones (one undo step)."""

        def restore() -> None:
            layer = self.labels_layer()
            info = self.pending_recovery.pop(layer_key(layer), None)
            if info is None:
                return
            restored = CorrectionJournal.restore(default_recovery_root(), info.key)
            if restored.labels.shape != layer.data.shape:
                raise ValueError(f"the journal holds labels of shape {restored.labels.shape}, not {layer.data.shape}")
            edit = Edit.between(np.asarray(layer.data), restored.labels, "restore unsaved corrections")
            if restored.review is not None:
                layer.metadata = {**layer.metadata, REVIEW_METADATA_KEY: restored.review.to_dict()}
            self.recovery_box.setVisible(False)
            self._apply(layer, edit)  # starts a new journal from the restored labels
            self._say(
                f"restored {restored.num_edits} change(s)"
                + (f"; skipped: {restored.skipped}" if restored.skipped else "")
            )
            self._show_review()

        self._guarded(restore)

    def discard_journal(self) -> None:
        """Forget the unsaved corrections found for the layer."""

        def discard() -> None:
            layer = self.labels_layer()
            info = self.pending_recovery.pop(layer_key(layer), None)
            if info is not None:
                from napari_mamba_seg.interactive import discard_journal

                discard_journal(default_recovery_root(), info.key)
            self.recovery_box.setVisible(False)
            self._say("unsaved corrections discarded")

        self._guarded(discard)

    # ----------------------------------------------------------------------------------------- history

    def _stack(self, layer: Labels) -> UndoStack:
        return self.undo_stacks.setdefault(layer_key(layer), UndoStack())

    def _apply(self, layer: Labels, edit: Edit | None) -> None:
        if edit is None:
            self._say("nothing changed")
            return
        journal = self._journal(layer)
        self._stack(layer).apply(layer.data, edit)
        if journal is not None:
            journal.record_edit(edit)
        layer.refresh()
        self._say(f"{edit.description} ({edit.num_changed} voxels)")
        self._update_history_buttons()

    def undo(self) -> None:
        """Undo the last operation of this widget on the chosen layer."""
        self._guarded(lambda: self._step_history(undo=True))

    def redo(self) -> None:
        """Redo the last undone operation."""
        self._guarded(lambda: self._step_history(undo=False))

    def _step_history(self, *, undo: bool) -> None:
        layer = self.labels_layer()
        stack = self._stack(layer)
        journal = self._journal(layer)
        edit = stack.undo(layer.data) if undo else stack.redo(layer.data)
        if edit is None:
            self._say(f"nothing to {'undo' if undo else 'redo'}")
            return
        if journal is not None:
            journal.record_edit(edit.inverse() if undo else edit)
        layer.refresh()
        self._say(f"{'undone' if undo else 'redone'}: {edit.description}")
        self._update_history_buttons()

    def _update_history_buttons(self) -> None:
        try:
            stack = self._stack(self.labels_layer())
        except ValueError:
            stack = UndoStack()
        self.undo_button.setEnabled(stack.can_undo)
        self.redo_button.setEnabled(stack.can_redo)

    # ----------------------------------------------------------------------------------------- messages

    def _guarded(self, action: Callable[[], Any]) -> None:
        """Run ``action``; a ValueError becomes a message in the widget and a notification, nothing changed."""
        try:
            action()
        except ValueError as error:
            self._fail(str(error))

    def _say(self, message: str) -> None:
        self.status.say(message)

    def _fail(self, message: str) -> None:
        self.status.fail(message)


def _record_paint(journal: CorrectionJournal, event: Any) -> None:
    """Journal one napari paint history item: masked box atoms (brush, fill, polygon) or voxel atoms (data_setitem).

    napari's own undo/redo (Ctrl+Z) emits no paint event, so it is not journalled (a restore then replays the
    strokes as drawn).
    """
    regions = [atom for atom in event.value if hasattr(atom, "slice_key")]  # napari's _MaskedPaintAtom
    if regions:
        journal.record_regions(
            [(atom.slice_key, atom.mask, atom.old_values, atom.new_value) for atom in regions], "napari brush"
        )
    for atom in event.value:
        if not hasattr(atom, "slice_key"):  # (indices, old values, new values) of data_setitem
            journal.record_voxels(*atom, "napari edit")


def _probabilities_key(layer: Labels) -> tuple[str, str]:
    """The cache key of a layer's probabilities: the layer and the model it was last segmented with."""
    record = layer.metadata.get(RESULT_KEY) or {}
    return layer_key(layer), str(record.get("model", ""))
