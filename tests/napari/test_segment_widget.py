"""The Segment widget, opened through the manifest: runs a real (tiny) model off the UI thread into a new Labels
layer, cancels cleanly, and refuses bad input with a message in the widget."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mamba_seg._napari import _segment_widget
from napari_mamba_seg._napari._layer_data import METADATA_KEY
from napari_mamba_seg._napari._segment import model_input_from_layers

PLUGIN = "napari-mamba-seg"
CLASSES = ["background", "breast", "fibroglandular tissue", "lesion"]
SCALE = (2.0, 0.7, 0.7)
TRANSLATE = (10.0, -5.0, 3.0)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A 3-channel, 4-class test_ultralight_vm_unet bundle with random weights (seeded)."""
    import torch

    from napari_mamba_seg.bundles import ModelCard, save_bundle
    from napari_mamba_seg.models import create_model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bundle") / "tiny-breast"
    model = create_model("test_ultralight_vm_unet", in_channels=3, num_classes=len(CLASSES))
    save_bundle(model, folder, ModelCard(class_names=CLASSES, channel_names=["pre", "early", "late"]))
    return folder


def _phases(viewer, shape=(6, 32, 32), seed=0):
    rng = np.random.default_rng(seed)
    for name in ("pre", "early", "late"):
        viewer.add_image(rng.random(shape, dtype=np.float32), name=name, scale=SCALE, translate=TRANSLATE)


def _open_widget(make_napari_viewer, tiny_bundle):
    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    widget.add_bundle_folder(str(tiny_bundle))
    widget.device_box.setCurrentIndex(widget.device_box.findData("cpu"))
    return viewer, widget


def _select(widget, names):
    widget.layer_list.clearSelection()
    for row in range(widget.layer_list.count()):
        item = widget.layer_list.item(row)
        item.setSelected(item.text() in names)


def _finish(qtbot, widget):
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)


@pytest.mark.gui
def test_segment_the_three_phases_into_a_new_labels_layer(make_napari_viewer, qtbot, tiny_bundle) -> None:
    viewer, widget = _open_widget(make_napari_viewer, tiny_bundle)
    _phases(viewer)
    _select(widget, ["pre", "early", "late"])
    assert widget.selected_layer_names() == ["pre", "early", "late"]
    widget.run_button.click()
    _finish(qtbot, widget)

    labels = viewer.layers[-1]
    assert labels._type_string == "labels"
    assert labels.name == "pre · tiny-breast"
    assert labels.data.shape == (6, 32, 32)
    np.testing.assert_allclose(labels.scale, SCALE)
    np.testing.assert_allclose(labels.translate, TRANSLATE)
    assert list(labels.features["class"]) == CLASSES
    assert labels.metadata[METADATA_KEY]["class_names"] == CLASSES
    assert labels.metadata[_segment_widget.RESULT_KEY]["image_layers"] == ["pre", "early", "late"]
    assert widget.progress.value() == 100

    # the same prediction as the predictor gives outside napari
    from napari_mamba_seg.inference import PredictionSettings, Predictor

    image = np.stack([viewer.layers[n].data for n in ("pre", "early", "late")])
    expected = Predictor.from_bundle(tiny_bundle, PredictionSettings(device="cpu")).predict(image, SCALE).labels
    np.testing.assert_array_equal(labels.data, expected)

    # a second run adds another layer; the first (edited) one is untouched
    labels.data[0, 0, 0] = 3
    edited = labels.data.copy()
    widget.run_button.click()
    _finish(qtbot, widget)
    assert len([layer for layer in viewer.layers if layer._type_string == "labels"]) == 2
    np.testing.assert_array_equal(viewer.layers["pre · tiny-breast"].data, edited)


