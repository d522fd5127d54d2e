"""Dock widget "Fine-tune": teach the model the corrections of one or several reviewed Labels layers.

Thin by design: the form becomes :class:`~napari_mamba_seg.training.finetune.CorrectedStudy` objects and
:class:`~napari_mamba_seg.training.finetune.FineTuneSettings`; :func:`finetune_job` runs
:func:`~napari_mamba_seg.training.finetune.finetune` (which takes a progress *callback*) in a thread of its own and
yields its progress through a queue, so napari's worker relays every step to the UI thread (progress bar, loss plot)
while the UI stays free. The finished version is saved with :func:`~napari_mamba_seg.training.finetune.save_version`;
"Re-segment unreviewed slices" then predicts the image again with it and writes only the slices nobody reviewed.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Labels
from napari.utils.notifications import show_info, show_warning
from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QDoubleSpinBox,
    QFormLayout,
    QFrame,
    QGroupBox,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_mamba_seg._napari._controls import DeviceBox, RunControls
from napari_mamba_seg._napari._layer_data import review_of
from napari_mamba_seg._napari._segment import ModelInput, model_input_from_layers, segmentation_job
from napari_mamba_seg._napari._segment_widget import RESULT_KEY
from napari_mamba_seg._napari._status import StatusLine, layer_key
from napari_mamba_seg._napari._workers import start_job
from napari_mamba_seg.interactive.review import ReviewState
from napari_mamba_seg.training.finetune import (
    CorrectedStudy,
    FineTuneOutcome,
    FineTuneSettings,
    ModelVersions,
    finetune,
    lineage_of,
    save_version,
    split_reviewed_slices,
    versions_root,
)

if TYPE_CHECKING:
    import napari

HOLDOUT_EVERY = FineTuneSettings().holdout_every
ROLE_KEY = Qt.ItemDataRole.UserRole
LOSS_COLOUR = QColor(86, 180, 233)
DICE_COLOUR = QColor(230, 159, 0)


# ------------------------------------------------------------------------------------------- the jobs (no Qt)


@dataclass
class FineTuneRun:
    """A finished fine-tune job: the outcome and, unless it was cancelled, the saved version's folder."""

    outcome: FineTuneOutcome
    folder: Path | None


@dataclass
class Target:
    """A Labels layer to re-segment: its identity (``unique_id``) and the image it was segmented from."""

    key: str
    name: str
    model_input: ModelInput


def finetune_job(
    source: str,
    studies: Sequence[CorrectedStudy],
    settings: FineTuneSettings,
    *,
    cancel: threading.Event,
    targets: Sequence[Target] = (),
) -> Generator[Any, None, FineTuneRun]:
    """Fine-tune and save the version as a generator: yields each ``TrainingProgress``, returns a :class:`FineTuneRun`.

    :func:`finetune` reports through a callback, so it runs in a thread of its own that puts its reports in a queue;
    this generator hands them on as they come (in napari's worker thread). A cancelled run saves nothing. When
    ``settings.changed_weight`` is not 1 or ``settings.anchor`` is on, the model's own prediction must be known: each
    study is first predicted again with ``source`` (its ``targets`` entry gives the image), yielding prediction
    progress.

    Args:
        source: The bundle to start from (name or folder).
        studies: The corrected studies.
        settings: How to fine-tune.
        cancel: Set it to stop before the next step; also set when the generator is closed early.
        targets: One per study, in order: needed when ``settings.changed_weight != 1`` or ``settings.anchor``.

    Raises:
        ValueError: From :func:`finetune` (e.g. no reviewed slice, a study that does not fit the model).
        PredictionCancelled: Cancelled while predicting the studies again.
    """
    if settings.changed_weight != 1 or settings.anchor:
        studies = yield from _with_predictions(source, studies, targets, settings.device, cancel)
    reports: queue.Queue[Any] = queue.Queue()
    finished = object()
    ended: dict[str, Any] = {}

    def work() -> None:
        try:
            ended["outcome"] = finetune(source, studies, settings, progress=reports.put, cancel=cancel)
        except BaseException as error:  # handed to the generator, which raises it in the worker
            ended["error"] = error
        finally:
            reports.put(finished)

    thread = threading.Thread(target=work, name="napari-mamba-seg fine-tune", daemon=True)
    thread.start()
    try:
        while (report := reports.get()) is not finished:
            yield report
    finally:
        if thread.is_alive():  # the generator was closed early (widget gone): stop the fine-tune too
            cancel.set()
    thread.join()
    if "error" in ended:
        raise ended["error"]
    outcome: FineTuneOutcome = ended["outcome"]
    return FineTuneRun(outcome, None if outcome.cancelled else save_version(outcome))


