"""Screenshot of napari after segmenting the breast phantom sample with the bundled breast-dce model.

Usage (no display needed; Xvfb gives napari an OpenGL canvas)::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python docs/screenshot.py docs/segment-widget.png

It opens what ``napari-mamba-seg demo`` opens (the sample and the docked widgets), presses Run in the Segment
widget, waits for the result, hides the ground truth and saves the whole window.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np


def main(output: str = "docs/segment-widget.png") -> Path:
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_mamba_seg.cli import DEMO_SAMPLE, PLUGIN_NAME, dock_demo_widgets

    viewer = napari.Viewer(title="napari-mamba-seg")
    viewer.window._qt_window.resize(1600, 1000)
    viewer.open_sample(PLUGIN_NAME, DEMO_SAMPLE)
    widgets = dock_demo_widgets(viewer)
    segment = widgets["Segment"]
    segment.model_box.setCurrentIndex(segment.model_box.findData("breast-dce"))
    segment.run_button.click()
    deadline = time.monotonic() + 300
    while segment.worker is not None and time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.05)
    result = viewer.layers[-1]
    if result._type_string != "labels" or "breast-dce" not in result.name:
        raise RuntimeError(f"the segmentation did not finish: {segment.status.text()}")
    viewer.layers["phantom ground truth"].visible = False
    lesion_slices = np.flatnonzero((result.data == 3).any(axis=(1, 2)))
    middle = int(lesion_slices[len(lesion_slices) // 2]) if lesion_slices.size else result.data.shape[0] // 2
    viewer.dims.set_point(0, middle * result.scale[0] + result.translate[0])
    viewer.layers.selection.active = result
    for _ in range(20):
        QApplication.processEvents()
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(path), canvas_only=False)
    viewer.close()
    return path


if __name__ == "__main__":
    print(main(*sys.argv[1:]))
