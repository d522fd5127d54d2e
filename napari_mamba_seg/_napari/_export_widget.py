"""Dock widget "Export": write a corrected Labels layer for retraining, with its geometry and its history.

Formats: NIfTI (the source affine), OME-TIFF (spacing), DICOM-SEG (referencing the source series' instances) and a
case of an nnU-Net v2 raw data set (created, or appended to without touching the other cases). Every export writes a
provenance record beside it (source files and hashes, the model that segmented the labels, the reviewed slices,
the time). Existing files are never replaced unless "Replace existing files" is ticked.

Thin by design: :func:`~napari_mamba_seg._napari._export.export_request` gathers and checks the layers in the UI
thread, :func:`~napari_mamba_seg._napari._export.export_job` writes in a worker thread. Never imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari.layers import Image, Labels
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_mamba_seg._napari._export import (
    EXPORT_CHOICES,
    SEGMENTATION_KEY,
    default_target,
    export_job,
    export_request,
)
from napari_mamba_seg._napari._layer_data import METADATA_KEY, review_of
from napari_mamba_seg._napari._status import StatusLine, layer_key
from napari_mamba_seg._napari._workers import start_job

if TYPE_CHECKING:
    import napari

__all__ = ["ExportWidget"]


class ExportWidget(QWidget):
    """A Labels layer, a format and a target in; the files and their provenance record out."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.worker: Any = None
        self.last_result: Any = None
        self._proposed_target = ""  # the last target the widget proposed (replaced when the user did not edit it)
        self._build()
        self._refresh_layers()
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)

    # -------------------------------------------------------------------------------------------- form

    def _build(self) -> None:
        self.labels_box = QComboBox()
        self.labels_box.setToolTip("the corrected Labels layer to export")
        self.labels_box.currentIndexChanged.connect(self._on_layer_changed)
        self.summary = QLabel("")
        self.summary.setWordWrap(True)
        self.format_box = QComboBox()
        self.format_box.addItems(list(EXPORT_CHOICES))
        self.format_box.currentIndexChanged.connect(self._on_format_changed)
        self.target_edit = QLineEdit()
        self.target_edit.setToolTip("the file to write, or the nnU-Net data set folder (created when missing)")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        target_row = QHBoxLayout()
        target_row.addWidget(self.target_edit, 1)
        target_row.addWidget(browse)
        self.image_list = QListWidget()
        self.image_list.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.image_list.setMaximumHeight(90)
        self.image_list.setToolTip("nnU-Net: the image layers (channels, in order) the labels were drawn on")
        self.case_edit = QLineEdit()
        self.case_edit.setPlaceholderText("the layer's name")
        self.case_edit.setToolTip("nnU-Net case name (characters unsafe in file names are replaced)")
        self.reviewed_only = QCheckBox("only the reviewed slices (with the review mask)")
        self.overwrite = QCheckBox("replace existing files")
        self.export_button = QPushButton("Export")
        self.export_button.clicked.connect(self.run)
        self.status = StatusLine()

        form = QFormLayout()
        form.addRow("Labels", self.labels_box)
        form.addRow("", self.summary)
        form.addRow("Format", self.format_box)
        form.addRow("Target", target_row)
        self.image_label = QLabel("Image layers")
        form.addRow(self.image_label, self.image_list)
        self.case_label = QLabel("Case name")
        form.addRow(self.case_label, self.case_edit)
        form.addRow("", self.reviewed_only)
        form.addRow("", self.overwrite)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.export_button)
        layout.addWidget(self.status)
        layout.addStretch(1)
        self._show_format_rows()

    @property
    def format(self) -> str:
        """The chosen format (a value of :data:`EXPORT_CHOICES`)."""
        return EXPORT_CHOICES[self.format_box.currentText()]

    def choose_format(self, format: str) -> None:
        """Select ``format`` (``"nifti"``, ``"tiff"``, ``"dicom-seg"`` or ``"nnunet"``)."""
        texts = {value: text for text, value in EXPORT_CHOICES.items()}
        self.format_box.setCurrentText(texts[format])

    def _refresh_layers(self, event: Any = None) -> None:
        current = self.labels_box.currentData()
        self.labels_box.blockSignals(True)
        self.labels_box.clear()
        for layer in self.viewer.layers:
            if isinstance(layer, Labels):
                self.labels_box.addItem(layer.name, layer_key(layer))
        index = self.labels_box.findData(current)
        self.labels_box.setCurrentIndex(index if index >= 0 else self.labels_box.count() - 1)
        self.labels_box.blockSignals(False)
        self.image_list.clear()
        for layer in self.viewer.layers:
            if isinstance(layer, Image):
                self.image_list.addItem(QListWidgetItem(layer.name))
        self._on_layer_changed()

    def labels_layer(self) -> Labels | None:
        """The chosen Labels layer."""
        key = self.labels_box.currentData()
        return next((layer for layer in self.viewer.layers if layer_key(layer) == key), None)

    def chosen_image_layers(self) -> list[Image]:
        """The selected image layers, in the viewer's order."""
        names = {item.text() for item in self.image_list.selectedItems()}
        return [layer for layer in self.viewer.layers if isinstance(layer, Image) and layer.name in names]

    def _on_layer_changed(self, *_: Any) -> None:
        layer = self.labels_layer()
        self._select_source_images(layer)
        self._propose_target()
        self.summary.setText(_summary(layer) if layer is not None else "no Labels layer: segment an image first")

    def _select_source_images(self, layer: Labels | None) -> None:
        record = (layer.metadata or {}).get(SEGMENTATION_KEY) if layer is not None else None
        names = set((record or {}).get("image_layers") or [])
        for row in range(self.image_list.count()):
            item = self.image_list.item(row)
            item.setSelected(item.text() in names)

    def _on_format_changed(self, *_: Any) -> None:
        self._show_format_rows()
        self._propose_target()

    def _show_format_rows(self) -> None:
        nnunet = self.format == "nnunet"
        for widget in (self.image_label, self.image_list, self.case_label, self.case_edit):
            widget.setVisible(nnunet)

    def _propose_target(self) -> None:
        """Propose a target next to the source, unless the user typed one."""
        layer = self.labels_layer()
        if layer is None or self.target_edit.text() not in ("", self._proposed_target):
            return
        self._proposed_target = str(default_target(layer.name, self.format, _source_folder(layer)))
        self.target_edit.setText(self._proposed_target)

    def _browse(self) -> None:
        start = self.target_edit.text() or str(Path.home())
        if self.format == "nnunet":
            chosen = QFileDialog.getExistingDirectory(self, "nnU-Net data set folder", start)
        else:
            chosen, _ = QFileDialog.getSaveFileName(self, "Export labels", start)
        if chosen:
            self.target_edit.setText(chosen)

    # --------------------------------------------------------------------------------------------- run

    def run(self) -> None:
        """Check the form and export in a worker thread (errors go to the status line; nothing is written then)."""
        layer = self.labels_layer()
        if layer is None:
            self.status.fail("no Labels layer to export: segment an image or open labels first")
            return
        try:
            request = export_request(
                layer,
                self.target_edit.text().strip(),
                self.format,
                image_layers=self.chosen_image_layers(),
                reviewed_only=self.reviewed_only.isChecked(),
                case_name=self.case_edit.text().strip() or None,
                overwrite=self.overwrite.isChecked(),
            )
        except ValueError as error:
            self.status.fail(f"cannot export {layer.name!r}: {error}")
            return
        self.export_button.setEnabled(False)
        self.status.say(f"exporting {layer.name!r}…")
        self.worker = start_job(
            export_job(request),
            on_progress=self.status.say,
            on_result=self._on_result,
            on_failure=lambda error: self.status.fail(f"cannot export {layer.name!r}: {error}"),
            on_finished=lambda: self.export_button.setEnabled(True),
        )

    def _on_result(self, result: Any) -> None:
        self.last_result = result
        files = ", ".join(path.name for path in result.files)
        reviewed = "" if result.reviewed_slices is None else f"; {len(result.reviewed_slices)} reviewed slice(s)"
        self.status.say(
            f"exported {files} (provenance: {result.provenance_file.name}{reviewed}) to {result.files[0].parent}"
        )


def _summary(layer: Labels) -> str:
    """What the layer is: its model, and how much of it was reviewed."""
    record = (layer.metadata or {}).get(SEGMENTATION_KEY) or {}
    made_by = f"segmented with {record['model']}" if record.get("model") else "not made by the Segment widget"
    try:
        review = review_of(layer)
    except ValueError as error:
        return f"{made_by}; {error}"
    if review is None or not review.reviewed:
        return f"{made_by}; no slice marked reviewed"
    return f"{made_by}; {len(review.reviewed)} of {review.num_slices} slices reviewed (axis {review.axis})"


def _source_folder(layer: Labels) -> Path | None:
    """The folder beside the labels' source file (the parent of a DICOM series folder); None when unknown."""
    source = ((layer.metadata or {}).get(METADATA_KEY) or {}).get("source")
    if not source:
        return None
    path = Path(source)
    folder = path.parent
    return folder if folder.is_dir() else None