def _with_predictions(
    source: str,
    studies: Sequence[CorrectedStudy],
    targets: Sequence[Target],
    device: str,
    cancel: threading.Event,
) -> Generator[Any, None, list[CorrectedStudy]]:
    """The studies with ``predicted`` set to ``source``'s prediction of their image (what the clinician corrected)."""
    if len(targets) != len(studies):
        raise ValueError(f"{len(targets)} images for {len(studies)} studies: give one target per study")
    predicted = []
    for study, target in zip(studies, targets, strict=True):
        result = yield from segmentation_job(source, device, target.model_input, cancel=cancel)
        predicted.append(dataclasses.replace(study, predicted=result.labels))
    return predicted


def resegment_job(
    model: str, device: str, targets: Sequence[Target], *, cancel: threading.Event
) -> Generator[Any, None, list[tuple[Target, Any]]]:
    """Segment each target's image with ``model``: yields prediction progress, returns ``[(target, result)]``."""
    results = []
    for target in targets:
        result = yield from segmentation_job(model, device, target.model_input, cancel=cancel)
        results.append((target, result))
    return results


def write_unreviewed(labels: np.ndarray, prediction: np.ndarray, review: ReviewState) -> int:
    """Write ``prediction`` into ``labels`` on the slices ``review`` does not mark reviewed (in place).

    Args:
        labels: ``(*spatial)`` label array, changed in place; its reviewed slices are not touched.
        prediction: ``(*spatial)`` new labels.
        review: The reviewed slices.

    Returns:
        The number of voxels that changed.

    Raises:
        ValueError: Shapes that differ, or a review state for other labels.
    """
    if prediction.shape != labels.shape:
        raise ValueError(f"the prediction {prediction.shape} does not fit the labels {labels.shape}")
    unreviewed = ~review.trusted_mask(labels.shape)
    new_values = prediction[unreviewed].astype(labels.dtype)
    changed = int(np.count_nonzero(labels[unreviewed] != new_values))
    labels[unreviewed] = new_values
    return changed


# ------------------------------------------------------------------------------------------------ loss plot


