"""Dock widget "Segment": pick a model, a device and image layers; segment off the UI thread into a new Labels layer.

Thin by design: the work is :func:`napari_mamba_seg._napari._segment.segmentation_job`, a generator run in a napari
worker thread; this module only reads the form, starts the worker, shows its progress and adds the layer.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari.layers import Image
from napari.utils.notifications import show_info
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_mamba_seg._napari._controls import DeviceBox, RunControls
from napari_mamba_seg._napari._layer_data import labels_layer_kwargs
from napari_mamba_seg._napari._segment import (
    ModelInput,
    SegmentationResult,
    labels_layer_name,
    model_input_from_layers,
    segmentation_job,
)
from napari_mamba_seg._napari._status import StatusLine
from napari_mamba_seg._napari._workers import start_job

if TYPE_CHECKING:
    import napari

AXES = ["auto", "0", "1", "2"]
RESULT_KEY = "napari_mamba_seg_segmentation"
"""Key in the Labels layer's ``metadata`` recording the model, its sha256 and the source layers."""


class SegmentWidget(QWidget):
    """Model, device and image layers in; a new Labels layer out (never an existing layer overwritten)."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.worker: Any = None
        self._cancel = threading.Event()
        self._build()
        self._refresh_models()
        self._refresh_layers()
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)

    # ------------------------------------------------------------------------------------------------ form

    def _build(self) -> None:
        self.model_box = QComboBox()
        self.model_box.currentIndexChanged.connect(self._show_card)
        browse = QPushButton("Folder…")
        browse.setToolTip("use a model bundle folder (card.json + model.safetensors)")
        browse.clicked.connect(self._choose_bundle_folder)
        model_row = QHBoxLayout()
        model_row.addWidget(self.model_box, 1)
        model_row.addWidget(browse)
        self.card_label = QLabel()
        self.card_label.setWordWrap(True)
        self.device_box = DeviceBox()
        self.layer_list = QListWidget()
        self.layer_list.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.layer_list.setToolTip("one layer, or several layers of one grid as the model's channels (list order)")
        self.layer_list.setMaximumHeight(110)
        self.axis_box = QComboBox()
        self.axis_box.addItems(AXES)
        self.axis_box.setToolTip("slice axis of 2D models; auto = the axis with the largest voxel size")
        self.controls = RunControls("Run", self.run, self.cancel)
        self.run_button = self.controls.run_button
        self.cancel_button = self.controls.cancel_button
        self.progress = self.controls.progress
        self.status = StatusLine()

        form = QFormLayout()
        form.addRow("Model", model_row)
        form.addRow("", self.card_label)
        form.addRow("Device", self.device_box)
        form.addRow("Image layers", self.layer_list)
        form.addRow("Slice axis", self.axis_box)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.controls)
        layout.addWidget(self.status)
        layout.addStretch(1)

    def _refresh_models(self) -> None:
        from napari_mamba_seg.bundles import list_bundled, list_user_bundles

        self.model_box.blockSignals(True)
        self.model_box.clear()
        for name in list_bundled():
            self.model_box.addItem(name, name)
        for name in list_user_bundles():
            self.model_box.addItem(f"{name} (yours)", name)
        self.model_box.blockSignals(False)
        self._show_card()

    def _refresh_layers(self, event: Any = None) -> None:
        selected = set(self.selected_layer_names())
        self.layer_list.clear()
        for layer in self.viewer.layers:
            if isinstance(layer, Image):
                item = QListWidgetItem(layer.name)
                self.layer_list.addItem(item)
                item.setSelected(layer.name in selected)
        if not self.layer_list.selectedItems():
            self._select_default_layers()

    def _select_default_layers(self) -> None:
        """All image layers when their count is the model's channel count, else the first one."""
        wanted = self._model_channels()
        count = self.layer_list.count()
        picks = range(count) if wanted and count == wanted else range(min(1, count))
        for row in picks:
            self.layer_list.item(row).setSelected(True)

    def _model_channels(self) -> int | None:
        card = self._card()
        return None if card is None else card.in_channels

    def _card(self) -> Any:
        from napari_mamba_seg.bundles import read_card

        model = self.model_box.currentData()
        if not model:
            return None
        try:
            return read_card(model)
        except (OSError, ValueError):
            return None

    def _show_card(self, *_: Any) -> None:
        card = self._card()
        self.card_label.setText("" if card is None else card.summary())

    def _choose_bundle_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Model bundle folder")
        if folder:
            self.add_bundle_folder(folder)

    def add_bundle_folder(self, folder: str) -> None:
        """Add a bundle folder to the model list and select it."""
        from napari_mamba_seg.bundles import read_card

        try:
            read_card(folder)
        except (OSError, ValueError) as error:
            self._fail(f"{folder} is not a model bundle: {error}")
            return
        self.model_box.addItem(f"{Path(folder).name} (folder)", folder)
        self.model_box.setCurrentIndex(self.model_box.count() - 1)

    def selected_layer_names(self) -> list[str]:
        """The chosen image layers, in list order."""
        rows = sorted(self.layer_list.row(item) for item in self.layer_list.selectedItems())
        return [self.layer_list.item(row).text() for row in rows]

    # ------------------------------------------------------------------------------------------------- run

    def run(self) -> None:
        """Check the form, then segment in a worker thread (progress in the bar, Cancel stops it)."""
        if self.worker is not None:
            return
        model = self.model_box.currentData()
        if not model:
            self._fail("no model: this installation ships none and you have none; choose a bundle folder")
            return
        try:
            model_input = model_input_from_layers([self.viewer.layers[name] for name in self.selected_layer_names()])
        except (ValueError, KeyError) as error:
            self._fail(str(error))
            return
        axis = self.axis_box.currentText()
        self._cancel.clear()
        job = segmentation_job(
            model,
            self.device_box.device(),
            model_input,
            axis if axis == "auto" else int(axis),
            cancel=self._cancel,
        )
        self._set_running(True, f"loading {Path(str(model)).name}…")
        self.worker = start_job(
            job,
            on_progress=self._show_progress,
            on_result=lambda result: self._add_result(result, model_input),
            on_failure=self._on_error,
            on_finished=self._on_finished,
        )

    def cancel(self) -> None:
        """Ask the running job to stop before its next batch; no layer is added."""
        if self.worker is not None:
            self._cancel.set()
            self.status.say("cancelling…")

    def _show_progress(self, update: Any) -> None:
        self.progress.setValue(round(100 * update.fraction))
        text = f"{update.stage}: {update.message}" if update.message else update.stage
        self.status.say(text)

    def _add_result(self, result: SegmentationResult, model_input: ModelInput) -> None:
        try:
            kwargs = labels_layer_kwargs(result.class_names, like=model_input.first_layer)
        except ValueError as error:  # the image layer was moved or rescaled since it was read: keep the labels
            show_info(
                f"Mamba Segmentation: the labels are placed like the image layer, without its file geometry ({error})"
            )
            kwargs = labels_layer_kwargs(result.class_names)
            kwargs |= {"scale": model_input.spacing, "translate": model_input.translate}
        kwargs["metadata"][RESULT_KEY] = {
            "model": result.model_name,
            "model_sha256": result.model_sha256,
            "image_layers": model_input.names,
        }
        layer = self.viewer.add_labels(
            result.labels, name=labels_layer_name(model_input.names, result.model_name), **kwargs
        )
        self.status.say(f"done: {layer.name!r} ({', '.join(result.class_names[1:])})")
        self.progress.setValue(100)

    def _on_error(self, error: BaseException) -> None:
        from napari_mamba_seg.inference import PredictionCancelled

        if isinstance(error, PredictionCancelled):
            self.status.say("cancelled: no layer was added")
            self.progress.setValue(0)
            show_info("Segmentation cancelled; no layer was added.")
            return
        self._fail(str(error) or type(error).__name__)

    def _on_finished(self) -> None:
        self.worker = None
        self._set_running(False)

    def _set_running(self, running: bool, message: str = "") -> None:
        self.controls.set_running(running)
        if running:
            self.status.say(message)

    def _fail(self, message: str) -> None:
        self.status.fail(message)
