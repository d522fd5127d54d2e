"""Form parts the Segment and Fine-tune widgets share: the device chooser and the Run / Cancel / progress block."""

from __future__ import annotations

from collections.abc import Callable

from qtpy.QtWidgets import QComboBox, QHBoxLayout, QProgressBar, QPushButton, QVBoxLayout, QWidget

__all__ = ["DeviceBox", "RunControls"]


class DeviceBox(QComboBox):
    """The devices a model can run on here, best first (CUDA with its name and memory, MPS, CPU); imports torch."""

    def __init__(self) -> None:
        super().__init__()
        from napari_mamba_seg.inference import available_devices

        for device, description in available_devices():
            self.addItem(f"{device}: {description}", device)

    def device(self) -> str:
        """The chosen device string (``"cuda:0"``, ``"mps"``, ``"cpu"``), or ``"auto"`` when none is listed."""
        return self.currentData() or "auto"


class RunControls(QWidget):
    """A Run button and a Cancel button (enabled only while running) over a 0-100 progress bar."""

    def __init__(self, run_text: str, on_run: Callable[[], None], on_cancel: Callable[[], None]) -> None:
        super().__init__()
        self.run_button = QPushButton(run_text)
        self.run_button.clicked.connect(on_run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(on_cancel)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)

    def set_running(self, running: bool) -> None:
        """Run off and Cancel on while a job runs (progress back to 0), the other way round after."""
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        if running:
            self.progress.setValue(0)