class LossPlot(QWidget):
    """A small live plot of the training loss per step (a polyline, scaled to its range) and the held-out Dice (dots
    joined by a line, on a fixed 0-1 scale; step 0 is the model before the fine-tune), with the newest values as text.
    """

    def __init__(self) -> None:
        super().__init__()
        self.points: list[tuple[int, float]] = []
        self.dice_points: list[tuple[int, float]] = []
        self.total_steps = 0
        self.setMinimumHeight(90)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setToolTip(
            "blue: training loss per step (lower is better, scaled to its range); orange: Dice on the held-out "
            "reviewed slices (0 at the bottom, 1 at the top; step 0: the model before fine-tuning)"
        )

    def clear(self, total_steps: int = 0) -> None:
        """Forget every point; ``total_steps`` (when known) fixes the width of the step axis."""
        self.points, self.dice_points, self.total_steps = [], [], int(total_steps)
        self.update()

    def add(self, step: int, loss: float) -> None:
        """Add the loss of one step (non-finite losses are drawn at the top)."""
        self.points.append((int(step), float(loss)))
        self.update()

    def add_dice(self, step: int, dice: float) -> None:
        """Add a held-out Dice (non-finite ones are left out of the drawing)."""
        self.dice_points.append((int(step), float(dice)))
        self.update()

    def paintEvent(self, event: Any) -> None:
        """Draw the frame, both curves and the captions."""
        painter = QPainter(self)
        try:
            painter.setRenderHint(QPainter.RenderHint.Antialiasing)
            frame = QRectF(self.rect()).adjusted(4, 16, -4, -4)
            painter.setPen(QPen(self.palette().mid().color()))
            painter.drawRect(frame)
            painter.setPen(QPen(self.palette().text().color()))
            painter.drawText(QPointF(6, 12), self._caption())
            if self.dice_points:
                painter.setPen(QPen(DICE_COLOUR))
                caption = f"held-out Dice {self.dice_points[-1][1]:.3f}"
                width = painter.fontMetrics().horizontalAdvance(caption)
                painter.drawText(QPointF(self.width() - 6 - width, 12), caption)
            self._draw(painter, self._polyline(frame), LOSS_COLOUR, dots=False)
            self._draw(painter, self._dice_polyline(frame), DICE_COLOUR, dots=True)
        finally:
            painter.end()

    @staticmethod
    def _draw(painter: QPainter, polyline: list[QPointF], colour: QColor, *, dots: bool) -> None:
        if len(polyline) >= 2:
            painter.setPen(QPen(colour, 2))
            painter.drawPolyline(QPolygonF(polyline))
        if dots or len(polyline) == 1:
            painter.setPen(QPen(colour, 6))
            for point in polyline:
                painter.drawPoint(point)

    def _caption(self) -> str:
        if not self.points:
            return "loss: no step yet"
        finite = [loss for _, loss in self.points if math.isfinite(loss)]
        step, last = self.points[-1]
        span = f" (range {min(finite):.3g}–{max(finite):.3g})" if finite else ""
        return f"loss at step {step}: {last:.4g}{span}"

    def _polyline(self, frame: QRectF) -> list[QPointF]:
        finite = [loss for _, loss in self.points if math.isfinite(loss)]
        low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
        y_span = max(high - low, 1e-12)
        heights = [((loss - low) / y_span if math.isfinite(loss) else 1.0) for _, loss in self.points]
        return self._placed(frame, [step for step, _ in self.points], heights)

    def _dice_polyline(self, frame: QRectF) -> list[QPointF]:
        finite = [(step, dice) for step, dice in self.dice_points if math.isfinite(dice)]
        return self._placed(frame, [step for step, _ in finite], [min(max(dice, 0.0), 1.0) for _, dice in finite])

    def _placed(self, frame: QRectF, steps: list[int], heights: list[float]) -> list[QPointF]:
        """Points in ``frame``: the step axis from 0 to the total (or the last step seen), heights from 0 to 1."""
        last = max([self.total_steps] + [s for s, _ in self.points] + [s for s, _ in self.dice_points])
        x_scale, y_scale = (frame.width() - 4) / max(last, 1), frame.height() - 4
        return [
            QPointF(frame.left() + 2 + x_scale * step, frame.bottom() - 2 - y_scale * height)
            for step, height in zip(steps, heights, strict=True)
        ]


# --------------------------------------------------------------------------------------------------- widget


