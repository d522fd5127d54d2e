"""What the plugin's widgets share: a status line that shows messages and errors, and a layer's identity."""

from __future__ import annotations

import html
from typing import Any

from napari.utils.notifications import show_error
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QLabel

__all__ = ["ERROR_COLOUR", "StatusLine", "layer_key"]

ERROR_COLOUR = "#e06c6c"


class StatusLine(QLabel):
    """A word-wrapped line under a widget's buttons: plain messages, and errors in red that also become a napari
    notification (so the user sees them even with the widget scrolled away)."""

    def __init__(self) -> None:
        super().__init__("")
        self.setWordWrap(True)
        self.setTextFormat(Qt.TextFormat.RichText)

    def say(self, message: str) -> None:
        """Show ``message`` (plain text)."""
        self.setText(html.escape(message, quote=False))

    def fail(self, message: str) -> None:
        """Show ``message`` in red and as a napari error notification."""
        self.setText(f"<span style='color:{ERROR_COLOUR}'>{html.escape(message, quote=False)}</span>")
        show_error(f"Mamba Segmentation: {message}")


def layer_key(layer: Any) -> str:
    """A layer's identity across napari's proxies (plugin widgets get a new proxy object on every access)."""
    return str(layer.unique_id)