@pytest.mark.gui
def test_cancel_mid_run_adds_no_layer(make_napari_viewer, qtbot, tiny_bundle, monkeypatch) -> None:
    viewer, widget = _open_widget(make_napari_viewer, tiny_bundle)
    _phases(viewer, shape=(12, 32, 32))
    _select(widget, ["pre", "early", "late"])
    real_job = _segment_widget.segmentation_job

    def job_cancelled_after_first_batch(*args, cancel=None, **kwargs):
        steps = real_job(*args, cancel=cancel, **kwargs)
        first = next(steps)
        cancel.set()  # as the Cancel button does, between two batches (in the worker thread: no race)
        yield first
        return (yield from steps)

    monkeypatch.setattr(_segment_widget, "segmentation_job", job_cancelled_after_first_batch)
    before = [layer.name for layer in viewer.layers]
    widget.run_button.click()
    _finish(qtbot, widget)
    assert [layer.name for layer in viewer.layers] == before
    assert "cancelled" in widget.status.text()
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()


@pytest.mark.gui
@pytest.mark.parametrize(
    ("make_layer", "message"),
    [
        (lambda v: v.add_image(np.zeros((32, 32, 3), np.uint8), name="photo", rgb=True), "RGB"),
        (lambda v: v.add_image(np.zeros((0, 32, 32), np.float32), name="empty", contrast_limits=(0, 1)), "no data"),
        (lambda v: v.add_image(np.zeros((32, 32), np.float32), name="flat"), "channel"),
    ],
    ids=["rgb", "empty", "one-2d-layer-for-3-channels"],
)
def test_bad_input_is_refused_in_the_widget(make_napari_viewer, qtbot, tiny_bundle, make_layer, message) -> None:
    viewer, widget = _open_widget(make_napari_viewer, tiny_bundle)
    layer = make_layer(viewer)
    _select(widget, [layer.name])
    before = [(lay.name, lay.data.shape) for lay in viewer.layers]
    widget.run_button.click()
    if widget.worker is not None:
        _finish(qtbot, widget)
    assert message in widget.status.text()
    assert [(lay.name, lay.data.shape) for lay in viewer.layers] == before


def test_layers_of_different_grids_are_not_stacked() -> None:
    from napari.layers import Image

    a = Image(np.zeros((4, 8, 8)), name="a", scale=(2, 1, 1))
    b = Image(np.zeros((4, 8, 9)), name="b", scale=(2, 1, 1))
    c = Image(np.zeros((4, 8, 8)), name="c", scale=(3, 1, 1))
    with pytest.raises(ValueError, match="differ in shape"):
        model_input_from_layers([a, b])
    with pytest.raises(ValueError, match="different voxel sizes"):
        model_input_from_layers([a, c])
    stacked = model_input_from_layers([a, a])
    assert stacked.image.shape == (2, 4, 8, 8) and stacked.spacing == (2.0, 1.0, 1.0)
    four_d = model_input_from_layers([Image(np.zeros((3, 4, 8, 8)), name="dce", scale=(1, 2, 1, 1))])
    assert four_d.image.shape == (3, 4, 8, 8) and four_d.spacing == (2.0, 1.0, 1.0)


@pytest.mark.gui
def test_segment_the_sample_with_a_test_model(make_napari_viewer, qtbot, tiny_bundle) -> None:
    """The plugin's own sample (three phases) through the widget: labels on the phantom's grid and scale."""
    viewer, widget = _open_widget(make_napari_viewer, tiny_bundle)
    viewer.open_sample(PLUGIN, "breast_dce_phantom")
    phases = [layer.name for layer in viewer.layers if layer._type_string == "image"]
    assert len(phases) == 3
    _select(widget, phases)
    widget.run_button.click()
    _finish(qtbot, widget)
    labels = viewer.layers[-1]
    assert labels._type_string == "labels" and labels.name.endswith("· tiny-breast")
    assert labels.data.shape == viewer.layers[phases[0]].data.shape == (60, 256, 256)
    np.testing.assert_allclose(labels.scale, viewer.layers[phases[0]].scale)
    np.testing.assert_allclose(labels.scale, (2.0, 0.7, 0.7))