class FineTuneWidget(QWidget):
    """Corrected Labels layers and settings in; a new model version out, and the unreviewed slices re-segmented."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.worker: Any = None
        self.last_version: Path | None = None  # the folder of the last saved version (the model is not kept)
        self.last_targets: list[Target] = []
        self._cancel = threading.Event()
        self._build()
        self._refresh_layers()
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)

    # -------------------------------------------------------------------------------------------- form

    def _build(self) -> None:
        self.layer_list = QListWidget()
        self.layer_list.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.layer_list.setToolTip("corrected Labels layers made with the Segment widget (one or several studies)")
        self.layer_list.setMinimumHeight(60)
        self.layer_list.setMaximumHeight(100)
        self.layer_list.itemSelectionChanged.connect(self._on_choice_changed)
        self.summary = QLabel()
        self.summary.setWordWrap(True)
        self.steps = QSpinBox()
        self.steps.setRange(1, 100_000)
        self.steps.setValue(FineTuneSettings().steps)
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(6)
        self.lr.setRange(1e-6, 1e-1)
        self.lr.setSingleStep(1e-5)
        self.lr.setValue(FineTuneSettings().lr)
        self.augment = QCheckBox("augment the patches (flips, rotations, intensity)")
        self.augment.setChecked(FineTuneSettings().augment)
        self.changed_weight = QDoubleSpinBox()
        self.changed_weight.setDecimals(1)
        self.changed_weight.setRange(1.0, 50.0)
        self.changed_weight.setValue(FineTuneSettings().changed_weight)
        self.changed_weight.setToolTip(
            "loss weight of the voxels you changed from the model's prediction (1 = like any reviewed voxel); above 1 "
            "the model predicts the studies once more to find them"
        )
        self.freeze_encoder = QCheckBox("freeze the encoder (train the decoder only)")
        self.freeze_encoder.setChecked(FineTuneSettings().freeze_encoder)
        self.anchor = QCheckBox("anchor to the model's own prediction on unreviewed slices")
        self.anchor.setChecked(FineTuneSettings().anchor)
        self.anchor.setToolTip(
            "half of the patches show the model what it predicted on the slices you did not review, so your "
            "corrections change what they show without shifting the whole study (the studies are predicted once more); "
            "where your corrections showed the model wrong (the positions you corrected, on the slices within 20 mm; "
            "a false finding you removed that it repeats farther away) it does not rehearse itself"
        )
        self.device_box = DeviceBox()
        self.controls = RunControls("Fine-tune", self.run, self.cancel)
        self.run_button = self.controls.run_button
        self.cancel_button = self.controls.cancel_button
        self.progress = self.controls.progress
        self.loss_plot = LossPlot()
        self.dice_label = QLabel("")
        self.dice_label.setWordWrap(True)
        self.status = StatusLine()
        self.resegment_button = QPushButton("Re-segment unreviewed slices")
        self.resegment_button.setToolTip("predict again with the new version; reviewed slices are kept as they are")
        self.resegment_button.setEnabled(False)
        self.resegment_button.clicked.connect(self.resegment)

        choice = QFormLayout()
        choice.addRow("Corrected layers", self.layer_list)
        form = QFormLayout()
        form.addRow("Steps", self.steps)
        form.addRow("Learning rate", self.lr)
        form.addRow("", self.augment)
        form.addRow("Changed voxels ×", self.changed_weight)
        form.addRow("", self.freeze_encoder)
        form.addRow("", self.anchor)
        form.addRow("Device", self.device_box)
        content = QWidget()  # in a scroll area: the form is taller than a dock on a small screen
        layout = QVBoxLayout(content)
        layout.addLayout(choice)
        layout.addWidget(self.summary)  # outside the form: a wrapped label in a form row can overlap the row above
        layout.addLayout(form)
        layout.addWidget(self.controls)
        layout.addWidget(self.loss_plot)
        layout.addWidget(self.dice_label)
        layout.addWidget(self.status)
        layout.addWidget(self.resegment_button)
        layout.addWidget(self._build_versions())
        layout.addStretch(1)
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(QFrame.Shape.NoFrame)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.scroll.setWidget(content)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self.scroll)

    def showEvent(self, event: Any) -> None:
        """Scroll down, never sideways: the scroll area is as wide as its content (measured once styled, on show)."""
        super().showEvent(event)
        content = self.scroll.widget()
        scroll_bar = self.scroll.verticalScrollBar().sizeHint().width()
        self.scroll.setMinimumWidth(content.minimumSizeHint().width() + scroll_bar + 2 * self.scroll.frameWidth())

    def _build_versions(self) -> QGroupBox:
        box = QGroupBox("Versions")
        self.versions_list = QListWidget()
        self.versions_list.setMaximumHeight(130)
        self.versions_list.setWordWrap(True)
        self.versions_label = QLabel("")
        self.versions_label.setWordWrap(True)
        self.activate_button = QPushButton("Activate selected version")
        self.activate_button.setToolTip("make it the version the widgets use for this model")
        self.activate_button.clicked.connect(self.activate_selected)
        layout = QVBoxLayout(box)
        layout.addWidget(self.versions_label)
        layout.addWidget(self.versions_list)
        layout.addWidget(self.activate_button)
        return box

    def _refresh_layers(self, event: Any = None) -> None:
        """List the Labels layers, keep the choice; a newly added one (a new segmentation) is chosen alone."""
        chosen = set(self.chosen_keys())
        added = getattr(event, "value", None)
        if getattr(event, "type", "") == "inserted" and isinstance(added, Labels):
            chosen = {layer_key(added)}
        self.layer_list.blockSignals(True)
        self.layer_list.clear()
        for layer in self.viewer.layers:
            if isinstance(layer, Labels):
                item = QListWidgetItem(layer.name)
                item.setData(ROLE_KEY, layer_key(layer))
                self.layer_list.addItem(item)
                item.setSelected(layer_key(layer) in chosen)
                layer.events.metadata.connect(self._on_choice_changed)  # reviews and re-segmentations
        if not self.layer_list.selectedItems() and self.layer_list.count():
            self.layer_list.item(self.layer_list.count() - 1).setSelected(True)
        self.layer_list.blockSignals(False)
        self._on_choice_changed()

    def chosen_keys(self) -> list[str]:
        """``unique_id`` of the chosen layers, in list order."""
        rows = sorted(self.layer_list.row(item) for item in self.layer_list.selectedItems())
        return [self.layer_list.item(row).data(ROLE_KEY) for row in rows]

    def choose(self, names: Sequence[str]) -> None:
        """Choose the Labels layers called ``names``."""
        for row in range(self.layer_list.count()):
            item = self.layer_list.item(row)
            item.setSelected(item.text() in names)

    def _layer(self, key: str) -> Labels | None:
        return next((layer for layer in self.viewer.layers if layer_key(layer) == key), None)

    def chosen_layers(self) -> list[Labels]:
        """The chosen Labels layers still in the viewer."""
        return [layer for key in self.chosen_keys() if (layer := self._layer(key)) is not None]

    def _on_choice_changed(self, *_: Any) -> None:
        self._show_summary()
        self.refresh_versions()

    # ------------------------------------------------------------------------------------ what is chosen

    def _model_of(self, layers: Sequence[Labels]) -> str:
        """The one model the chosen layers were segmented with; ValueError otherwise."""
        if not layers:
            raise ValueError("choose a corrected Labels layer (one made with the Segment widget)")
        models = {}
        for layer in layers:
            record = layer.metadata.get(RESULT_KEY)
            if not record or not record.get("model"):
                raise ValueError(
                    f"layer {layer.name!r} was not made by the Segment widget, so no model is known for it: segment "
                    "the image with the Segment widget, correct that layer, then fine-tune"
                )
            models.setdefault(str(record["model"]), []).append(layer.name)
        if len(models) > 1:
            listing = "; ".join(f"{Path(m).name}: {', '.join(names)}" for m, names in models.items())
            raise ValueError(
                f"the chosen layers come from different models ({listing}); fine-tune one model at a time: choose "
                "only layers segmented with the same model"
            )
        return next(iter(models))

    def _reviewed_split(self, layer: Labels) -> tuple[list[int], list[int]]:
        review = review_of(layer)
        if review is None or not review.reviewed:
            raise ValueError(
                f"layer {layer.name!r} has no reviewed slice: correct some slices and press 'Mark slice reviewed' "
                "in the Correct widget (only reviewed slices are used), or leave the layer out"
            )
        return split_reviewed_slices(review, HOLDOUT_EVERY)

    def _show_summary(self) -> None:
        try:
            layers = self.chosen_layers()
            model = self._model_of(layers)
            splits = [(layer.name, *self._reviewed_split(layer)) for layer in layers]
        except ValueError as error:
            self.summary.setText(str(error))
            return
        train = sum(len(t) for _, t, _ in splits)
        held_out = sum(len(h) for _, _, h in splits)
        per_layer = "; ".join(f"{name}: {len(t)} train / {len(h)} held out" for name, t, h in splits)
        warning = "" if held_out else " (no slice held out: review at least two slices to check the new version)"
        self.summary.setText(
            f"model {Path(model).name}: {train + held_out} reviewed slice(s), {train} to train on, {held_out} held "
            f"out{warning}. {per_layer}"
        )

    def _studies(self, layers: Sequence[Labels]) -> tuple[list[CorrectedStudy], list[Target]]:
        """The studies to fine-tune on (copies of the labels) and where to re-segment later; ValueError if unfit."""
        studies, targets = [], []
        for layer in layers:
            self._reviewed_split(layer)
            names = layer.metadata[RESULT_KEY].get("image_layers") or []
            missing = [name for name in names if name not in self.viewer.layers]
            if not names or missing:
                raise ValueError(
                    f"the image layers {missing or names} that {layer.name!r} was segmented from are gone; open them "
                    "again with the same names"
                )
            model_input = model_input_from_layers([self.viewer.layers[name] for name in names])
            labels = np.array(layer.data, copy=True)
            try:
                study = CorrectedStudy(model_input.image, labels, review_of(layer), model_input.spacing, layer.name)
            except ValueError as error:
                raise ValueError(f"layer {layer.name!r}: {error}") from error
            studies.append(study)
            targets.append(Target(layer_key(layer), layer.name, model_input))
        return studies, targets

    def settings(self) -> FineTuneSettings:
        """The settings of the form."""
        return FineTuneSettings(
            steps=self.steps.value(),
            lr=self.lr.value(),
            augment=self.augment.isChecked(),
            device=self.device_box.device(),
            changed_weight=self.changed_weight.value(),
            freeze_encoder=self.freeze_encoder.isChecked(),
            anchor=self.anchor.isChecked(),
        )

    # ---------------------------------------------------------------------------------------------- run

    def run(self) -> None:
        """Check the choice, then fine-tune in the background; the version is saved when it ends (not if cancelled)."""
        if self.worker is not None:
            return
        try:
            layers = self.chosen_layers()
            model = self._model_of(layers)
            studies, targets = self._studies(layers)
            settings = self.settings()
        except ValueError as error:
            self._fail(str(error))
            return
        self._cancel.clear()
        self.last_version, self.last_targets = None, targets
        self.loss_plot.clear(settings.steps)  # the form sets steps, not epochs
        self.dice_label.setText("held-out Dice: scoring the current model…")
        self._set_running(True, f"fine-tuning {Path(model).name} on {len(studies)} study(ies)…")
        self.worker = start_job(
            finetune_job(model, studies, settings, cancel=self._cancel, targets=targets),
            on_progress=self._show_training,
            on_result=self._finish_run,
            on_failure=self._on_error,
            on_finished=self._on_finished,
        )

    def cancel(self) -> None:
        """Stop the running job before its next step; a cancelled fine-tune saves nothing."""
        if self.worker is not None:
            self._cancel.set()
            self._say("cancelling…")

    def _show_training(self, update: Any) -> None:
        if not hasattr(update, "loss"):  # predicting the studies again (changed voxels weighted up)
            self._show_prediction(update)
            return
        self.progress.setValue(round(100 * update.fraction))
        if update.stage == "train" and update.loss is not None:
            self.loss_plot.add(update.step, update.loss)
        if update.stage == "validate" and "mean_dice" in update.metrics:
            dice = update.metrics["mean_dice"]
            self.loss_plot.add_dice(update.step, dice)
            when = "before fine-tuning" if update.step == 0 else f"at step {update.step}/{update.total_steps}"
            self.dice_label.setText(f"held-out Dice {when}: {dice:.3f}")
        self._say(update.message or update.stage)

    def _finish_run(self, run: FineTuneRun) -> None:
        outcome = run.outcome
        if outcome.cancelled or run.folder is None:
            self.progress.setValue(0)
            self.dice_label.setText("")
            self._say("cancelled: nothing was saved and the active model is unchanged")
            show_info("Mamba Segmentation: fine-tune cancelled; nothing was saved, the active model is unchanged.")
            return
        self.last_version = run.folder
        self.progress.setValue(100)
        self.dice_label.setText(_dice_text(outcome.before, outcome.after))
        message = f"saved {run.folder.name} in {run.folder.parent}: {outcome.reason}"
        self._say(message)
        (show_info if outcome.activate else show_warning)(f"Mamba Segmentation: {message}")
        self.refresh_versions()

    def _on_error(self, error: BaseException) -> None:
        from napari_mamba_seg.inference import PredictionCancelled

        if isinstance(error, PredictionCancelled):
            self._say("cancelled: no slice was changed")
            return
        self._fail(str(error) or type(error).__name__)

    def _on_finished(self) -> None:
        self.worker = None
        self._set_running(False)

    def _set_running(self, running: bool, message: str = "") -> None:
        self.controls.set_running(running)
        self.resegment_button.setEnabled(not running and self.last_version is not None)
        if running:
            self._say(message)

    # ----------------------------------------------------------------------------------------- re-segment

    def resegment(self) -> None:
        """Predict the last run's studies with the new version and write it on their unreviewed slices only."""
        if self.worker is not None or self.last_version is None:
            return
        targets = [target for target in self.last_targets if self._layer(target.key) is not None]
        if not targets:
            self._fail("the layers of the last fine-tune are gone; nothing to re-segment")
            return
        folder = str(self.last_version)
        self._cancel.clear()
        self._set_running(True, f"re-segmenting {len(targets)} layer(s) with {Path(folder).name}…")
        self.worker = start_job(
            resegment_job(folder, self.device_box.device(), targets, cancel=self._cancel),
            on_progress=self._show_prediction,
            on_result=lambda results: self._write_results(folder, results),
            on_failure=self._on_error,
            on_finished=self._on_finished,
        )

    def _show_prediction(self, update: Any) -> None:
        self.progress.setValue(round(100 * update.fraction))
        self._say(f"{update.stage}: {update.message}" if update.message else update.stage)

    def _write_results(self, folder: str, results: Sequence[tuple[Target, Any]]) -> None:
        written, failed = [], []
        for target, result in results:
            try:
                written.append(self._write_one(self._layer(target.key), target, folder, result))
            except ValueError as error:
                failed.append(str(error))
        self.progress.setValue(100)
        summary = f"re-segmented with {Path(folder).name} (reviewed slices kept): " + "; ".join(written)
        if failed:
            self._fail("; ".join(failed) + (f" ({summary})" if written else ""))
        else:
            self._say(summary)

    def _write_one(self, layer: Labels | None, target: Target, folder: str, result: Any) -> str:
        if layer is None:
            raise ValueError(f"layer {target.name!r} was removed; its new segmentation was dropped")
        if not isinstance(layer.data, np.ndarray):
            raise ValueError(f"layer {layer.name!r} does not hold a numpy array; cannot write into it")
        review = review_of(layer) or ReviewState.for_shape(layer.data.shape, 0)
        changed = write_unreviewed(layer.data, result.labels, review)
        layer.refresh()
        record = {**layer.metadata.get(RESULT_KEY, {}), "model": folder, "model_sha256": result.model_sha256}
        layer.metadata = {**layer.metadata, RESULT_KEY: record}
        return f"{layer.name}: {review.remaining} slice(s), {changed} voxel(s) changed"

    # ----------------------------------------------------------------------------------------- versions

    def _lineage_and_model(self) -> tuple[str, str] | None:
        layers = self.chosen_layers()
        try:
            model = self._model_of(layers[:1])
        except ValueError:
            return None
        return lineage_of(model), model

    def refresh_versions(self) -> None:
        """List the versions of the chosen layer's model: card summary, metrics, which one is active."""
        self.versions_list.clear()
        chosen = self._lineage_and_model()
        if chosen is None:
            self.versions_label.setText("choose a layer made with the Segment widget to see its model's versions")
            self.activate_button.setEnabled(False)
            return
        lineage, model = chosen
        try:
            versions = ModelVersions(versions_root())
            names, active = versions.versions(lineage), versions.active(lineage)
        except ValueError as error:
            self.versions_label.setText(str(error))
            self.activate_button.setEnabled(False)
            return
        for name in names:
            item = QListWidgetItem(_version_text(name, name == active, _card_text(name, lineage, model)))
            item.setData(ROLE_KEY, name)
            self.versions_list.addItem(item)
            item.setSelected(name == active)
        self.versions_label.setText(f"{lineage}: {len(names) - 1} fine-tuned version(s); active: {active}")
        self.activate_button.setEnabled(len(names) > 1)

    def versions_shown(self) -> list[tuple[str, bool]]:
        """``(version name, is active)`` per row of the versions list."""
        return [
            (item.data(ROLE_KEY), item.text().split("\n", 1)[0].endswith("(active)"))
            for item in (self.versions_list.item(row) for row in range(self.versions_list.count()))
        ]

    def activate_selected(self) -> None:
        """Make the selected version the active one of its lineage."""
        chosen, items = self._lineage_and_model(), self.versions_list.selectedItems()
        if chosen is None or not items:
            self._fail("choose a version in the list first")
            return
        lineage, version = chosen[0], items[0].data(ROLE_KEY)
        try:
            ModelVersions(versions_root()).activate(lineage, version)
        except ValueError as error:
            self._fail(str(error))
            return
        self.refresh_versions()
        self._say(f"{version} is now the active version of {lineage}")
        show_info(f"Mamba Segmentation: {version} is now the active version of {lineage}")

    # ----------------------------------------------------------------------------------------- messages

    def _say(self, message: str) -> None:
        self.status.say(message)

    def _fail(self, message: str) -> None:
        self.status.fail(message)


