"""Dock widget "Scan backends": which selective-scan backends this machine can run."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

from qtpy.QtCore import QSize, Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QAbstractScrollArea,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

if TYPE_CHECKING:
    import napari

AVAILABLE = "available"
UNAVAILABLE = "unavailable"
PREFERRED_WIDTH = 340  # pixels


def query_backends() -> dict[str, str | None]:
    """Ask the selective-scan engine which backends work here (imports torch).

    Returns:
        Backend name -> ``None`` if it can run on this machine, else the reason why not.
    """
    from napari_mamba_seg.kernels import available_backends  # imports triton safely next to OpenGL

    return dict(available_backends())


class BackendsWidget(QWidget):
    """Which selective-scan backends run here: a name/status table, and below it why the others do not.

    Args:
        napari_viewer: The viewer that docks the widget (unused; napari passes it).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer | None = None) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.backends: dict[str, str | None] = {}
        self.summary = QLabel()
        self.summary.setWordWrap(True)
        self.table = QTableWidget(0, 2)
        self.table.setHorizontalHeaderLabels(["Backend", "Status"])
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.table.setSizeAdjustPolicy(QAbstractScrollArea.SizeAdjustPolicy.AdjustToContents)
        self.table.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.reasons = QLabel()
        self.reasons.setWordWrap(True)
        self.reasons.setMinimumWidth(1)
        self.reasons.setTextFormat(Qt.TextFormat.RichText)
        self.reasons.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.refresh_button = QPushButton("Refresh")
        self.refresh_button.clicked.connect(self.refresh)

        layout = QVBoxLayout(self)
        layout.addWidget(self.summary)
        layout.addWidget(self.table)
        layout.addWidget(self.reasons)
        layout.addStretch(1)
        layout.addWidget(self.refresh_button)
        self.refresh()

    def sizeHint(self) -> QSize:  # Qt override
        """Dock narrow: the wrapped reasons would otherwise ask for one long line's width."""
        hint = super().sizeHint()
        return QSize(min(hint.width(), PREFERRED_WIDTH), hint.height())

    def refresh(self) -> None:
        """Query the backends again and redraw."""
        try:
            self.backends = query_backends()
        except Exception as error:  # show the failure instead of failing to dock the widget
            self.backends = {}
            self.summary.setText(f"Could not query the scan backends: {type(error).__name__}: {error}")
        else:
            n_available = sum(reason is None for reason in self.backends.values())
            self.summary.setText(
                f"{n_available} of {len(self.backends)} selective-scan backends available on this machine."
            )
        self.table.setRowCount(len(self.backends))
        for row, (name, reason) in enumerate(self.backends.items()):
            for column, text in enumerate((name, AVAILABLE if reason is None else UNAVAILABLE)):
                item = QTableWidgetItem(text)
                item.setToolTip(reason or AVAILABLE)
                self.table.setItem(row, column, item)
        self.table.resizeRowsToContents()
        self.table.setFixedHeight(
            self.table.horizontalHeader().sizeHint().height()
            + sum(self.table.rowHeight(row) for row in range(self.table.rowCount()))
            + 2 * self.table.frameWidth()
            + 4  # the header's style sheet border is not in its size hint
        )
        unavailable = [(name, reason) for name, reason in self.backends.items() if reason is not None]
        self.reasons.setText(
            "<br>".join(f"<b>{html.escape(name)}</b>: {html.escape(reason)}" for name, reason in unavailable)
        )
        self.reasons.setVisible(bool(unavailable))

    def rows(self) -> list[tuple[str, str, str]]:
        """What the widget shows, backend by backend: (name, status, reason or "")."""
        return [
            (self.table.item(row, 0).text(), self.table.item(row, 1).text(), self.backends[name] or "")
            for row, name in enumerate(self.backends)
        ]