def _dice_text(before: float, after: float) -> str:
    if math.isnan(before) or math.isnan(after):
        return "held-out Dice: not measured (no reviewed slice was held out)"
    return f"held-out Dice: before {before:.3f} → after {after:.3f}"


def _version_text(name: str, active: bool, card_text: str) -> str:
    return f"{name}{' (active)' if active else ''}\n{card_text}"


def _card_text(name: str, lineage: str, model: str) -> str:
    """The card summary and metrics of a version (``versions_root()/name``) or of the original bundle."""
    from napari_mamba_seg.bundles import read_card

    source = versions_root() / name if name != lineage else _original_source(lineage, model)
    try:
        card = read_card(source)
    except (OSError, ValueError) as error:
        return f"card not readable: {error}"
    metrics = ", ".join(
        f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}" for key, value in card.metrics.items()
    )
    return card.summary() + (f" | {metrics}" if metrics else "")


def _original_source(lineage: str, model: str) -> str:
    """Where the original of ``lineage`` lives: follow ``model``'s parents back to the bundle named ``lineage``.

    The original may be a bundled or user bundle name, or a folder anywhere (recorded as each version's parent);
    falls back to the name itself.
    """
    from napari_mamba_seg.bundles import read_card

    source: str | None = model
    for _ in range(100):  # a lineage is a chain of parents; the bound only guards against a cycle
        if source is None:
            break
        if Path(source).name == lineage:
            return source
        try:
            source = read_card(source).parent_bundle
        except (OSError, ValueError):
            break
    return lineage
